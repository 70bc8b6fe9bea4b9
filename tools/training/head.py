"""Training the MLP head: AdamW, early stopping, logit adjustment, rare negatives.

Separate from ``train`` so the fused routing's simulation can train a second
head (without some species) with exactly the same settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


def class_balanced_weights(counts: np.ndarray, beta: float = 0.999) -> np.ndarray:
    """Cui et al. 2019 'effective number' weights, mean 1 over classes."""
    effective = (1.0 - np.power(beta, counts)) / (1.0 - beta)
    w = 1.0 / np.maximum(effective, 1e-12)
    return w * len(w) / w.sum()


@dataclass(frozen=True)
class HeadSettings:
    epochs: int = 200
    patience: int = 15
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    balanced: bool = False
    # Weight of the "rare photos are none of the common species" loss (0 = seed's head);
    # 0.5 measured better on the synthetic long-tail set (README, "Training").
    rare_negatives: float = 0.5
    # Logit adjustment (Menon et al. 2021): train on logits + tau * log(prior), so the raw
    # logits are class-balanced and the long tail is not crushed; 0 = plain cross-entropy.
    logit_adjust: float = 0.0
    threads: int = 1


# routing fused: the head covers (almost) every species, balanced by logit adjustment.
FUSED_HEAD = HeadSettings(logit_adjust=1.0)


def train_head(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
               y_val: np.ndarray, num_classes: int, config: dict, seed: int,
               settings: HeadSettings = HeadSettings(), x_negative: np.ndarray | None = None,
               progress: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """AdamW + cross-entropy, early-stopped on val accuracy (then val loss).

    ``x_negative`` (photos of species outside the head) are pushed towards a
    uniform output when ``settings.rare_negatives`` > 0, so a rare species
    does not get a confident common answer by routing rule 1.

    Runs on ``settings.threads`` intra-op threads (default 1): this small MLP
    gains nothing from more, loses a lot when the cores are shared, and one
    thread makes the float reductions — hence the bundle — identical on
    every machine.
    """
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, settings.threads))
    try:
        return _train_head(x_train, y_train, x_val, y_val, num_classes, config, seed, settings,
                           x_negative, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _train_head(x_train, y_train, x_val, y_val, num_classes, config, seed, settings,
                x_negative, progress):
    import torch
    from tqdm import tqdm

    from biolit_id.server.decision.head import build_head, head_state_from_module

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = build_head(x_train.shape[1], num_classes, config)
    weight = None
    if settings.balanced:
        counts = np.bincount(y_train, minlength=num_classes).astype(np.float64)
        weight = torch.from_numpy(class_balanced_weights(counts)).float()
    if settings.rare_negatives > 0 and x_negative is not None and len(x_negative):
        x_train = np.concatenate([x_train, x_negative])
        y_train = np.concatenate([y_train, np.full(len(x_negative), -1)])
    xt = torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32))
    yt = torch.from_numpy(y_train.astype(np.int64))
    xv = torch.from_numpy(np.ascontiguousarray(x_val, dtype=np.float32))
    yv = torch.from_numpy(y_val.astype(np.int64))
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
    shift = torch.zeros(num_classes)
    if settings.logit_adjust > 0:
        prior = np.bincount(y_train[y_train >= 0], minlength=num_classes) + 1.0
        shift = settings.logit_adjust * torch.from_numpy(np.log(prior / prior.sum())).float()
    opt = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    has_val = len(yv) > 0
    best = (-1.0, np.inf)
    best_state, best_epoch, stale = None, 0, 0
    history = []
    bar = tqdm(range(settings.epochs), desc="training head", unit="epoch", disable=not progress)
    for epoch in bar:
        net.train()
        order = torch.randperm(len(yt), generator=generator)
        for start in range(0, len(order), settings.batch_size):
            idx = order[start : start + settings.batch_size]
            opt.zero_grad()
            logits, y = net(xt[idx]) + shift, yt[idx]
            pos = y >= 0
            loss = loss_fn(logits[pos], y[pos]) if pos.any() else logits.sum() * 0
            if not pos.all():
                uniform_ce = -torch.log_softmax(logits[~pos], dim=1).mean(dim=1).mean()
                loss = loss + settings.rare_negatives * uniform_ce
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            xe, ye = (xv, yv) if has_val else (xt[yt >= 0], yt[yt >= 0])
            logits = net(xe) + shift
            val_loss = float(torch.nn.functional.cross_entropy(logits, ye))
            val_acc = float((logits.argmax(1) == ye).float().mean())
        history.append((val_acc, val_loss))
        bar.set_postfix(acc=f"{val_acc:.3f}", loss=f"{val_loss:.3f}")
        if val_acc > best[0] or (val_acc == best[0] and val_loss < best[1]):
            best, best_epoch, stale = (val_acc, val_loss), epoch, 0
            best_state = head_state_from_module(net)
        else:
            stale += 1
            if has_val and stale >= settings.patience:
                break
    bar.close()
    info = {"best_epoch": best_epoch + 1, "epochs_run": len(history),
            "early_stopped_on": "val" if has_val else "train",
            "val_accuracy": best[0], "val_loss": best[1], **asdict(settings)}
    return best_state, info


def fit_head_on(x: np.ndarray, y: np.ndarray, classes: Sequence[int], head: HeadSettings,
                config: dict, seed: int) -> dict:
    """A head over ``classes`` (species indices) on the rows of ``x`` labelled with them,
    early-stopped on its own held-out 15 %."""
    from biolit_id.cli.training.crossfit import early_stopping_rows

    cidx = {int(c): i for i, c in enumerate(classes)}
    rows = np.flatnonzero(np.isin(y, list(cidx)))
    yy = np.array([cidx[int(v)] for v in y[rows]], dtype=np.int64)
    stop = early_stopping_rows(yy, seed)
    state, _ = train_head(x[rows[~stop]], yy[~stop], x[rows[stop]], yy[stop], len(classes),
                          config, seed, head, progress=False)
    return state
