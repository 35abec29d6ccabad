"""Stage `quantize`: weight quantization with torchao; the delta is the quantized weights.

The decoder's linear layers (attention q/k/v/o and the MLP) are quantized; embeddings and
lm_head stay in the model dtype. The checkpoint stores only the quantized weights (a
`torch.save` of torchao tensors, read back with `weights_only=True`), so a chain that
shares a base does not copy it.

- int8_weight_only: torchao `Int8WeightOnlyConfig` (per-output-channel scales).
- int4_weight_only: real packed int4 with torchao's CPU int4 matmul kernel
  (`PrototypeInt4WeightOnlyConfig`); on CUDA `Int4WeightOnlyConfig` (tinygemm).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from . import checkpoint, tracking

WEIGHTS = "quantized.pt"


def _linear_filter(module, fqn: str) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear) and ".layers." in f".{fqn}" and "lm_head" not in fqn


def torchao_config(q: dict, device: str):
    """The torchao config for a quant option, and a description of its storage/kernel."""
    if q["method"] == "int8_weight_only":
        from torchao.quantization import Int8WeightOnlyConfig

        return Int8WeightOnlyConfig(), {"storage": "int8", "kernel": "torchao int8 weight-only (dequantize in matmul)"}
    if q["method"] == "int4_weight_only":
        if device.startswith("cuda"):
            from torchao.quantization import Int4WeightOnlyConfig

            return Int4WeightOnlyConfig(group_size=q["group_size"]), {"storage": "packed_int4 (tinygemm)",
                                                                     "kernel": "torchao int4 tinygemm (CUDA)"}
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        return PrototypeInt4WeightOnlyConfig(group_size=q["group_size"]), {
            "storage": "packed_int4 (CPU opaque layout)", "kernel": "torchao CPU int4 matmul"}
    raise ValueError(f"quant.method {q['method']!r} has no quantizer; allowed: int8_weight_only, int4_weight_only")


def quantize_model(model, q: dict, device: str = "cpu") -> dict:
    """Quantize the decoder's linear layers in place; returns storage facts."""
    from torchao.quantization import quantize_

    ao_cfg, facts = torchao_config(q, device)
    quantize_(model, ao_cfg, filter_fn=_linear_filter)
    return facts


def quantized_weights(model) -> dict:
    """The quantized linear weights by state-dict name."""
    return {name: mod.weight for name, mod in _linears(model)}


def _linears(model):
    for name, mod in model.named_modules():
        if _linear_filter(mod, name):
            yield f"{name}.weight", mod


def linear_stats(model) -> dict:
    """Numbers of weights and bytes of the quantized linears (scales and zero points included)."""
    n = sum(mod.weight.numel() for _, mod in _linears(model))
    b = sum(checkpoint.tensor_bytes(mod.weight) for _, mod in _linears(model))
    return {"linear_weights": n, "linear_bytes": b, "effective_bits_per_weight": round(8.0 * b / max(n, 1), 4)}


def run(cfg: dict, parent: Path, out_dir: Path, *, tracking_cfg: Optional[dict] = None, sweep: str = "",
        name: str = "", work_dir: str = "work") -> dict:
    import torch

    started = time.time()
    q = cfg["quant"]
    with tracking.run(tracking_cfg, job_type="quantize", group=sweep, name=name or q["name"], config=cfg,
                      work_dir=work_dir) as wb:
        lp = checkpoint.load_point(parent)
        facts = quantize_model(lp.model, q)

        def write(tmp: Path) -> dict:
            torch.save(quantized_weights(lp.model), tmp / WEIGHTS)
            return {"quant": {"device": "cpu", "method": q["method"], "bits": q["bits"], "group_size": q["group_size"],
                              "format": "torch.save (load with weights_only=True)", **facts,
                              **linear_stats(lp.model),
                              "weight_bytes": checkpoint.model_weight_bytes(lp.model)}}

        manifest = checkpoint.save_stage(Path(out_dir), stage="quantize", config=cfg, parent=Path(parent),
                                         write=write, started=started)
        wb.summary(manifest["quant"])
    return manifest


def apply_delta(model, ckpt_dir: Path, manifest: dict):
    """Put the stored quantized weights into a model of the parent chain (bit-identical)."""
    # importing the quantizer registers its tensor types as safe for weights_only loading
    torchao_config(manifest["config"]["quant"], manifest["quant"].get("device", "cpu"))
    weights = checkpoint.load_tensors(Path(ckpt_dir) / WEIGHTS)
    expected = {name for name, _ in _linears(model)}
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise checkpoint.IntegrityError(f"{ckpt_dir}: quantized weights do not match the model "
                                        f"(missing {missing[:3]}, unexpected {extra[:3]})")
    result = model.load_state_dict(weights, strict=False, assign=True)
    if result.unexpected_keys:
        raise checkpoint.IntegrityError(f"{ckpt_dir}: unexpected keys {result.unexpected_keys[:3]}")
    return model
