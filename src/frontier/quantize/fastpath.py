"""Quantized linears that pick their computation by shape: one path for quality, cost and training.

CPU low-bit kernels (torch's `_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) are built for
decode: at one token they stream the low-bit bytes, at prefill or training sizes they cost
20-85x a dense matmul (issue 15). A prefill is compute-bound, so dequantizing a weight costs
little next to the matmul that uses it. Every weight-only tensor type therefore runs:

* rows (tokens x batch) <= `DECODE_MAX_ROWS`: the fastest low-bit kernel measured here for the
  activation dtype (`decode_kernel`; bench/quant.py times every candidate per shape);
* more rows, or no kernel for that dtype: the weight dequantized on the fly to the activation
  dtype (`dense`), a dense `F.linear`, and the dense weight dropped: at most one layer's dense
  weight is alive at a time, nothing is cached on the module or the tensor.

Backward (LoRA / attention transfer through frozen quantized linears): `_QLinear` computes
grad_x = grad_y @ W with W dequantized again inside backward (no dense copy saved for it);
AWQ's activation pre-scale is applied outside it, so autograd differentiates it as usual.

Formats: frontier `Int8RowTensor` (int8, per-row scale), torchao `Int4OpaqueTensor` (packed
int4 in the CPU kernel's layout, dequantized by the C kernel of `cpu_kernels`, else by a
torch.compile'd pass, else eagerly through `int4_opaque_codes`: the same values), frontier
`PackedIntxTensor` (any bits, no decode kernel: always dequantized, by the C kernel of
`cpu_kernels`, else a compiled pass, else eagerly), bitsandbytes NF4 (`NF4Linear`,
dequantized by bitsandbytes' own CPU kernel). Decode kernels where aten has none: the C gemvs of
`cpu_kernels` (int4 with fp32 activations, NF4 without bitsandbytes' in-place repack). Activation-quantized types (w8a8, fp8) keep
their kernels and are not routed here.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import cpu_kernels

aten = torch.ops.aten
DECODE_MAX_ROWS = 8  # crossover measured here (bf16, 1 thread): int4/int8 kernels ~0.02 ms per row per
# 1536x576 layer on top of ~0.05 ms, a dequantize + dense matmul ~0.25-0.3 ms whatever the rows
HALF = (torch.bfloat16, torch.float16)


# ------------------------------------------------------------------ int4: the CPU kernel's packed layout
def _unpack_int4_layout(flat: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """[N, K] uint8 codes from `aten._convert_weight_to_int4pack_for_cpu`'s output (as observed on
    this build, checked by `_int4_layout_ok`): blocks of 64 rows stored [K, 32] bytes, byte j
    holding row j (low nibble) and row 32 + j (high nibble); a tail of n % 64 rows stored
    [K, tail / 2] bytes, byte i holding rows 2i (low) and 2i + 1 (high)."""
    flat = flat.reshape(-1)
    nf = n - n % 64
    parts = []
    if nf:
        blk = flat[: nf * k // 2].view(nf // 64, k, 32)
        parts.append(torch.stack([blk & 15, blk >> 4], 1).transpose(-1, -2).reshape(nf, k))
    t = n - nf
    if t:
        blk = flat[nf * k // 2:].view(k, t // 2)
        parts.append(torch.stack([blk & 15, blk >> 4], -1).reshape(k, t).t())
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@functools.lru_cache(maxsize=None)
def _int4_layout_ok(tail: int) -> bool:
    """Whether `_unpack_int4_layout` inverts the aten packing for row counts with this n % 64."""
    n = 64 + tail
    q = torch.randint(0, 16, (n, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(tail))
    try:
        packed = aten._convert_weight_to_int4pack_for_cpu(q, 1)
        return torch.equal(_unpack_int4_layout(packed, n, 64).to(torch.int32), q)
    except Exception:  # noqa: BLE001 - another layout (or no CPU int4 op): use the kernel to dequantize
        return False


def int4_opaque_codes(w) -> Optional[torch.Tensor]:
    """[N, K] uint8 codes (0..15) of a torchao `Int4OpaqueTensor`, or None if its layout is unknown."""
    n, k = w.shape
    if w.qdata.dtype != torch.uint8 or w.qdata.numel() * 2 != n * k or not _int4_layout_ok(n % 64):
        return None
    return _unpack_int4_layout(w.qdata, n, k)


# ------------------------------------------------------------------ dequantize on the fly
COMPILE_ENV = "FRONTIER_QUANT_COMPILE"  # 0: never torch.compile the dequantize / decode kernels (eager only)
COMPILE_MIN_WEIGHTS = 1 << 16  # smaller weights (test models) dequantize eagerly, without compiling
_SHIFT4 = torch.tensor([0, 4], dtype=torch.uint8).view(1, 1, 2, 1)
_SCRATCH: dict = {}
_FAILED: set = set()


def _int8_deq(out, q, s):
    out.copy_(q.to(torch.float32) * s.to(torch.float32).unsqueeze(-1))


def _int4_deq_t(out, blk_t, s, z, shift, g: int):
    """out [K, N/64, 2, 32] (= Wᵀ) from the CPU int4 layout's bytes transposed to [K, N/64, 1, 32]
    (N % 64 == 0), in one fused pass: (code - 8) * scale + zero."""
    k, nb = out.shape[0], out.shape[1]
    q = ((blk_t >> shift) & 15).to(torch.float32)
    s = s.view(k // g, 1, nb, 2, 32).expand(k // g, g, nb, 2, 32).reshape(k, nb, 2, 32)
    z = z.view(k // g, 1, nb, 2, 32).expand(k // g, g, nb, 2, 32).reshape(k, nb, 2, 32)
    out.copy_((q - 8.0) * s + z)


def _packed_deq(out, qdata, scale, zero, bits: int, g: int):
    """out [N, K] from `PackedIntxTensor` codes (`tensors.pack_bits` layouts) in one fused pass;
    zero None: symmetric (2**(bits-1))."""
    n, k = out.shape
    if 8 % bits == 0:  # several codes per byte: [N, K*bits/8]
        per = 8 // bits
        b = qdata.view(n, k // per)
        q = torch.stack([(b >> (i * bits)) & (2 ** bits - 1) for i in range(per)], -1)
    else:  # bit-planes: [bits, N, K/8], plane j holding bit j of 8 codes per byte
        planes = qdata.view(bits, n, k // 8)
        q = torch.stack([sum(((planes[j] >> i) & 1) << j for j in range(bits)) for i in range(8)], -1)
    q = q.reshape(n, k // g, g).to(torch.float32)
    z = zero.to(torch.float32).unsqueeze(-1) if zero is not None else float(2 ** (bits - 1))
    out.copy_(((q - z) * scale.to(torch.float32).unsqueeze(-1)).view(n, k))


def _int8_reduce(x, q, s):
    """Few-row matmul on int8 rows as a reduction Inductor vectorises (fp32 accumulation)."""
    return ((x.to(torch.float32).unsqueeze(-2) * q.to(torch.float32)).sum(-1) * s.to(torch.float32)).to(x.dtype)


def compile_enabled() -> bool:
    import os

    return os.environ.get(COMPILE_ENV, "1").lower() not in ("0", "false", "no")


@functools.lru_cache(maxsize=None)
def _compiled(fn_name: str):
    """torch.compile (Inductor, dynamic shapes, no `freezing`: the weights are graph inputs, never
    constants folded into a dense copy)."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):  # one graph per layer shape and grad mode
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    return torch.compile(globals()[fn_name], dynamic=None if fn_name == "_int8_reduce" else False)


