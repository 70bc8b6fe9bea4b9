"""Installing biolit-id claims one import name, and the wheel carries every module."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Folder on disk -> where its modules live in the installed package.
MAPPED = {"proto": "biolit_id/proto", "index": "biolit_id/index", "server": "biolit_id/server",
          "tools": "biolit_id/cli"}


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> set[str]:
    # Built from a copy: setuptools' build/ folder would otherwise keep deleted modules.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for folder in ("proto", "index", "server", "tools"):
        shutil.copytree(ROOT / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(src)], check=True, capture_output=True)
    (wheel,) = out.glob("biolit_id-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def test_the_wheel_installs_one_top_level_package(wheel_names: set[str]) -> None:
    tops = {name.split("/", 1)[0] for name in wheel_names if ".dist-info/" not in name}
    assert tops == {"biolit_id"}


def test_every_module_and_data_file_is_in_the_wheel(wheel_names: set[str]) -> None:
    expected = set()
    for folder, package in MAPPED.items():
        for path in (ROOT / folder).rglob("*"):
            if path.suffix not in {".py", ".json", ".proto", ".pyi"} or "__pycache__" in path.parts:
                continue
            rel = path.relative_to(ROOT / folder)
            expected.add(f"{package}/{rel.as_posix()}")
    missing = sorted(expected - wheel_names)
    assert not missing, f"not packaged (add them to [tool.setuptools] packages): {missing}"

