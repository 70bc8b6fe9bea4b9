"""``biolit-id demo-model DIR``: a random-weight model in BioCLIP's on-disk format.

No model hub is reachable from CI, so the real ``local-dir:`` loading path is
exercised on a model with BioCLIP's layout. Its predictions mean nothing.
``--arch ViT-B-16`` (BioCLIP, 512-d) and ``ViT-L-14`` (BioCLIP-2, 768-d) are
what the benchmark times, since cost does not depend on weight values;
full-size weights are stored in fp16; ``--embed-dim`` sets the tiny model's width.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from biolit_id.server.inference.preprocess import CLIP_MEAN, CLIP_STD

# A tiny ViT/text transformer with BioCLIP's interface: 224 px in, 512-d out.
TINY_CONFIG = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 128, "head_width": 64,
                   "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2,
                 "layers": 2},
}
# The architecture of each BioCLIP generation (model cards of imageomics/bioclip[-2]).
BIOCLIP_ARCH = {"hf-hub:imageomics/bioclip": "ViT-B-16", "hf-hub:imageomics/bioclip-2": "ViT-L-14"}
WARNING = (
    "DEMO MODEL: randomly initialised weights. Its embeddings and predictions are "
    "MEANINGLESS; use it only to exercise the software offline."
)
WEIGHTS_FILE = "open_clip_pytorch_model.bin"


def model_config(arch: str, embed_dim: int | None = None) -> dict:
    """open_clip's model_cfg for ``arch`` ("tiny" or an open_clip architecture)."""
    import open_clip

    if arch == "tiny":
        cfg = json.loads(json.dumps(TINY_CONFIG))
    else:
        cfg = open_clip.get_model_config(arch)
        if cfg is None:
            raise SystemExit(f"unknown open_clip architecture {arch!r}")
        cfg = json.loads(json.dumps(cfg))
    if embed_dim is not None:
        if arch != "tiny":
            raise SystemExit("--embed-dim only applies to --arch tiny; "
                             "a real architecture has its own width")
        cfg["embed_dim"] = int(embed_dim)
    return cfg


def write_demo_model(out_dir: Path, arch: str = "tiny", seed: int = 0,
                     embed_dim: int | None = None, dtype: str | None = None) -> Path:
    """Write the model; ``dtype`` defaults to fp32 for "tiny" and fp16 for real architectures."""
    import open_clip
    import torch

    model_cfg = model_config(arch, embed_dim)
    dtype = dtype or ("fp32" if arch == "tiny" else "fp16")
    if dtype not in {"fp32", "fp16"}:
        raise SystemExit(f"--dtype must be fp32 or fp16, not {dtype!r}")
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)},
        "demo": {"arch": arch, "seed": seed, "dtype": dtype, "warning": WARNING},
    }
    (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2), "utf-8")
    state = model.state_dict()
    if dtype == "fp16":
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, out_dir / WEIGHTS_FILE)
    (out_dir / "README.txt").write_text(WARNING + "\n", "utf-8")
    return out_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, help="folder to write (local-dir format)")
    parser.add_argument("--arch", default="tiny",
                        help="'tiny' (default, fast), or an open_clip architecture: ViT-B-16 "
                             "(BioCLIP, 512-d), ViT-L-14 (BioCLIP-2, 768-d)")
    parser.add_argument("--embed-dim", type=int, default=None,
                        help="embedding width of the tiny model (default 512)")
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default=None,
                        help="stored weight precision (default fp32 for tiny, fp16 otherwise)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    path = write_demo_model(args.dir, args.arch, args.seed, args.embed_dim, args.dtype)
    dim = model_config(args.arch, args.embed_dim)["embed_dim"]
    print(f"wrote {args.arch} demo model ({dim}-d embeddings) to {path}")
    print(f"use it with --model local-dir:{path}")
    print("!" * 78 + "\n" + WARNING + "\n" + "!" * 78)
    return 0