def _run_compiled(fn_name: str, *args):
    """(True, result) of a compiled kernel; (False, None) when compiling is off or fails (then
    eager from there on)."""
    if fn_name in _FAILED or not compile_enabled():
        return False, None
    try:
        return True, _compiled(fn_name)(*args)
    except Exception:  # noqa: BLE001 - no C++ compiler, unsupported build...: eager
        _FAILED.add(fn_name)
        return False, None


def _buffer(numel: int, dtype, scratch: bool) -> torch.Tensor:
    """Room for one dense weight: the shared scratch (forward/backward: overwritten by the next
    layer, so at most one layer's dense weight exists) or a fresh tensor (`dense`). One buffer per
    dtype (uint8: the int4 kernel's transposed bytes); reusing it also spares the page faults of a
    fresh multi-hundred-kilobyte tensor per call."""
    if not scratch:
        return torch.empty(numel, dtype=dtype)
    buf = _SCRATCH.get(dtype)
    if buf is None or buf.numel() < numel:
        _SCRATCH.pop(dtype, None)
        with torch.inference_mode(False):  # a normal tensor: writable inside and outside inference mode
            buf = _SCRATCH[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def scratch_bytes() -> int:
    """Bytes held by the shared dequantize scratch (one buffer per dtype, the largest layer's size)."""
    return sum(b.numel() * b.element_size() for b in _SCRATCH.values())


def _int4_scale_zero(w):
    """float32 contiguous (scale, zero) [K/g, N] of an `Int4OpaqueTensor`, as the C kernels take them."""
    sz = w.scale_and_zero  # [K/g, N, 2]
    return sz[..., 0].to(torch.float32).contiguous(), sz[..., 1].to(torch.float32).contiguous()


def _int4_dense(w, dtype, scratch: bool) -> torch.Tensor:
    n, k = w.shape
    g = w.block_size[1]
    sz = w.scale_and_zero  # [K/g, N, 2]: W = (q - 8) * scale + zero
    if (w.device.type == "cpu" and n % 64 == 0 and n * k >= COMPILE_MIN_WEIGHTS and w.qdata.dtype == torch.uint8
            and w.qdata.numel() * 2 == n * k and _int4_layout_ok(0)):
        out = _buffer(n * k, dtype, scratch).view(k, n // 64, 2, 32)
        s, z = _int4_scale_zero(w)
        if cpu_kernels.int4_dequant_t(out.view(k, n), w.qdata, s, z, n, k, g):  # the C kernel: ~2x Inductor's
            return out.view(k, n).t()
        blk_t = _buffer(n * k // 2, torch.uint8, scratch).view(k, n // 64, 1, 32)  # bytes only: 1/4 of the output
        blk_t.copy_(w.qdata.view(n // 64, k, 1, 32).transpose(0, 1))
        if _run_compiled("_int4_deq_t", out, blk_t, s, z, _SHIFT4, g)[0]:
            return out.view(k, n).t()
    q = int4_opaque_codes(w)
    if q is None:  # unknown layout: ask the kernel, Wᵀ = kernel(I)
        eye = torch.eye(k, dtype=sz.dtype, device=w.device)
        return aten._weight_int4pack_mm_for_cpu(eye, w.qdata, g, sz)[:, :n].t().to(dtype)
    sz = sz.to(torch.float32)
    s, z = sz[..., 0].t().unsqueeze(-1), sz[..., 1].t().unsqueeze(-1)
    return ((q.view(n, k // g, g).to(torch.float32) - 8.0) * s + z).view(n, k).to(dtype)


def _int8_dense(w, dtype, scratch: bool) -> torch.Tensor:
    n, k = w.shape
    if n * k >= COMPILE_MIN_WEIGHTS:
        out = _buffer(n * k, dtype, scratch).view(n, k)
        if _run_compiled("_int8_deq", out, w.qdata, w.scale)[0]:
            return out
    return (w.qdata.to(torch.float32) * w.scale.to(torch.float32).unsqueeze(-1)).to(dtype)


def _dense(w, dtype, scratch: bool) -> torch.Tensor:
    name = type(w).__name__
    if name == "Int8RowTensor":
        return _int8_dense(w, dtype, scratch)
    if name == "Int4OpaqueTensor":
        return _int4_dense(w, dtype, scratch)
    if name == "PackedIntxTensor" and w.device.type == "cpu" and w.shape[0] * w.shape[1] >= COMPILE_MIN_WEIGHTS:
        n, k = w.shape
        out = _buffer(n * k, dtype, scratch).view(n, k)
        zero = None if w.zero_point is None else w.zero_point.to(torch.float32).contiguous()
        if cpu_kernels.packed_dequant(out, w.qdata, w.scale.to(torch.float32).contiguous(), zero, w.bits,
                                      w.group_size):
            return out
        if _run_compiled("_packed_deq", out, w.qdata, w.scale, w.zero_point, w.bits, w.group_size)[0]:
            return out
    if hasattr(w, "dequantize"):
        return w.dequantize(dtype).to(dtype)
    raise TypeError(f"{name}: no way to dequantize")


def dense(w, dtype) -> torch.Tensor:
    """[N, K] weight of a weight-only quantized tensor in `dtype`, a fresh tensor (AWQ's activation
    pre-scale is not folded in: the linear applies it to the input)."""
    return _dense(w, dtype, scratch=False)


# ------------------------------------------------------------------ decode kernels
def _int8_pack(x2, w):
    return aten._weight_int8pack_mm(x2.contiguous(), w.qdata, w.scale.to(x2.dtype))


def _int4_pack(x2, w):
    sz = w.scale_and_zero
    return aten._weight_int4pack_mm_for_cpu(x2.contiguous(), w.qdata, w.block_size[1],
                                            sz if sz.dtype == x2.dtype else sz.to(x2.dtype))[:, :w.shape[0]]


def _dequant_matmul(x2, w):
    return F.linear(x2, _dense(w, x2.dtype, scratch=True))


def _int4_gemv(x2, w):
    """The C kernel reading the int4 layout where it lies, float32 accumulation (the fp32 choice:
    aten's int4 kernel takes bf16/fp16 activations only)."""
    n, k = w.shape
    y = None
    if w.device.type == "cpu" and _int4_layout_ok(0):
        y = cpu_kernels.int4_gemv(x2.to(torch.float32).contiguous(), w.qdata, *_int4_scale_zero(w), n, k,
                                  w.block_size[1])
    return y.to(x2.dtype) if y is not None else _dequant_matmul(x2, w)


def _nf4_gemv(x2, w):
    """NF4 codes read where they lie (float32 accumulation), without bitsandbytes' in-place repack."""
    y = cpu_kernels.nf4_gemv(x2.to(torch.float32).contiguous(), w.p.data, w.p.quant_state)
    return y.to(x2.dtype) if y is not None else _dequant_matmul(x2, w)


def _int8_compiled(x2, w):
    ok, y = _run_compiled("_int8_reduce", x2, w.qdata, w.scale)
    return y if ok else _dequant_matmul(x2, w)


# candidates per tensor type: {name: fn(x2d, w) -> y2d}; bench/quant.py times them all per shape
CANDIDATES: dict = {
    "Int8RowTensor": {"int8pack_mm (aten)": _int8_pack, "dequant+matmul": _dequant_matmul,
                      "int8 reduction (torch.compile)": _int8_compiled},
    "Int4OpaqueTensor": {"int4pack_mm (aten)": _int4_pack, "dequant+matmul": _dequant_matmul,
                         "int4 gemv (C, fp32 activations)": _int4_gemv},
    "PackedIntxTensor": {"dequant+matmul": _dequant_matmul},
    "NF4": {"dequant+matmul": _dequant_matmul, "nf4 gemv (C)": _nf4_gemv},
}
DECODE_ONLY = {"int4 gemv (C, fp32 activations)", "nf4 gemv (C)"}  # few-row kernels (more rows: dequant+matmul)
# the choice at <= DECODE_MAX_ROWS rows, by (type, half-precision activations?): measured in bench/quant.py
DECODE_CHOICE: dict = {
    ("Int8RowTensor", True): "int8pack_mm (aten)",
    ("Int8RowTensor", False): "int8 reduction (torch.compile)",
    ("Int4OpaqueTensor", True): "int4pack_mm (aten)",
    ("Int4OpaqueTensor", False): "int4 gemv (C, fp32 activations)",
    ("NF4", True): "nf4 gemv (C)",
    ("NF4", False): "nf4 gemv (C)",
}


def decode_kernel(w, dtype) -> Callable:
    name = _type_name(w)
    pick = DECODE_CHOICE.get((name, dtype in HALF), "dequant+matmul")
    return CANDIDATES.get(name, CANDIDATES["PackedIntxTensor"])[pick]


def _type_name(w) -> str:
    return "NF4" if isinstance(w, _NF4Weight) else type(w).__name__


def forward(x: torch.Tensor, w, bias=None) -> torch.Tensor:
    """y = x Wᵀ + b by shape: the decode kernel at <= DECODE_MAX_ROWS rows on CPU, else dequantize
    + dense matmul. No autograd (see `linear`)."""
    n, k = w.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.device.type == "cpu" and 0 < x2.shape[0] <= DECODE_MAX_ROWS:
        y = decode_kernel(w, x2.dtype)(x2, w)
    else:
        y = F.linear(x2, _dense(w, x2.dtype, scratch=True))
    y = y.reshape(*lead, n)
    return y + bias.to(y.dtype) if bias is not None else y


class _Hold:
    """Keeps the quantized weight out of autograd's tensor arguments (it is not differentiated)."""

    __slots__ = ("w",)

    def __init__(self, w):
        self.w = w


class _QLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, hold):  # noqa: D401 - autograd.Function API
        ctx.hold = hold
        ctx.bias_grad = bias is not None and bias.requires_grad
        with torch.no_grad():
            return forward(x, hold.w, bias)

    @staticmethod
    def backward(ctx, grad):
        gx = grad @ _dense(ctx.hold.w, grad.dtype, scratch=True)  # dequantized on the fly into the scratch
        gb = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.bias_grad else None
        return gx, gb, None


def _int4_prescaled(x: torch.Tensor, w, pre: torch.Tensor) -> Optional[torch.Tensor]:
    """x·diag(pre)·Wᵀ with `pre` folded into the dequantized int4 weight by the C kernel (prefill
    shapes, no autograd): one pass fewer than scaling the activations (AWQ's pre-scale costs a
    pass over x for every linear otherwise). None when the kernel does not apply."""
    n, k = w.shape
    if (type(w).__name__ != "Int4OpaqueTensor" or x.device.type != "cpu" or x.dtype not in (torch.bfloat16,
                                                                                           torch.float32)
            or x.numel() // k <= DECODE_MAX_ROWS or n % 64 or n * k < COMPILE_MIN_WEIGHTS or not _int4_layout_ok(0)):
        return None
    out = _buffer(n * k, x.dtype, True).view(k, n)
    s, z = _int4_scale_zero(w)
    if not cpu_kernels.int4_dequant_t(out, w.qdata, s, z, n, k, w.block_size[1], pre.to(torch.float32).contiguous()):
        return None
    return F.linear(x.reshape(-1, k), out.t()).reshape(*x.shape[:-1], n)


def linear(x: torch.Tensor, w, bias=None) -> torch.Tensor:
    """`F.linear` for a weight-only quantized tensor: shape-dispatched, differentiable w.r.t. x and bias."""
    grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
    pre = getattr(w, "act_pre_scale", None)
    if pre is not None:  # AWQ: x / s before the scaled weight
        y = None if grad else _int4_prescaled(x, w, pre)
        if y is not None:
            return y + bias.to(y.dtype) if bias is not None else y
        x = x * pre.to(x.dtype)
    if grad:
        return _QLinear.apply(x, bias, _Hold(w))
    return forward(x, w, bias)


# ------------------------------------------------------------------ torchao Int4OpaqueTensor
def register_int4_opaque() -> None:
    """Route torchao `Int4OpaqueTensor`'s weight-only linear (A16W4) through `linear`; its DA8W4
    form (dynamic int8 activations) keeps torchao's kernel."""
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor

    table = Int4OpaqueTensor._ATEN_OP_TABLE[Int4OpaqueTensor]
    original = table[aten.linear.default]
    if getattr(original, "_frontier", False):
        return

    def _linear(func, types, args, kwargs):
        x, w = args[0], args[1]
        bias = args[2] if len(args) > 2 else (kwargs or {}).get("bias")
        if w.act_mapping_type is not None or x.device.type != "cpu":
            return original(func, types, args, kwargs)
        return linear(x, w, bias)

    _linear._frontier = True
    table[aten.linear.default] = _linear
    Int4OpaqueTensor._TORCH_FN_TABLE[Int4OpaqueTensor][F.linear] = _linear


# ------------------------------------------------------------------ bitsandbytes NF4
class _NF4Weight:
    """A bitsandbytes `Params4bit` seen as a weight-only quantized [N, K] tensor."""

    __slots__ = ("p", "shape", "act_pre_scale")

    def __init__(self, p):
        self.p = p
        self.shape = tuple(p.quant_state.shape)
        self.act_pre_scale = None

    def dequantize(self, dtype):
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(self.p.data, self.p.quant_state).to(dtype)


def nf4_class():
    """`NF4Linear`: bitsandbytes' `Linear4bit` (same parameters, state dict and checkpoint) whose
    forward is `linear` (bitsandbytes' own CPU inference path repacks the weight in place at
    the first forward, turns the activations into bf16 and the absmax into bf16)."""
    global NF4Linear
    if NF4Linear is None:
        import bitsandbytes as bnb

        class _NF4Linear(bnb.nn.Linear4bit):
            def forward(self, x):
                from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

                fix_4bit_weight_quant_state_from_module(self)
                if x.device.type != "cpu":
                    return super().forward(x)
                return linear(x, _NF4Weight(self.weight), self.bias)

        _NF4Linear.__name__ = _NF4Linear.__qualname__ = "NF4Linear"
        NF4Linear = _NF4Linear
    return NF4Linear


NF4Linear = None
