"""Hand-written CPU kernels (C, built on first use with the system C compiler, called by ctypes).

Only what no library here does fast: dequantizing torch's CPU int4 layout into a dense weight
(`csrc/int4_dequant.c`). Inductor's compiled version of the same pass runs ~2 G elements/s on this
CPU (partial vector loads of 32-byte rows) and costs 10-40% of a 512-token bf16 prefill; the C loop,
auto-vectorised by the compiler for the build machine, reaches about twice that
(bench/quant.py, `candidates`).

The shared library is cached per source, flags and CPU under ``$FRONTIER_KERNEL_CACHE`` (default
``~/.cache/frontier/kernels``), written to a temporary name and renamed (parallel jobs may build it
at once). No compiler, a failed build or ``FRONTIER_CPU_KERNELS=0``: `library()` is None and
callers keep their torch paths, which compute the same values (tests compare them bit for bit).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch

ENV = "FRONTIER_CPU_KERNELS"  # 0: never build or use the C kernels
CACHE_ENV = "FRONTIER_KERNEL_CACHE"
SOURCE = Path(__file__).with_name("csrc") / "int4_dequant.c"
# -ffp-contract=off: multiply then add, as torch's vectorised ops (no fused multiply-add rounding)
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared", "-std=c99")


def enabled() -> bool:
    return os.environ.get(ENV, "1").lower() not in ("0", "false", "no")


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor()


def _build(compiler: str) -> Path:
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join(FLAGS).encode() + compiler.encode() + _cpu_id().encode()).hexdigest()[:16]
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "frontier" / "kernels")
    lib = root / f"int4_dequant-{key}.so"
    if lib.exists():
        return lib
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=root, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, timeout=120)
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The loaded kernels, or None (disabled, no C compiler, or the build failed)."""
    if not enabled():
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError):
        return None
    for name in ("int4_dequant_t_bf16", "int4_dequant_t_f32"):
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3
    return lib


def int4_dequant_t(out: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, n: int, k: int,
                   group: int, pre: Optional[torch.Tensor] = None) -> bool:
    """out [K, N] (bf16 or fp32, contiguous) = Wᵀ of torch's CPU int4 layout `qdata` (N % 64 == 0)
    with float32 `scale` / `zero` [K/group, N], each row k times float32 `pre[k]` when given
    (computed in float32, rounded once). False (nothing written) when the kernel cannot run."""
    lib = library() if out.device.type == "cpu" else None
    fn = {torch.bfloat16: "int4_dequant_t_bf16", torch.float32: "int4_dequant_t_f32"}.get(out.dtype)
    if (lib is None or fn is None or n % 64 or k % group or not out.is_contiguous() or out.numel() != n * k
            or qdata.dtype != torch.uint8 or not qdata.is_contiguous() or qdata.numel() * 2 != n * k):
        return False
    for t in (scale, zero):
        if t.dtype != torch.float32 or not t.is_contiguous() or t.numel() != (k // group) * n:
            return False
    if pre is not None and (pre.dtype != torch.float32 or not pre.is_contiguous() or pre.numel() != k):
        return False
    getattr(lib, fn)(qdata.data_ptr(), scale.data_ptr(), zero.data_ptr(), None if pre is None else pre.data_ptr(),
                     out.data_ptr(), n, k, group)
    return True
