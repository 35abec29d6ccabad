"""LoRA via peft on the (possibly torchao-quantized) frozen model; saving and re-applying the delta.

The adapters are injected into the transformers model itself (`peft.inject_adapter_in_model`),
not wrapped in a `PeftModel`, so parameter names stay those of the plain model
(`model.layers.0.self_attn.q_proj.lora_A.default.weight`) and downstream code keeps seeing a
`LlamaForCausalLM` (`model.model.layers`, `generate()`).

Quantized base: peft dispatches a torchao-weighted `nn.Linear` to its `TorchaoLoraLinear`
(forward + training work; merging is not used). Both phases need the gradient w.r.t. the
input of every frozen quantized linear (it flows through `o_proj` into the feature maps, and
through every layer into the LoRA adapters). frontier's weight-only types and torchao's CPU
`Int4OpaqueTensor` provide it (`quantize.fastpath`: grad_y @ W, W dequantized on the fly).
For any other type whose kernel has no autograd formula,
`make_frozen_linears_differentiable` probes each quantized linear once and, where backward
fails, routes its forward through an autograd function whose backward is
``grad_x = grad_y @ W`` with W dequantized on the fly (via `dequantize()`, or recovered from
the kernel itself as ``linear(I, W).T`` when the tensor type has no `dequantize`). The forward
is the same op as before, so logits do not change.
"""
from __future__ import annotations

import json
import types
import warnings
from pathlib import Path
from typing import Any

from ..dequant import (  # noqa: F401 - re-exported
    dense_weight as _dense_weight, has_quantized_weights, is_quantized_tensor)

DELTA_FILE = "delta.safetensors"
LORA_FILE = "lora.json"
ADAPTER = "default"


# ------------------------------------------------------------------ config
def lora_config_dict(lora_cfg: dict) -> dict:
    """The serialisable LoraConfig fields used (written to lora.json, read back by apply_delta)."""
    return {"r": int(lora_cfg["r"]), "lora_alpha": float(lora_cfg["alpha"]),
            "lora_dropout": float(lora_cfg.get("dropout", 0.0)),
            "target_modules": sorted(str(t) for t in lora_cfg["targets"]), "bias": "none"}


def peft_config(d: dict):
    from peft import LoraConfig

    return LoraConfig(r=d["r"], lora_alpha=d["lora_alpha"], lora_dropout=d["lora_dropout"],
                      target_modules=list(d["target_modules"]), bias=d.get("bias", "none"))


# ------------------------------------------------------------------ quantized linears
def _make_fn():
    import torch
    import torch.nn.functional as F

    class _FrozenQuantLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, linear):  # noqa: D401 - autograd.Function API
            ctx.linear = linear
            with torch.no_grad():
                return F.linear(x, linear.weight, linear.bias)

        @staticmethod
        def backward(ctx, grad):
            w = _dense_weight(ctx.linear, grad.dtype, grad.device)
            return grad @ w, None

    return _FrozenQuantLinear


_FN = None


def _patched_forward(self, x, *args, **kwargs):
    return _FN.apply(x, self)


def _backward_works(linear) -> bool:
    import torch
    import torch.nn.functional as F

    try:
        dtype = torch.float32
        try:
            dtype = linear.weight.dtype if linear.weight.dtype.is_floating_point else torch.float32
        except Exception:  # noqa: BLE001
            pass
        x = torch.zeros(1, linear.in_features, dtype=dtype, device=linear.weight.device, requires_grad=True)
        F.linear(x, linear.weight).sum().backward()
        return x.grad is not None
    except Exception:  # noqa: BLE001 - "derivative for ... is not implemented" and friends
        return False


def make_frozen_linears_differentiable(model) -> list[str]:
    """Give quantized `nn.Linear`s whose kernel lacks autograd a backward w.r.t. the input.

    Returns the names of the patched modules (empty when every kernel differentiates).
    """
    global _FN
    import torch

    patched = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or not is_quantized_tensor(getattr(mod, "weight", None)):
            continue
        if getattr(mod, "_frontier_grad_patch", False) or _backward_works(mod):
            continue
        if _FN is None:
            _FN = _make_fn()
        mod.forward = types.MethodType(_patched_forward, mod)
        mod._frontier_grad_patch = True
        patched.append(name)
    return patched


