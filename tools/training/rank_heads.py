"""Per-rank heads for ``biolit-id train --rank-heads``: one head per rank, on the rows that have it.

The head is the seed v2's ``LevelMLP`` (``server.decision.rank_heads``), fitted on
the bundle's whitened training features. A photo whose species has no taxon
at a rank (a group across genera, a species the taxonomy leaves without an
order) is left out of that rank's head, and only of that one.

The seed v2's trainer did this wrongly (docs/seed-v2.md
§3): it filtered the rows, re-indexed them from 0, then took the features by
the new index, so every label after the first dropped row was paired with
another photo. Here one array of row numbers selects both the features and
the labels (``rank_training_set``), and ``train_rank_head`` only ever sees
that pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from biolit_id.server.catalog.catalog import Catalog
from biolit_id.server.decision.rank_heads import (
    BN_EPS,
    HEAD_RANKS,
    LAYER_KEYS,
    RankHead,
    RankHeads,
    hidden_width,
)
from biolit_id.server.decision.ranks import taxon_of

DEFAULT_RANKS = HEAD_RANKS  # kingdom ... genus


@dataclass(frozen=True)
class RankHeadSettings:
    """The seed v2's recipe (docs/seed-v2.md), with a class-balanced loss for its sampler."""

    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    dropout: float = 0.3
    clip: float = 1.0
    balanced: bool = True
    seed: int = 0
    threads: int = 1


def rank_labels(species: Sequence[str], catalog: Catalog, rank: str) -> np.ndarray:
    """Each photo's taxon at ``rank`` ("" where its species has none)."""
    cache: dict[str, str] = {}
    out = []
    for name in species:
        if name not in cache:
            cache[name] = taxon_of(catalog.get(name), rank)
        out.append(cache[name])
    return np.asarray(out, dtype=object)


def rank_training_set(features: np.ndarray, labels: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, features, labels) of the photos that have the rank: the same rows for both."""
    rows = np.flatnonzero(np.asarray([bool(t) for t in labels]))
    return rows, np.asarray(features)[rows], np.asarray(labels)[rows]


def train_rank_head(features: np.ndarray, labels: np.ndarray, rank: str,
                    settings: RankHeadSettings = RankHeadSettings()) -> RankHead:
    """Fit one head on aligned (features, labels); labels are taxon names."""
    import torch
    from torch import nn

    torch.manual_seed(settings.seed)
    torch.set_num_threads(max(1, settings.threads))
    classes = tuple(sorted(set(labels.tolist())))
    if len(classes) < 2:
        raise ValueError(f"{rank}: {len(classes)} taxon in the training rows, a head needs 2")
    index = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([index[t] for t in labels], dtype=torch.long)
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    hidden = hidden_width(len(classes))
    net = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.BatchNorm1d(hidden, eps=BN_EPS),
                        nn.ReLU(), nn.Dropout(settings.dropout), nn.Linear(hidden, len(classes)))
    counts = torch.bincount(y, minlength=len(classes)).float()
    weight = (counts.sum() / (len(classes) * counts)) if settings.balanced else None
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    opt = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps = settings.epochs * max(1, -(-len(y) // settings.batch_size))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(settings.seed)
    for _ in range(settings.epochs):
        net.train()
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), settings.batch_size):
            batch = order[start : start + settings.batch_size]
            if len(batch) < 2:  # BatchNorm needs two rows
                continue
            opt.zero_grad()
            loss = loss_fn(net(x[batch]), y[batch])
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), settings.clip)
            opt.step()
            schedule.step()
    net.eval()
    state = {k: v.detach().cpu().numpy().astype(np.float32)
             for k, v in net.state_dict().items() if k in LAYER_KEYS}
    return RankHead(rank, classes, state)


def train_rank_heads(features: np.ndarray, species: Sequence[str], catalog: Catalog,
                     ranks: Sequence[str] = DEFAULT_RANKS,
                     settings: RankHeadSettings = RankHeadSettings()) -> RankHeads:
    """One head per rank that has at least two taxa among the training photos.

    ``features`` are the bundle's whitened training features, row i of
    ``species``'s photo i. What was left out, and why, goes in the manifest.
    """
    heads, report = {}, {}
    for rank in ranks:
        labels = rank_labels(species, catalog, rank)
        rows, x, y = rank_training_set(features, labels)
        taxa = len(set(y.tolist()))
        report[rank] = {"rows": len(rows), "left_out": int(len(labels) - len(rows)),
                        "taxa": taxa}
        if taxa < 2:
            report[rank]["skipped"] = "fewer than two taxa"
            continue
        heads[rank] = train_rank_head(x, y, rank, settings)
    return RankHeads(heads, source="train", extra={"training": report})
