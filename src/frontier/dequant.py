"""Facts about quantized linears shared by evaluation and fine-tuning; no dense copies any more.

Evaluation and fine-tuning once ran CPU quantized models on cached dequantized copies of
their weights, because the CPU low-bit kernels were 20-85x slower than a dense matmul at
prefill and training sizes. The quantized layers now pick their computation by shape
(`frontier.quantize.fastpath`: the low-bit kernel for a few rows, the weight dequantized on
the fly + a dense matmul for many, a backward that dequantizes again), so quality, cost and
training all run the same quantized layers and no format keeps a dense copy:

* int8 (`Int8RowTensor`), 4-bit RTN/HQQ/GPTQ/AWQ (torchao `Int4OpaqueTensor`), every other bit
  width (`PackedIntxTensor`), NF4 (bitsandbytes, `fastpath.NF4Linear`): shape-dispatched;
* w8a8 / fp8 (activation-quantized): their own kernels (not weight-only functions);
* a tensor type without an input gradient gets one from `finetune.lora` (through
  `dense_weight`, on the fly).

`eval.quality_weights` is kept for config compatibility and no longer changes anything.
"""
from __future__ import annotations


def is_quantized_tensor(t) -> bool:
    """A tensor subclass that stores its data inside (torchao and frontier quantized weights)."""
    import torch

    return isinstance(t, torch.Tensor) and type(t) not in (torch.Tensor, torch.nn.Parameter) \
        and hasattr(t, "__tensor_flatten__")


def has_quantized_weights(model) -> bool:
    return any(is_quantized_tensor(p) or type(p).__name__ == "Params4bit" for p in model.parameters())


def has_act_quant(t) -> bool:
    """The weight's linear quantizes its activations too (w8a8, fp8): not a weight-only function."""
    return getattr(t, "act_quant_kwargs", None) is not None


def dense_weight(linear, dtype, device):
    """[out, in] dense weight of a quantized linear, as its forward applies it (AWQ's activation
    pre-scale folded in), computed now and not kept."""
    import torch
    import torch.nn.functional as F

    from .quantize import fastpath

    w = linear.weight
    try:
        d = fastpath.dense(w, dtype)
    except Exception:  # noqa: BLE001 - tensor types without dequantize: ask the kernel itself
        eye = torch.eye(linear.in_features, dtype=dtype, device=device)
        with torch.no_grad():
            return F.linear(eye, w).t().to(dtype)  # the kernel applies any pre-scale itself
    pre = getattr(w, "act_pre_scale", None)
    if pre is not None:
        d = d * pre.to(device=d.device, dtype=dtype).reshape(1, -1)
    return d.to(device)


def dense_attributes(model) -> list:
    """Names of modules holding a dense tensor attribute beside a quantized weight (none should:
    the old cached copies were `_frontier_dense_weight`)."""
    import torch

    out = []
    for name, m in model.named_modules():
        if not is_quantized_tensor(getattr(m, "weight", None)):
            continue
        extra = [k for k, v in vars(m).items() if isinstance(v, torch.Tensor) and k not in ("weight", "bias")]
        if extra:
            out.append(name)
    return out
