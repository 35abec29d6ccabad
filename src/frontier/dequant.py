"""Dequantized views of frozen quantized linears: the CPU speed path of fine-tuning and evaluation.

torchao's CPU low-bit kernels are built for decode (one token at a time); at prefill- and
training-sized inputs they are slow: measured on the tiny model (1 thread, 512 tokens x
128 -> 128) the packed int4 `_weight_int4pack_mm_for_cpu` takes ~12 ms and the int8 kernel
~6 ms, against ~0.25 ms for the dense matmul. A frozen quantized weight is a constant, so a
cached dequantized copy computes the same function (the same values the kernel multiplies
with; outputs agree to float rounding, ~1e-6 relative) at dense speed.

Used on CPU by
* fine-tuning (`finetune.worker`): the frozen quantized base trains through the copies;
* evaluation (`evaluate`): perplexity, recall and harness tasks run on the copies under
  `eval.quality_weights: auto` (CPU) while the cost ladder always measures the real kernels.

Weights whose function includes activation quantization (w8a8, fp8: `act_quant_kwargs`) are
not weight-only: evaluation keeps their kernels (`skip_act_quant`). AWQ's activation pre-scale
is folded into the copy (W·diag(pre_scale)), as the kernel applies it to the input.
"""
from __future__ import annotations

import contextlib
import os
import types
from typing import Iterator, Optional

DENSE_ENV = "FRONTIER_DENSE_MAX_MB"  # cap on the dense copies' size; 0 turns them off
DENSE_MAX_MB = 2048


def is_quantized_tensor(t) -> bool:
    """A tensor subclass that stores its data inside (torchao and frontier quantized weights)."""
    import torch

    return isinstance(t, torch.Tensor) and type(t) not in (torch.Tensor, torch.nn.Parameter) \
        and hasattr(t, "__tensor_flatten__")


def has_quantized_weights(model) -> bool:
    return any(is_quantized_tensor(p) for p in model.parameters())


def has_act_quant(t) -> bool:
    """The weight's linear quantizes its activations too (w8a8, fp8): not a weight-only function."""
    return getattr(t, "act_quant_kwargs", None) is not None


def dense_weight(linear, dtype, device):
    """[out, in] dense weight of a quantized linear, as the forward kernel sees it (AWQ's
    activation pre-scale folded in)."""
    import torch
    import torch.nn.functional as F

    w = linear.weight
    try:
        d = w.dequantize().to(dtype)
    except Exception:  # noqa: BLE001 - tensor types without dequantize: ask the kernel itself
        eye = torch.eye(linear.in_features, dtype=dtype, device=device)
        with torch.no_grad():
            return F.linear(eye, w).t().to(dtype)  # the kernel applies any pre-scale itself
    pre = getattr(w, "act_pre_scale", None)
    if pre is not None:
        d = d * pre.to(device=d.device, dtype=dtype).reshape(1, -1)
    return d


def _dense_forward(self, x, *args, **kwargs):
    import torch.nn.functional as F

    return F.linear(x, self._frontier_dense_weight, self.bias)


def _candidates(model, skip_act_quant: bool, frozen_only: bool) -> list:
    import torch

    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and is_quantized_tensor(getattr(m, "weight", None))
            and not (frozen_only and m.weight.requires_grad)
            and not (skip_act_quant and has_act_quant(m.weight))]


def dense_linears(model, max_bytes: Optional[int] = None, *, skip_act_quant: bool = False,
                  frozen_only: bool = True) -> list:
    """Give every frozen quantized `nn.Linear` a forward on a cached dequantized copy of its weight
    (a plain attribute: not a parameter or buffer, so neither DeepSpeed nor a delta sees it).
    The copies cost the unquantized size of those weights, hence the cap (`FRONTIER_DENSE_MAX_MB`,
    default 2048; 0: off): over it nothing is switched. Returns the names of the switched
    modules; idempotent. `skip_act_quant`: leave w8a8/fp8 linears on their kernels; `frozen_only`:
    only weights with requires_grad off (training: a trainable weight must not be shadowed)."""
    import torch

    if max_bytes is None:
        max_bytes = int(float(os.environ.get(DENSE_ENV, DENSE_MAX_MB)) * 2 ** 20)
    mods = _candidates(model, skip_act_quant, frozen_only)
    todo = [(n, m) for n, m in mods if not hasattr(m, "_frontier_dense_weight")]

    def dtype_of(m):
        dt = getattr(m.weight, "dtype", torch.float32)
        return dt if dt.is_floating_point else torch.float32

    need = sum(m.in_features * m.out_features * torch.empty((), dtype=dtype_of(m)).element_size() for _, m in todo)
    if not todo or need > max_bytes:
        return [n for n, m in mods if hasattr(m, "_frontier_dense_weight")]
    for _, m in todo:
        with torch.no_grad():
            m._frontier_dense_weight = dense_weight(m, dtype_of(m), m.weight.device).detach().contiguous()
        m.forward = types.MethodType(_dense_forward, m)
    return [n for n, _ in mods]


def restore_kernels(model) -> int:
    """Undo `dense_linears`: drop the copies, the kernels' forward is back. Returns how many."""
    n = 0
    for m in model.modules():
        if hasattr(m, "_frontier_dense_weight"):
            del m._frontier_dense_weight
            m.__dict__.pop("forward", None)
            n += 1
    return n


@contextlib.contextmanager
def dense_view(model, max_bytes: Optional[int] = None, *, skip_act_quant: bool = True) -> Iterator[list]:
    """`dense_linears` for the duration of the block (yields the switched names), then the kernels.
    For inference: every quantized linear, whatever its requires_grad flag."""
    names = dense_linears(model, max_bytes, skip_act_quant=skip_act_quant, frozen_only=False)
    try:
        yield names
    finally:
        restore_kernels(model)
