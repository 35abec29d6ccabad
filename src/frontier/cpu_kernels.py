"""Hand-written CPU kernels (C, built on first use with the system C compiler, called by ctypes).

Only what no library here does fast:
* dequantizing torch's CPU int4 layout into a dense weight (`csrc/int4_dequant.c`). Inductor's
  compiled version of the same pass runs ~2 G elements/s on this CPU (partial vector loads of
  32-byte rows) and costs 10-40% of a 512-token bf16 prefill; the C loop, auto-vectorised by the
  compiler for the build machine, reaches about twice that (bench/quant.py, `candidates`);
* dequantizing frontier's bit-packed codes of any width (`csrc/packed_dequant.c`, for
  `quantize.tensors.PackedIntxTensor`: int3, int5, ... and the formats without a kernel);
* few-row (decode) matmuls straight from 4-bit codes where no kernel here reads them at memory
  speed (`csrc/lowbit_gemv.c`): torch's int4 layout with float32 activations (aten's int4 kernel
  takes bf16/fp16 only) and bitsandbytes NF4 without repacking the weight (bitsandbytes' fast CPU
  kernel rewrites it in place at the first forward);
* dequantizing the quantized KV caches (`csrc/kv_dequant.c`: KIVI's packed 2/4-bit codes for
  `frontier.kivi`, int8 rows for `frontier.kvcache`): one pass per tensor into the dense
  keys/values that attention reads.

Shared by `frontier.quantize` and the KV caches, so it sits beside them, not in either.

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
SOURCES = tuple(Path(__file__).with_name("csrc") / f for f in ("int4_dequant.c", "lowbit_gemv.c", "kv_dequant.c",
                                                                     "packed_dequant.c"))
HEADERS = (Path(__file__).with_name("csrc") / "bf16.h",)
# -ffp-contract=off: multiply then add, as torch's vectorised ops (no fused multiply-add rounding)
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared", "-std=c99")
GEMV_MAX_ROWS = 64  # the gemv kernels loop over rows re-reading a cached weight block: for decode shapes
_OUT_SUFFIX = {torch.bfloat16: "bf16", torch.float32: "f32"}  # output dtype -> kernel name suffix


def enabled() -> bool:
    return os.environ.get(ENV, "1").lower() not in ("0", "false", "no")


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor()


def _build(compiler: str, extra: tuple = ()) -> Path:
    flags = FLAGS + tuple(extra)
    src = b"".join(p.read_bytes() for p in SOURCES + HEADERS)
    key = hashlib.sha256(src + " ".join(flags).encode() + compiler.encode() + _cpu_id().encode()).hexdigest()[:16]
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "frontier" / "kernels")
    lib = root / f"frontier_kernels-{key}.so"
    if lib.exists():
        return lib
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=root, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", tmp], check=True, capture_output=True, timeout=120)
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "int4_dequant_t_bf16": [_P] * 5 + [_I] * 3,
    "int4_dequant_t_f32": [_P] * 5 + [_I] * 3,
    "int4_gemv_f32": [_P] * 5 + [_I] * 4,
    "nf4_gemv_f32": [_P] * 5 + [_I, ctypes.c_float] + [_P] * 3 + [_I] * 4,
    "packed_dequant_bf16": [_P] * 4 + [_I] * 4,
    "packed_dequant_f32": [_P] * 4 + [_I] * 4,
    "int8_rows_bf16": [_P] * 3 + [_I] * 2,
    "int8_rows_f32": [_P] * 3 + [_I] * 2,
    **{f"kivi_{what}_{t}": [_P] * 4 + [_I] * 6 for what in ("keys", "values") for t in ("bf16", "f32")},
}


@functools.lru_cache(maxsize=None)
def library(extra_flags: tuple = ()) -> Optional[ctypes.CDLL]:
    """The loaded kernels, or None (disabled, no C compiler, or the build failed). `extra_flags`
    (tests): another build, e.g. ("-mno-avx512f",) for the plain-C loops."""
    if not enabled():
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler, extra_flags)))
    except (OSError, subprocess.SubprocessError):
        return None
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = args
    return lib


def _f32_ok(*ts) -> bool:
    return all(t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu" for t in ts)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def int4_dequant_t(out: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, n: int, k: int,
                   group: int, pre: Optional[torch.Tensor] = None) -> bool:
    """out [K, N] (bf16 or fp32, contiguous) = Wᵀ of torch's CPU int4 layout `qdata` (N % 64 == 0)
    with float32 `scale` / `zero` [K/group, N], each row k times float32 `pre[k]` when given
    (computed in float32, rounded once). False (nothing written) when the kernel cannot run."""
    lib = library() if out.device.type == "cpu" else None
    if (lib is None or out.dtype not in _OUT_SUFFIX or n % 64 or k % group or not out.is_contiguous()
            or out.numel() != n * k or qdata.dtype != torch.uint8 or not qdata.is_contiguous()
            or qdata.numel() * 2 != n * k or not _f32_ok(scale, zero) or scale.numel() != (k // group) * n
            or zero.numel() != scale.numel() or (pre is not None and (not _f32_ok(pre) or pre.numel() != k))):
        return False
    getattr(lib, f"int4_dequant_t_{_OUT_SUFFIX[out.dtype]}")(qdata.data_ptr(), scale.data_ptr(), zero.data_ptr(), None if pre is None else pre.data_ptr(),
                     out.data_ptr(), n, k, group)
    return True


def packed_dequant(out: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                   bits: int, group: int, lib=None) -> bool:
    """out [N, K] (bf16 or fp32, contiguous) = (q - zero) * scale from `PackedIntxTensor` codes
    (`pack_bits` layouts) and float32 scale / zero [N, K/group] (zero None: symmetric); computed in
    float32, rounded once. False (nothing written) when the kernel cannot run."""
    lib = (lib or library()) if out.device.type == "cpu" else None
    if lib is None or out.dtype not in _OUT_SUFFIX or out.dim() != 2 or not out.is_contiguous() or not 1 <= bits <= 8:
        return False
    n, k = out.shape
    nbytes = n * k * bits // 8
    if (k % group or k % 8 or qdata.dtype != torch.uint8 or not qdata.is_contiguous() or qdata.numel() != nbytes
            or not _f32_ok(scale) or scale.numel() != n * (k // group)
            or (zero is not None and (not _f32_ok(zero) or zero.numel() != scale.numel()))):
        return False
    getattr(lib, f"packed_dequant_{_OUT_SUFFIX[out.dtype]}")(
        qdata.data_ptr(), scale.data_ptr(), None if zero is None else zero.data_ptr(), out.data_ptr(), n, k, group, bits)
    return True


def int4_gemv(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, n: int, k: int,
              group: int, lib=None) -> Optional[torch.Tensor]:
    """y [M, N] float32 = x [M, K] (float32) · Wᵀ for torch's CPU int4 layout (N % 64 == 0) with
    float32 `scale` / `zero` [K/group, N]; None when the kernel cannot run."""
    lib = lib or library()
    m = x.shape[0] if x.dim() == 2 else 0
    if (lib is None or not m or m > GEMV_MAX_ROWS or x.shape[1] != k or n % 64 or k % group
            or not _f32_ok(x, scale, zero) or qdata.dtype != torch.uint8 or not qdata.is_contiguous()
            or qdata.numel() * 2 != n * k or scale.numel() != (k // group) * n or zero.numel() != scale.numel()):
        return None
    y = torch.empty(m, n, dtype=torch.float32)
    lib.int4_gemv_f32(qdata.data_ptr(), scale.data_ptr(), zero.data_ptr(), x.data_ptr(), y.data_ptr(), m, n, k, group)
    return y


def nf4_gemv(x: torch.Tensor, packed: torch.Tensor, state, lib=None) -> Optional[torch.Tensor]:
    """y [M, N] float32 = x [M, K] (float32) · Wᵀ for a bitsandbytes NF4 weight (`packed` its uint8
    codes, `state` its QuantState, plain or double-quantized absmax), read where it lies; None when
    the kernel cannot run (another layout, block size, quant type or storage)."""
    lib = lib or library()
    n, k = tuple(state.shape) if len(state.shape) == 2 else (0, 0)
    bs = state.blocksize
    m = x.shape[0] if x.dim() == 2 else 0
    code = state.code
    if (lib is None or not m or m > GEMV_MAX_ROWS or not n or x.shape[1] != k or bs % 32 or k % bs
            or state.quant_type != "nf4" or code is None or code.numel() != 16 or not _f32_ok(x)
            or packed.dtype != torch.uint8 or not packed.is_contiguous() or packed.numel() * 2 != n * k):
        return None
    code = _f32(code)
    if state.nested:
        s2 = state.state2
        if (state.absmax.dtype != torch.uint8 or s2.code is None or s2.code.numel() != 256
                or not state.absmax.is_contiguous()):
            return None
        absmax, aq = None, state.absmax
        code2, absmax2 = _f32(s2.code), _f32(s2.absmax)
        bs2, offset = s2.blocksize, float(state.offset)
    else:
        absmax, aq, code2, absmax2, bs2, offset = _f32(state.absmax), None, None, None, 1, 0.0
    if (absmax if absmax is not None else aq).numel() != n * k // bs:
        return None
    y = torch.empty(m, n, dtype=torch.float32)
    ptr = (lambda t: None if t is None else t.data_ptr())
    lib.nf4_gemv_f32(packed.data_ptr(), ptr(absmax), ptr(aq), ptr(code2), ptr(absmax2), bs2, offset,
                     code.data_ptr(), x.data_ptr(), y.data_ptr(), m, n, k, bs)
    return y


def _kivi_args_ok(out: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int):
    """The output's [T, D] per (batch, head) must be contiguous with one stride between heads."""
    if (out.dtype not in _OUT_SUFFIX or out.device.type != "cpu" or codes.dtype != torch.uint8 or bits not in (2, 4)
            or not codes.is_contiguous() or scale.shape != zero.shape or out.dim() != 4):
        return False
    b, h, t, d = out.shape
    return out.stride(3) == 1 and out.stride(2) == d and (b == 1 or out.stride(0) == h * out.stride(1))


