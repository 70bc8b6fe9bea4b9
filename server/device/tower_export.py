"""Export the image tower for devices in a child process, never in the serving one.

``torch.onnx.export`` traces the module with fake tensors; done in a thread of
the serving process it disturbs the model thread that is answering photos at
that moment. The child loads the same model, exports into the same cache (the
parent then finds the file there) and runs at the lowest CPU priority.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

EXPORT_TIMEOUT_S = 3600


def export_in_child(model_spec: str, data_dir: Path) -> None:
    """Run ``python -m biolit_id.server.device.tower_export SPEC DATA_DIR``; raises
    RuntimeError with the child's last words when it fails."""
    done = subprocess.run([sys.executable, "-m", __name__, model_spec, str(data_dir)],
                          capture_output=True, text=True, timeout=EXPORT_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"image tower export failed: {done.stderr.strip()[-2000:]}")


def main(argv: list[str]) -> int:
    from biolit_id.server.inference.embedders.export import export_onnx
    from biolit_id.server.inference.model_loader import load_model

    with contextlib.suppress(OSError, AttributeError):  # elsewhere: normal priority
        os.setpriority(os.PRIO_PROCESS, 0, 19)
    spec, data_dir = argv
    export_onnx(load_model(spec), data_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