# ------------------------------------------------------------------ wrapping
def peft_rejects_quantized(model) -> bool:
    """peft 0.21's `TorchaoLoraLinear` refuses torchao's `Int4Tensor` (the CUDA int4 weight
    type) in its constructor, although only its merge needs that. True when the model has one."""
    import torch

    try:
        from torchao.quantization import Int4Tensor
    except Exception:  # noqa: BLE001
        return False
    return any(isinstance(getattr(m, "weight", None), Int4Tensor) for m in model.modules()
               if isinstance(m, torch.nn.Linear))


def wrap(model, cfg_dict: dict, *, generic_quant_linear: bool | None = None):
    """Inject LoRA adapters (in place); only the adapters are trainable afterwards.

    `generic_quant_linear` (default: when peft would refuse the quantized weights) maps every
    targeted `nn.Linear` to peft's plain `lora.Linear`, whose forward is the same as
    `TorchaoLoraLinear`'s (base layer + B·A·x·scale); only merging (unused here) differs.
    Module and parameter names do not depend on it.
    """
    import torch
    from peft import inject_adapter_in_model

    pc = peft_config(cfg_dict)
    if generic_quant_linear is None:
        generic_quant_linear = peft_rejects_quantized(model)
    if generic_quant_linear:
        from peft.tuners.lora.layer import Linear as LoraLinear

        pc._register_custom_module({torch.nn.Linear: LoraLinear})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*get_apply_tensor_subclass.*")
        model = inject_adapter_in_model(pc, model, adapter_name=ADAPTER)
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n)
    if not lora_parameters(model):
        raise ValueError(f"LoRA targets {cfg_dict['target_modules']} matched no module of {type(model).__name__}")
    return model


def lora_parameters(model) -> dict:
    return {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


# ------------------------------------------------------------------ delta files
def write_delta(tmp_dir: Path, tensors: dict, cfg_dict: dict | None) -> None:
    from .. import checkpoint

    checkpoint.save_tensors(tensors, Path(tmp_dir) / DELTA_FILE)
    if cfg_dict is not None:
        (Path(tmp_dir) / LORA_FILE).write_text(json.dumps(cfg_dict, indent=2, sort_keys=True) + "\n")


def apply_delta(model, ckpt_dir: Path, manifest: dict) -> Any:
    """Re-apply a finetune checkpoint to the model of its parent chain (returns it, eval mode).

    Wraps with the LoRA config of lora.json (same module names as in training), then loads
    every tensor of delta.safetensors into the parameter of the same name; a delta key the
    model lacks, or a LoRA parameter the delta lacks, is an error.
    """
    import torch

    from .. import checkpoint

    ckpt_dir = Path(ckpt_dir)
    delta = checkpoint.load_tensors(ckpt_dir / DELTA_FILE)
    lora_path = ckpt_dir / LORA_FILE
    if lora_path.exists():
        model = wrap(model, json.loads(lora_path.read_text()))
    params = dict(model.named_parameters())
    missing = sorted(k for k in delta if k not in params)
    if missing:
        raise checkpoint.IntegrityError(f"{ckpt_dir}: delta tensors with no parameter in the model: {missing[:4]}"
                                        f"{' …' if len(missing) > 4 else ''} (different surgery or LoRA targets?)")
    untrained = sorted(k for k in lora_parameters(model) if k not in delta)
    if untrained:
        raise checkpoint.IntegrityError(f"{ckpt_dir}: LoRA parameters missing from the delta: {untrained[:4]}")
    with torch.no_grad():
        for k, t in delta.items():
            p = params[k]
            if tuple(p.shape) != tuple(t.shape):
                raise checkpoint.IntegrityError(f"{ckpt_dir}: {k} has shape {tuple(t.shape)} in the delta, "
                                                f"{tuple(p.shape)} in the model")
            p.copy_(t.to(dtype=p.dtype, device=p.device))
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model
