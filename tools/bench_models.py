"""BioCLIP (ViT-B-16, 512-d) next to BioCLIP-2 (ViT-L-14, 768-d): what the bigger model costs.

Same photos, same runtimes, same process: for each architecture a random-weight
demo model in the real on-disk format is written (cost does not depend on
weight values), loaded through the service's loader, and timed: load, the
image tower per runtime (``bench_model.bench_forward``: batch 1, batched,
fidelity against torch fp32), the text tower on the catalog's prompts (a
zero-shot start), resident memory and the weights on disk. ``biolit-id
bench`` can call ``compare_models``; ``python -m biolit_id.cli.bench_models``
runs it alone.
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

from biolit_id.cli.bench_common import machine, parse_pairs, timed
from biolit_id.cli.bench_model import bench_forward
from biolit_id.cli.demo_model import WEIGHTS_FILE, write_demo_model
from biolit_id.server.catalog import Catalog
from biolit_id.server.model_loader import load_model
from biolit_id.server.preprocess import ImagePolicy, preprocess

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
    row["forward"] = bench_forward(loaded, list(pairs), work_dir / f"{arch}-runtimes", pixels,
                                   repeats, batch, single_runs)
    row["max_rss_gb"] = _rss_gb()
    del loaded
    gc.collect()
    return row


def compare_models(work_dir: Path, archs: Sequence[str] = ARCHS,
                   pairs: Sequence[tuple[str, str]] = (("torch", "fp32"),),
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
           "text_ms_per_prompt": row["text_ms_per_prompt"] / base["text_ms_per_prompt"]}
    by_pair = {(f["runtime"], f["precision"]): f for f in base["forward"] if "error" not in f}
    for f in row["forward"]:
        b = by_pair.get((f["runtime"], f["precision"]))
        if b and "error" not in f:
            out[f"{f['runtime']}-{f['precision']}_batch1_ms"] = f["batch1_ms"] / b["batch1_ms"]
    return out


def table(report: dict) -> str:
    lines = ["| model | dim | params (image) | load s | runtime | batch 1 ms | photos/s "
             f"(batch {report['batch']}) | text ms/prompt | peak RSS GB |", "|" + "---|" * 9]
    for r in report["results"]:
        for f in r["forward"]:
            if "error" in f:
                continue
            lines.append(
                f"| {r['arch']} ({r['model']}) | {r['embedding_dim']} | {r['params_m']:.0f} M "
                f"({r['image_params_m']:.0f} M) | {r['load_s']:.1f} | {f['runtime']} "
                f"{f['precision']} | {f['batch1_ms']:.0f} | {f['batched_photos_per_s']:.2f} | "
                f"{r['text_ms_per_prompt']:.1f} | {r['max_rss_gb']:.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for models and JSON")
    parser.add_argument("--runtimes", default="torch:fp32",
                        help="runtime:precision pairs, e.g. torch:fp32,openvino:fp32")
    parser.add_argument("--photos", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    report = compare_models(args.out, pairs=parse_pairs(args.runtimes), photos=args.photos,
                            repeats=args.repeats, batch=args.batch)
    (args.out / "bench-models.json").write_text(json.dumps(report, indent=2), "utf-8")
    print(table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
