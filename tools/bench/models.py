"""BioCLIP (ViT-B-16, 512-d) next to BioCLIP-2 (ViT-L-14, 768-d): what the bigger model costs.

Same photos, same runtimes, same process: for each architecture a random-weight
demo model in the real on-disk format is written (cost does not depend on
weight values), loaded through the service's loader, and timed: load, the
image tower's CPU time per photo with one thread (batch 1 and batched; CPU
time, not wall time, so that a shared, loaded machine still gives comparable
numbers), the text tower on the catalog's prompts (a zero-shot start),
resident memory and the weights on disk. With ``pairs`` the image tower is
also timed per runtime as ``biolit-id bench`` does (``bench_model.
bench_forward``: wall time, fidelity gate), which wants a quiet machine. ``biolit-id
bench --models`` runs it (not a section: it loads two models of its own).
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import logging
import resource
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from biolit_id.cli.bench.common import machine, parse_pairs, timed
from biolit_id.cli.bench.model import bench_forward
from biolit_id.cli.demo_model import WEIGHTS_FILE, write_demo_model
from biolit_id.server.catalog.catalog import Catalog
from biolit_id.server.inference.model_loader import load_model
from biolit_id.server.inference.preprocess import ImagePolicy, preprocess

log = logging.getLogger(__name__)

ARCHS = ("ViT-B-16", "ViT-L-14")  # BioCLIP, BioCLIP-2
MODEL_OF = {"ViT-B-16": "hf-hub:imageomics/bioclip", "ViT-L-14": "hf-hub:imageomics/bioclip-2"}


def synthetic_photos(n: int, size: tuple[int, int] = (1024, 768), seed: int = 0) -> list[bytes]:
    """JPEGs with smooth colour fields and noise: decoding and resizing cost as real ones."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    h, w = size[1], size[0]
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    for _ in range(n):
        base, grad = rng.uniform(0, 255, 3), rng.uniform(-120, 120, (2, 3))
        arr = base + xx[..., None] * grad[0] + yy[..., None] * grad[1]
        arr = np.clip(arr + rng.normal(0, 12, arr.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr, "RGB").save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def cpu_forward(loaded, pixels: np.ndarray, batch: int, runs: int) -> dict:
    """Process CPU ms per photo of the torch fp32 image tower, one intra-op thread."""
    import torch

    from biolit_id.server.inference.embedders.eager import TorchEmbedder

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        embedder = TorchEmbedder(loaded, "fp32")
        many = np.concatenate([pixels] * (batch // len(pixels) + 1))[:batch]
        embedder.embed(pixels[:1])  # warm-up
        single, batched = [], []
        for _ in range(runs):
            t0 = time.process_time()
            embedder.embed(pixels[:1])
            single.append((time.process_time() - t0) * 1e3)
        for _ in range(max(1, runs // 2)):
            t0 = time.process_time()
            embedder.embed(many)
            batched.append((time.process_time() - t0) * 1e3 / batch)
    finally:
        torch.set_num_threads(threads)
    return {"runtime": "torch", "precision": "fp32", "threads": 1,
            "batch1_cpu_ms": float(np.median(single)),
            f"batch{batch}_cpu_ms_per_photo": float(np.median(batched))}


def bench_architecture(arch: str, work_dir: Path, pixels: np.ndarray,
                       pairs: Sequence[tuple[str, str]], repeats: int, batch: int,
                       single_runs: int, text_prompts: Sequence[str]) -> dict:
    model_dir = write_demo_model(work_dir / arch, arch=arch)
    started = time.perf_counter()
    loaded = load_model(f"local-dir:{model_dir}")
    row: dict = {
        "arch": arch, "model": MODEL_OF.get(arch, ""), "embedding_dim": loaded.embedding_dim,
        "load_s": time.perf_counter() - started,
        "params_m": sum(p.numel() for p in loaded.model.parameters()) / 1e6,
        "image_params_m": sum(p.numel() for p in loaded.model.visual.parameters()) / 1e6,
        "weights_file_gb_fp16": (model_dir / WEIGHTS_FILE).stat().st_size / 1e9,
        "max_rss_gb_after_load": _rss_gb(),
    }
    prompts = list(text_prompts)
    text = timed(lambda m=loaded: m.encode_text(prompts), 1, warmup=0)[0]
    row["text_prompts"] = len(prompts)
    row["text_ms_per_prompt"] = text / max(1, len(prompts))
    row["cpu"] = cpu_forward(loaded, pixels, batch, single_runs)
    row["forward"] = (bench_forward(loaded, list(pairs), work_dir / f"{arch}-runtimes", pixels,
                                    repeats, batch, single_runs) if pairs else [])
    row["max_rss_gb"] = _rss_gb()
    del loaded
    gc.collect()
    return row


def compare_models(work_dir: Path, archs: Sequence[str] = ARCHS,
                   pairs: Sequence[tuple[str, str]] = (),
                   photos: int = 8, repeats: int = 3, batch: int = 8, single_runs: int = 5,
                   prompts: int = 64) -> dict:
    """One row per architecture on the same decoded photos; ratios against the first."""
    work_dir = Path(work_dir)
    images = synthetic_photos(photos)
    policy = ImagePolicy(image_size=224, mean=(0.48145466, 0.4578275, 0.40821073),
                         std=(0.26862954, 0.26130258, 0.27577711))
    pixels = np.stack([preprocess(p, policy) for p in images])
    catalog = Catalog.load_default()
    text = [r.prompt() for r in catalog][:prompts]
    rows = [bench_architecture(a, work_dir, pixels, pairs, repeats, batch, single_runs, text)
            for a in archs]
    base = rows[0]
    for row in rows[1:]:
        row["vs_" + base["arch"]] = _ratios(base, row)
    return {"machine": machine(), "photos": photos, "batch": batch, "results": rows,
            "note": "random-weight demo models in the real on-disk format; costs only"}


def _ratios(base: dict, row: dict) -> dict:
    out = {"load_s": row["load_s"] / base["load_s"],
           "text_ms_per_prompt": row["text_ms_per_prompt"] / base["text_ms_per_prompt"],
           "image_cpu_batch1": row["cpu"]["batch1_cpu_ms"] / base["cpu"]["batch1_cpu_ms"]}
    by_pair = {(f["runtime"], f["precision"]): f for f in base["forward"] if "error" not in f}
    for f in row["forward"]:
        b = by_pair.get((f["runtime"], f["precision"]))
        if b and "error" not in f:
            out[f"{f['runtime']}-{f['precision']}_batch1_ms"] = f["batch1_ms"] / b["batch1_ms"]
    return out


def table(report: dict) -> str:
    b = report["batch"]
    lines = [f"| model | dim | params (image tower) | weights fp16 | load s | image CPU ms, "
             f"batch 1 | image CPU ms/photo, batch {b} | text ms/prompt (wall) | peak RSS GB |",
             "|" + "---|" * 9]
    for r in report["results"]:
        c = r["cpu"]
        lines.append(
            f"| {r['arch']} ({r['model']}) | {r['embedding_dim']} | {r['params_m']:.0f} M "
            f"({r['image_params_m']:.0f} M) | {r['weights_file_gb_fp16']:.2f} GB | "
            f"{r['load_s']:.1f} | {c['batch1_cpu_ms']:.0f} | "
            f"{c[f'batch{b}_cpu_ms_per_photo']:.0f} | {r['text_ms_per_prompt']:.1f} | "
            f"{r['max_rss_gb']:.1f} |")
        for f in r["forward"]:
            if "error" not in f:
                lines.append(f"|  {r['arch']} {f['runtime']} {f['precision']} (wall) | | | | | "
                             f"{f['batch1_ms']:.0f} | {1e3 / f['batched_photos_per_s']:.0f} | | |")
    return "\n".join(lines)


def run_models(args: argparse.Namespace) -> int:
    """``biolit-id bench --models``: both architectures side by side, JSON beside ``--out``."""
    pairs = parse_pairs(args.models_runtimes) if args.models_runtimes else ()
    folder = args.out.parent
    report = compare_models(folder / "models", pairs=pairs, photos=args.photos,
                            repeats=args.repeats, batch=8)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench-models.json").write_text(json.dumps(report, indent=2), "utf-8")
    print(table(report))
    return 0
