"""Calibration-free methods: round-to-nearest (any bits, groups, sym/asym), HQQ, NF4, W8A8, FP8.

* RTN / HQQ at 4 bits, asymmetric, groups 32/64/128 on CPU: torchao's
  `Int4OpaqueTensor.from_hp` (the tensor behind `PrototypeInt4WeightOnlyConfig`; TINYGEMM or
  HQQ qparams) — real packed int4 and the CPU int4 kernel. On CUDA: torchao
  `Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d")` (tinygemm).
* RTN int8 symmetric per-row on CPU: frontier `Int8RowTensor` (`aten._weight_int8pack_mm`);
  on CUDA torchao `Int8WeightOnlyConfig`.
* Every other bits/group/symmetry combination: codes from `rtn_codes` / `hqq_codes`
  (torchao's HQQ solver for any bit width), stored bit-packed in `PackedIntxTensor` and
  dequantized on the fly.
* NF4: bitsandbytes `Linear4bit` (QLoRA NF4, double-quantized absmax, block = group_size).
* W8A8: torchao `Int8DynamicActivationInt8WeightConfig` (per-row int8 weights, per-token
  dynamic int8 activations, `torch._int_mm`).
* FP8: torchao `Float8DynamicActivationFloat8WeightConfig(PerRow)` — CUDA (sm89+) only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler

from .fastpath import nf4_class
from .tensors import Codes, choose_qparams, int4_kernel_ok, pack, quantize_with


# ------------------------------------------------------------------ codes
def rtn_codes(w: torch.Tensor, bits: int, group_size: Optional[int], symmetric: bool) -> Codes:
    """Round-to-nearest codes per output row and group, on the grid of `tensors.choose_qparams`."""
    n, k = w.shape
    g = group_size or k
    wf = w.detach().to(torch.float32).reshape(n, k // g, g)
    scale, zero = choose_qparams(wf, bits, symmetric)
    q = quantize_with(wf, scale.unsqueeze(-1), zero.unsqueeze(-1), bits)
    return Codes(q.to(torch.uint8).reshape(n, k), scale, zero, bits, g, symmetric)


def hqq_codes(w: torch.Tensor, bits: int, group_size: int) -> Codes:
    """HQQ codes (torchao's half-quadratic solver; asymmetric, float zero points) for any bits."""
    from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_affine_hqq

    n, k = w.shape
    q, scale, zero, _ = _choose_qparams_and_quantize_affine_hqq(
        w.detach(), nbits=bits, group_size=group_size, axis=1, compute_dtype=torch.float32,
        device=str(w.device), raw_output=True)
    return Codes(q.reshape(n, k).to(torch.uint8), scale.reshape(n, -1).float(), zero.reshape(n, -1).float(),
                 bits, group_size, False)


# ------------------------------------------------------------------ one config for weight-only RTN / HQQ
@dataclass
class WeightOnlyConfig(AOBaseConfig):
    """torchao-style config (usable with `quantize_` and as AWQ's base config)."""

    bits: int = 4
    group_size: Optional[int] = None
    symmetric: bool = False
    algorithm: str = "rtn"  # rtn | hqq
    kernel: bool = True  # False: always packed codes (AWQ's grid search; repacked for the kernel afterwards)


def quantize_weight(w: torch.Tensor, cfg: WeightOnlyConfig):
    """(quantized weight tensor, storage "kernel" | "dequant") for a [N, K] float weight."""
    n, k = w.shape
    g = cfg.group_size or k
    dev = w.device.type
    hqq = cfg.algorithm == "hqq"
    if not cfg.kernel:
        codes = hqq_codes(w, cfg.bits, g) if hqq else rtn_codes(w, cfg.bits, cfg.group_size, cfg.symmetric)
        from .tensors import PackedIntxTensor

        return PackedIntxTensor.from_codes(codes, w.dtype).to(w.device), "dequant"
    if cfg.bits == 4 and not cfg.symmetric:
        if int4_kernel_ok(w.shape, g, dev):
            from torchao.prototype.quantization.int4 import Int4OpaqueTensor
            from torchao.quantization.quantize_.workflows import Int4ChooseQParamsAlgorithm

            alg = Int4ChooseQParamsAlgorithm.HQQ if hqq else Int4ChooseQParamsAlgorithm.TINYGEMM
            return Int4OpaqueTensor.from_hp(w.detach(), [1, g], int4_choose_qparams_algorithm=alg), "kernel"
        if dev == "cuda" and g in (32, 64, 128, 256) and k % g == 0:
            from torchao.quantization import Int4WeightOnlyConfig
            from torchao.quantization.quant_api import _int4_weight_only_quantize_tensor
            from torchao.quantization.quantize_.workflows import Int4ChooseQParamsAlgorithm, Int4PackingFormat

            ao = Int4WeightOnlyConfig(group_size=g, int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D,
                                      int4_choose_qparams_algorithm=(Int4ChooseQParamsAlgorithm.HQQ if hqq
                                                                     else Int4ChooseQParamsAlgorithm.TINYGEMM))
            return _int4_weight_only_quantize_tensor(w.detach().to(torch.bfloat16), ao), "kernel"
    if dev == "cuda" and cfg.bits == 8 and cfg.symmetric and cfg.group_size is None and not hqq:
        from torchao.quantization import Int8WeightOnlyConfig
        from torchao.utils import DummyModule
        from torchao.quantization.transform_module import _QUANTIZE_CONFIG_HANDLER

        mod = _QUANTIZE_CONFIG_HANDLER[Int8WeightOnlyConfig](DummyModule(w.detach()), Int8WeightOnlyConfig())
        return mod.weight.detach(), "dequant"
    codes = hqq_codes(w, cfg.bits, g) if hqq else rtn_codes(w, cfg.bits, cfg.group_size, cfg.symmetric)
    return pack(codes, w.dtype, dev)


@register_quantize_module_handler(WeightOnlyConfig)
def _weight_only_transform(module: torch.nn.Module, config: WeightOnlyConfig) -> torch.nn.Module:
    t, _ = quantize_weight(module.weight, config)
    module.weight = torch.nn.Parameter(t, requires_grad=False)
    return module


# ------------------------------------------------------------------ library configs
def torchao_config(q: dict, device: str):
    """The torchao config that quantizes a layer for option `q` (calibration-free methods)."""
    m = q["method"]
    if m in ("rtn", "hqq"):
        return WeightOnlyConfig(bits=q["bits"], group_size=q.get("group_size"), symmetric=bool(q.get("symmetric")),
                                algorithm=m)
    if m == "w8a8":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig

        return Int8DynamicActivationInt8WeightConfig()
    if m == "fp8":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    raise ValueError(f"quant.method {m!r} has no torchao config (calibrated or module-swap method)")


# ------------------------------------------------------------------ NF4 (bitsandbytes)
def nf4_linear(lin: torch.nn.Linear, block_size: int):
    """A bitsandbytes `Linear4bit` (NF4, double quant) holding `lin`'s weight."""
    import bitsandbytes as bnb

    w = lin.weight.detach()
    new = nf4_class()(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=w.dtype,
                            compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8, device="meta")
    new.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", blocksize=block_size,
                                   compress_statistics=True, quant_storage=torch.uint8)._quantize(w.device)
    if lin.bias is not None:
        new.bias = torch.nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    return new


def nf4_linear_from_state(lin: torch.nn.Linear, data: torch.Tensor, stats: dict):
    """Rebuild a `Linear4bit` from stored packed data and quant state (bit-identical)."""
    import bitsandbytes as bnb

    dev = lin.weight.device
    new = nf4_class()(lin.in_features, lin.out_features, bias=lin.bias is not None,
                            compute_dtype=lin.weight.dtype, compress_statistics=True, quant_type="nf4",
                            quant_storage=torch.uint8, device="meta")
    new.weight = bnb.nn.Params4bit.from_prequantized(data.to(dev), stats, requires_grad=False, device=dev,
                                                     module=new)
    if lin.bias is not None:
        new.bias = lin.bias
    return new


def nf4_state(param) -> dict:
    """Plain tensors of a `Params4bit`: the packed codes and its quant state (safetensors-ready)."""
    return {k: v for k, v in param.quant_state.as_dict(packed=True).items()}


