"""Integer codes of a quantized weight, and the tensor types that store them.

Every weight-only method here (RTN, HQQ, GPTQ, AWQ) ends in the same place: integer codes
``q`` with a scale and a zero point per group of ``group_size`` input columns,

    W[n, k] ≈ (q[n, k] - zero[n, k // g]) * scale[n, k // g].

RTN, GPTQ and AWQ's clipping search choose that grid in one place, `choose_qparams`
(torchao's asymmetric affine mapping, whose range always holds 0; or frontier's symmetric
convention), and round with `quantize_with` (torchao's quantize_affine).

`pack` turns codes into the tensor a `nn.Linear` keeps as its weight:

* 4 bits, groups of 32/64/128, CPU: torchao's `Int4OpaqueTensor` (real packed int4, the
  `aten._weight_int4pack_mm_for_cpu` kernel at decode; "kernel" storage);
* 8 bits, symmetric, one scale per output row, CPU: `Int8RowTensor` (int8, the
  `aten._weight_int8pack_mm` kernel at decode with bf16 activations; "kernel" storage);
* anything else (3, 5, 6, 7 bits, other group sizes, asymmetric int8, CUDA):
  `PackedIntxTensor`, codes bit-packed to exactly ``bits`` bits per weight plus scales and
  zero points, dequantized on the fly inside `F.linear` ("dequant" storage).

Both frontier tensor types are torchao `TorchAOBaseTensor`s (flatten/unflatten, `.to`,
`detach`, `dequantize()`), carry an optional ``act_pre_scale`` (AWQ multiplies activations
by it), and are registered as safe globals for `torch.load(weights_only=True)`. Their linear,
and torchao `Int4OpaqueTensor`'s, is `fastpath.linear`: the kernel for a few rows, dequantize
on the fly + dense matmul for many, differentiable w.r.t. the input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torchao.utils import TorchAOBaseTensor

from . import fastpath

aten = torch.ops.aten
INT4_KERNEL_GROUPS = (32, 64, 128)


# ------------------------------------------------------------------ codes
@dataclass
class Codes:
    """Group-quantized [N, K] weight: W ≈ (q - zero) * scale per group of `group_size` columns."""

    q: torch.Tensor  # [N, K] uint8, values 0 .. 2**bits - 1
    scale: torch.Tensor  # [N, K // group_size] float32
    zero: torch.Tensor  # [N, K // group_size] float32, in code units (2**(bits-1) when symmetric)
    bits: int
    group_size: int  # == K for one scale per output row
    symmetric: bool

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        n, k = self.q.shape
        g = self.group_size
        q = self.q.to(torch.float32).view(n, k // g, g)
        w = (q - self.zero.to(torch.float32).unsqueeze(-1)) * self.scale.to(torch.float32).unsqueeze(-1)
        return w.view(n, k).to(dtype)


EPS = torch.finfo(torch.float32).smallest_normal  # torchao's default minimum scale for fp32 inputs


def choose_qparams(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid of each row of `w` [..., g] (float32): (scale, zero) of shape [...], zero in code units.

    Asymmetric: torchao's ``choose_qparams_affine(MappingType.ASYMMETRIC)`` for uint codes
    0 .. 2**bits - 1: the range always contains 0, [min(w, 0), max(w, 0)], so a group whose
    weights share one sign is covered to its extreme value (a range [min, max] with the zero
    point clamped into the code range would clip it); scale = range / (2**bits - 1), clamped
    at ``EPS``; integer zero point round(-min(w, 0) / scale), which lies in the code range.
    This is also the grid of GPTQ's released quantizer.

    Symmetric (frontier's convention): torchao's ``MappingType.SYMMETRIC`` on the restricted
    signed range ±(2**(bits-1) - 1), i.e. scale = max|w| / (2**(bits-1) - 1) (the absmax/127
    of int8 per-row kernels), stored as unsigned codes with zero = 2**(bits-1). torchao's
    default full range [-2**(bits-1), 2**(bits-1) - 1] divides by 2**(bits-1) - 0.5 instead.
    """
    w = w.to(torch.float32)
    if symmetric:
        scale = (w.abs().amax(-1) / (2 ** (bits - 1) - 1)).clamp(min=EPS)
        return scale, torch.full_like(scale, float(2 ** (bits - 1)))
    qmax = 2 ** bits - 1
    lo = torch.clamp(w.amin(-1), max=0.0)
    hi = torch.clamp(w.amax(-1), min=0.0)
    scale = ((hi - lo) / qmax).clamp(min=EPS)
    zero = torch.clamp(-torch.round(lo / scale), 0, qmax)
    return scale, zero


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of `w` for a scale and zero that broadcast against it (as torchao's quantize_affine:
    round(w * (1 / scale)) + zero, clamped to 0 .. 2**bits - 1)."""
    return torch.clamp(torch.round(w * (1.0 / scale)) + zero, 0, 2 ** bits - 1)


# ------------------------------------------------------------------ bit packing
def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack [N, K] codes (< 2**bits) into exactly `bits` bits each.

    Widths dividing 8 (1, 2, 4, 8) pack several codes per byte: [N, K*bits/8]. Other widths
    use bit-planes: [bits, N, K/8], plane b holding bit b of 8 codes per byte.
    """
    n, k = q.shape
    q = q.to(torch.uint8)
    if bits == 8:
        return q.contiguous()
    if 8 % bits == 0:
        per = 8 // bits
        if k % per:
            raise ValueError(f"K={k} is not a multiple of {per} for {bits}-bit packing")
        shifts = (torch.arange(per, device=q.device, dtype=torch.uint8) * bits)
        return (q.view(n, k // per, per) << shifts).sum(-1, dtype=torch.int32).to(torch.uint8)
    if k % 8:
        raise ValueError(f"K={k} is not a multiple of 8 for {bits}-bit bit-plane packing")
    shifts = torch.arange(8, device=q.device, dtype=torch.uint8)
    g = q.view(n, k // 8, 8)
    planes = [(((g >> b) & 1) << shifts).sum(-1, dtype=torch.int32).to(torch.uint8) for b in range(bits)]
    return torch.stack(planes)


def unpack_bits(packed: torch.Tensor, bits: int, shape) -> torch.Tensor:
    """Inverse of `pack_bits`: [N, K] uint8 codes."""
    n, k = shape
    if bits == 8:
        return packed
    if 8 % bits == 0:
        per = 8 // bits
        shifts = (torch.arange(per, device=packed.device, dtype=torch.uint8) * bits)
        return ((packed.unsqueeze(-1) >> shifts) & (2 ** bits - 1)).view(n, k)
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    out = torch.zeros(n, k // 8, 8, dtype=torch.uint8, device=packed.device)
    for b in range(bits):
        out |= ((packed[b].unsqueeze(-1) >> shifts) & 1) << b
    return out.view(n, k)


# ------------------------------------------------------------------ dequantize-on-the-fly tensor
class PackedIntxTensor(TorchAOBaseTensor):
    """N-bit group-quantized weight, bit-packed; dequantized inside `F.linear` ("dequant" storage).

    qdata: packed codes (see `pack_bits`); scale: [N, G] in the model dtype; zero_point:
    [N, G] in the model dtype, or None for symmetric codes (zero = 2**(bits-1));
    act_pre_scale: [K] or None (AWQ).
    """

    tensor_data_names = ["qdata", "scale"]
    tensor_attribute_names = ["bits", "group_size", "shape"]
    optional_tensor_data_names = ["zero_point", "act_pre_scale"]

    def __new__(cls, qdata, scale, bits, group_size, shape, zero_point=None, act_pre_scale=None):
        return torch.Tensor._make_wrapper_subclass(cls, torch.Size(shape), dtype=scale.dtype, device=qdata.device,
                                                   requires_grad=False)

    def __init__(self, qdata, scale, bits, group_size, shape, zero_point=None, act_pre_scale=None):
        super().__init__()
        self.qdata = qdata
        self.scale = scale
        self.bits = int(bits)
        self.group_size = int(group_size)
        self.zero_point = zero_point
        self.act_pre_scale = act_pre_scale

    def _quantization_type(self):
        return f"bits={self.bits}, group_size={self.group_size}, symmetric={self.zero_point is None}"

    @classmethod
    def from_codes(cls, c: Codes, dtype) -> "PackedIntxTensor":
        n, k = c.q.shape
        zero = None if c.symmetric else c.zero.to(dtype)
        return cls(pack_bits(c.q, c.bits), c.scale.to(dtype), c.bits, c.group_size, torch.Size([n, k]),
                   zero_point=zero)

    def codes(self) -> torch.Tensor:
        return unpack_bits(self.qdata, self.bits, self.shape)

    def dequantize(self, output_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        n, k = self.shape
        g = self.group_size
        q = self.codes().to(torch.float32).view(n, k // g, g)
        zero = (self.zero_point.to(torch.float32) if self.zero_point is not None
                else torch.full_like(self.scale, 2 ** (self.bits - 1), dtype=torch.float32))
        w = (q - zero.unsqueeze(-1)) * self.scale.to(torch.float32).unsqueeze(-1)
        return w.view(n, k).to(output_dtype or self.dtype)


# ------------------------------------------------------------------ int8 row-wise kernel tensor
class Int8RowTensor(TorchAOBaseTensor):
    """Symmetric int8 weight, one scale per output row; CPU matmul by `aten._weight_int8pack_mm`.

    (torchao's `Int8Tensor` weight-only path on CPU converts the whole int8 matrix to the
    activation dtype on every call; this one keeps the bytes int8 through the kernel.)
    """

    tensor_data_names = ["qdata", "scale"]
    tensor_attribute_names = ["shape"]
    optional_tensor_data_names = ["act_pre_scale"]

    def __new__(cls, qdata, scale, shape, act_pre_scale=None):
        return torch.Tensor._make_wrapper_subclass(cls, torch.Size(shape), dtype=scale.dtype, device=qdata.device,
                                                   requires_grad=False)

    def __init__(self, qdata, scale, shape, act_pre_scale=None):
        super().__init__()
        self.qdata = qdata
        self.scale = scale
        self.act_pre_scale = act_pre_scale

    def _quantization_type(self):
        return "int8 symmetric per-row"

    @classmethod
    def from_codes(cls, c: Codes, dtype) -> "Int8RowTensor":
        n, k = c.q.shape
        assert c.bits == 8 and c.symmetric and c.group_size == k
        q = (c.q.to(torch.int16) - 128).to(torch.int8).contiguous()
        return cls(q, c.scale.reshape(n).to(dtype).contiguous(), torch.Size([n, k]))

    def dequantize(self, output_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        w = self.qdata.to(torch.float32) * self.scale.to(torch.float32).unsqueeze(-1)
        return w.to(output_dtype or self.dtype)


def _linear_args(args, kwargs):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else (kwargs or {}).get("bias")
    return x, w, bias


@PackedIntxTensor.implements(aten.linear.default)
@PackedIntxTensor.implements_torch_function(F.linear)
@Int8RowTensor.implements(aten.linear.default)
@Int8RowTensor.implements_torch_function(F.linear)
def _quantized_linear(func, types, args, kwargs):
    """Shape-dispatched (`fastpath`): the low-bit kernel for a few rows, dequantize + dense matmul
    for many; differentiable w.r.t. the input (the weight dequantized again in backward)."""
    x, w, bias = _linear_args(args, kwargs)
    return fastpath.linear(x, w, bias)


# ------------------------------------------------------------------ int4 (torchao) from codes
def int4_opaque_from_codes(c: Codes, dtype):
    """torchao `Int4OpaqueTensor` (CPU packed int4) holding the given 4-bit codes.

    The tinygemm layout dequantizes as (q - 8) * scale + zero_tg, so zero_tg = (8 - zero) * scale.
    """
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor
    from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

    n, k = c.q.shape
    assert c.bits == 4 and c.group_size in INT4_KERNEL_GROUPS
    packed = aten._convert_weight_to_int4pack_for_cpu(c.q.to(torch.int32).contiguous(), 1)
    scale = c.scale.to(torch.float32)
    zero_tg = ((8.0 - c.zero.to(torch.float32)) * scale).to(dtype)
    sz = pack_tinygemm_scales_and_zeros(scale.to(dtype), zero_tg, dtype)
    return Int4OpaqueTensor(qdata=packed, scale_and_zero=sz, block_size=[1, c.group_size], shape=torch.Size([n, k]))


def int4_kernel_ok(shape, group_size: int, device: str) -> bool:
    n, k = shape
    return device == "cpu" and group_size in INT4_KERNEL_GROUPS and k % group_size == 0 and n % 16 == 0


def int8_kernel_ok(c: Codes, device: str) -> bool:
    return device == "cpu" and c.bits == 8 and c.symmetric and c.group_size == c.q.shape[1]


def pack(c: Codes, dtype, device: str = "cpu"):
    """(weight tensor, storage) for codes: a real low-bit kernel where one exists, else dequant."""
    if c.bits == 4 and int4_kernel_ok(c.q.shape, c.group_size, device):
        return int4_opaque_from_codes(c, dtype), "kernel"
    if int8_kernel_ok(c, device):
        return Int8RowTensor.from_codes(c, dtype), "kernel"
    t = PackedIntxTensor.from_codes(c, dtype)
    return (t.to(device) if device != "cpu" else t), "dequant"


KERNELS = {
    "Int4OpaqueTensor": ("torchao Int4OpaqueTensor (packed int4): aten._weight_int4pack_mm_for_cpu at <= 8 rows "
                         "(bf16/fp16), the C gemv of frontier.cpu_kernels at <= 8 rows (fp32), else dequantized "
                         "on the fly (C kernel) + dense matmul"),
    "Int8RowTensor": ("int8 weight, per-row scale: aten._weight_int8pack_mm at <= 8 rows (bf16/fp16), an Inductor "
                      "int8 reduction (fp32), else dequantized on the fly + dense matmul"),
    "PackedIntxTensor": ("dequantize-on-the-fly (bit-packed codes -> dense weight by the C kernel of "
                         "frontier.cpu_kernels -> F.linear)"),
    "Int8Tensor": "torchao Int8Tensor (w8a8: per-token int8 activations, torch._int_mm)",
    "Float8Tensor": "torchao Float8Tensor (fp8 e4m3 weights and activations, torch._scaled_mm)",
    "Int4TilePackedTo4dTensor": "torchao Int4TilePackedTo4dTensor (CUDA tinygemm int4)",
    "Params4bit": "bitsandbytes NF4 on CPU: the C gemv of frontier.cpu_kernels at <= 8 rows (codes read where they "
                  "lie), else dequantize_4bit (bitsandbytes CPU kernel) on the fly + dense matmul; matmul_4bit on CUDA",
}

torch.serialization.add_safe_globals([PackedIntxTensor, Int8RowTensor])
fastpath.register_int4_opaque()  # torchao's CPU int4 tensor: the same shape dispatch