def int8_rows(out: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> bool:
    """out (bf16 or fp32, contiguous, q's shape) = int8 codes q [..., D] times float32 scale
    [..., 1] (one per row), computed in float32 and rounded once; False when it cannot run."""
    lib = library() if out.device.type == "cpu" else None
    if (lib is None or out.dtype not in _OUT_SUFFIX or q.dtype != torch.int8 or out.shape != q.shape
            or not (out.is_contiguous() and q.is_contiguous()) or not _f32_ok(scale)
            or scale.numel() * q.shape[-1] != q.numel()):
        return False
    getattr(lib, f"int8_rows_{_OUT_SUFFIX[out.dtype]}")(q.data_ptr(), scale.data_ptr(), out.data_ptr(),
                                                      scale.numel(), q.shape[-1])
    return True


def kivi_keys(out: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
              group: int) -> bool:
    """out [B, H, n, D] = KIVI keys from codes [B, H, n/per, D] (bit-planes within each group of
    `group` tokens) and scale / zero [B, H, n/group, D]; False (nothing written) when it cannot run."""
    lib = library()
    if lib is None or not _kivi_args_ok(out, codes, scale, zero, bits):
        return False
    b, h, n, d = out.shape
    per = 8 // bits
    if n % group or group % per or codes.shape != (b, h, n // per, d) or scale.shape != (b, h, n // group, d):
        return False
    s, z = _f32(scale), _f32(zero)
    getattr(lib, f"kivi_keys_{_OUT_SUFFIX[out.dtype]}")(codes.data_ptr(), s.data_ptr(), z.data_ptr(), out.data_ptr(),
                                                      b * h, n // group, group // per, d, bits, out.stride(1))
    return True


def kivi_values(out: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                group: int) -> bool:
    """out [B, H, n, D] = KIVI values from codes [B, H, ceil(n/per), D] (byte row r: tokens per·r ..
    per·r + per - 1) and scale / zero [B, H, n, D/group]; False (nothing written) when it cannot run."""
    lib = library()
    if lib is None or not _kivi_args_ok(out, codes, scale, zero, bits):
        return False
    b, h, n, d = out.shape
    per = 8 // bits
    if d % group or codes.shape != (b, h, -(-n // per), d) or scale.shape != (b, h, n, d // group):
        return False
    s, z = _f32(scale), _f32(zero)
    getattr(lib, f"kivi_values_{_OUT_SUFFIX[out.dtype]}")(codes.data_ptr(), s.data_ptr(), z.data_ptr(), out.data_ptr(),
                                                        b * h, n, d, group, bits, out.stride(1))
    return True
