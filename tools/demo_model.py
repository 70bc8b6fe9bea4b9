"""``biolit-id demo-model DIR``: a random-weight model in BioCLIP's on-disk format.

No model hub is reachable from CI or these machines, so the real loading path
(``local-dir:`` -> open_clip) is exercised on a model with BioCLIP's layout:
``open_clip_config.json`` (model_cfg + preprocess_cfg) and
``open_clip_pytorch_model.bin``, 512-d embeddings. Its predictions mean
nothing. ``--arch ViT-B-16`` writes a full-size one: cost does not depend on
weight values, so it is what the benchmark times.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from biolit_id.server.preprocess import CLIP_MEAN, CLIP_STD

# A tiny ViT/text transformer with BioCLIP's interface: 224 px in, 512-d out.
TINY_CONFIG = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 128, "head_width": 64,
                   "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2,
                 "layers": 2},
}
WARNING = (
    "DEMO MODEL: randomly initialised weights. Its embeddings and predictions are "
    "MEANINGLESS; use it only to exercise the software offline."
)


def write_demo_model(out_dir: Path, arch: str = "tiny", seed: int = 0) -> Path:
    import open_clip
    import torch

    if arch == "tiny":
        model_cfg = json.loads(json.dumps(TINY_CONFIG))
    else:
        model_cfg = open_clip.get_model_config(arch)
        if model_cfg is None:
            raise SystemExit(f"unknown open_clip architecture {arch!r}")
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)},
        "demo": {"arch": arch, "seed": seed, "warning": WARNING},
    }
    (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2), "utf-8")
    torch.save(model.state_dict(), out_dir / "open_clip_pytorch_model.bin")
    (out_dir / "README.txt").write_text(WARNING + "\n", "utf-8")
    return out_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, help="folder to write (local-dir format)")
    parser.add_argument("--arch", default="tiny",
                        help="'tiny' (default, fast) or an open_clip architecture, e.g. ViT-B-16")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    path = write_demo_model(args.dir, args.arch, args.seed)
    print(f"wrote {args.arch} demo model to {path}")
    print(f"use it with --model local-dir:{path}")
    print("!" * 78 + "\n" + WARNING + "\n" + "!" * 78)
    return 0
