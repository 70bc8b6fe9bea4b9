"""What this CPU can do, so ``auto`` neither tries emulated bf16 nor reuses a
speed ranking measured on another machine."""

from __future__ import annotations

from pathlib import Path

from biolit_id.server.inference.embedders.threads import available_cores

CPUINFO = Path("/proc/cpuinfo")


def cpu_has_bf16() -> bool:
    """Native bf16 matmuls (AVX512-BF16 or AMX); without them bf16 is emulated and slow."""
    try:
        flags = CPUINFO.read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_has_vnni() -> bool:
    """u8 x s8 int8 dot products without int16 saturation (AVX-VNNI, AVX512-VNNI, AMX).

    Without them ONNX Runtime's u8 x s8 kernel (``vpmaddubsw``) saturates on
    pairs of large products, which costs int8 fidelity; see export.py.
    """
    try:
        flags = CPUINFO.read_text().split()
    except OSError:
        return False
    return any(f in flags for f in ("avx_vnni", "avx512_vnni", "amx_int8"))


def cpu_has_amx_int8() -> bool:
    """AMX int8 tiles: int8 matmuls fast enough that ``auto`` considers int8 at all.

    Without AMX the speed-up is modest and, without VNNI, the kernels may
    saturate, so there int8 stays opt-in (``--precision int8``).
    """
    try:
        flags = CPUINFO.read_text().split()
    except OSError:
        return False
    return "amx_int8" in flags


def cpu_identity() -> str:
    """CPU model and usable cores: a speed ranking measured elsewhere does not apply here."""
    name = ""
    try:
        for line in CPUINFO.read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name or 'unknown cpu'} x{available_cores()}"
