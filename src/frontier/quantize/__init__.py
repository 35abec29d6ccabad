"""Stage `quantize`: the methods researchers compare; the delta is the quantized linear weights.

The decoder's linear layers (attention q/k/v/o and the MLP) are quantized; embeddings and
lm_head stay in the model dtype. Options (`conf/quant/*.yaml`; bits, group size and
symmetry are config values, so e.g. `quant=int4_g32 quant.bits=3 quant.group_size=64` is
one override away):

| method | how | storage |
| --- | --- | --- |
| none | — | model dtype |
| rtn  | round-to-nearest per row/group; torchao `Int4OpaqueTensor` (4-bit asym, g32-128, CPU), frontier `Int8RowTensor` (int8 sym per-row, CPU), else bit-packed codes | kernel / dequant |
| hqq  | torchao HQQ qparams (`Int4ChooseQParamsAlgorithm.HQQ` at 4 bits, its solver otherwise) | kernel / dequant |
| gptq | frontier GPTQ (calibrated, layer by layer) → same storage as rtn | kernel / dequant |
| awq  | torchao `AWQConfig` scales over frontier's RTN config + AWQ's clipping search (calibrated, layer by layer) | kernel / dequant |
| nf4  | bitsandbytes `Linear4bit` NF4 + double-quantized absmax | kernel on CUDA; on CPU a C gemv at decode, dequant at prefill |
| w8a8 | torchao `Int8DynamicActivationInt8WeightConfig` | kernel (`torch._int_mm`) |
| fp8  | torchao `Float8DynamicActivationFloat8WeightConfig(PerRow)` — CUDA sm89+ only | kernel |

"kernel": a low-bit kernel reads the bytes at decode; "dequant": no such kernel, the weight is
stored at its bit width and dequantized to the activation dtype inside each forward. Either way
every weight-only layer picks its computation by shape (`fastpath`): the decode kernel for a few
rows, the weight dequantized on the fly + a dense matmul for prefill and training (no dense copy
is kept), so quality, cost and fine-tuning run the same layers.
`quant.kv_bits` (16 | 8 | 4 | 2) selects the KV cache at evaluation (`frontier.kvcache`,
`frontier.kivi`); the quantize stage neither reads nor records it (its checkpoint serves every
kv_bits).

The checkpoint stores only the quantized weights: `quantized.safetensors` where the tensor
types allow (see `storage`), else `quantized.pt` read with `torch.load(weights_only=True)`.
The manifest states method, bits, group size, symmetry, format, storage/kernel, `when` and the
effective bits per weight including scales and zero points.

`quant.when` (`frontier.grid`): `pre` (default) quantizes the base, and surgery and fine-tuning
run on the frozen quantized weights (QLoRA-style). `post` quantizes the fine-tuned model: the
parent chain is base → [surgery] → [finetune]; LoRA adapters (peft layers injected by the
finetune stage) are merged into their base weights and unloaded first, so the quantized
linears carry the adapters' update and the evaluated model has no LoRA branch left. The new
attention parameters of a surgery (feature maps) are not `nn.Linear`s and stay in the model
dtype, as with `pre`. On load, `apply_delta` unloads the adapters without merging (the stored
weights already contain them) and puts the quantized weights in.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from .. import checkpoint, tracking

METHODS = ("none", "rtn", "hqq", "gptq", "awq", "nf4", "w8a8", "fp8")
CALIBRATED = frozenset({"gptq", "awq"})
CUDA_ONLY = frozenset({"fp8"})
LIBRARY = {
    "rtn": "torchao 0.18 (Int4OpaqueTensor / PrototypeInt4WeightOnlyConfig; Int4WeightOnlyConfig on CUDA) + frontier packed tensors",
    "hqq": "torchao 0.18 HQQ qparams (Int4ChooseQParamsAlgorithm.HQQ / _choose_qparams_and_quantize_affine_hqq)",
    "gptq": "frontier GPTQ (torchao 0.18 prototype.gptq is CUDA+mslk only; llm-compressor needs transformers<=5.17)",
    "awq": "torchao 0.18 prototype.awq.AWQConfig over frontier WeightOnlyConfig + frontier awq_clip",
    "nf4": "bitsandbytes Linear4bit (nf4, double quant)",
    "w8a8": "torchao 0.18 Int8DynamicActivationInt8WeightConfig",
    "fp8": "torchao 0.18 Float8DynamicActivationFloat8WeightConfig(PerRow)",
}
KERNEL_TYPES = {"Int4OpaqueTensor", "Int8RowTensor", "Float8Tensor", "Int4TilePackedTo4dTensor"}
LEGACY_METHODS = {"int8_weight_only": "rtn", "int4_weight_only": "rtn"}  # manifests written before the rename


def _linear_filter(module, fqn: str) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear) and ".layers." in f".{fqn}" and "lm_head" not in fqn


def _linears(model):
    for name, mod in model.named_modules():
        if _linear_filter(mod, name):
            yield f"{name}.weight", mod


def _set_module(model, fqn: str, new) -> None:
    parent, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def lora_layers(model) -> list:
    """[(module name, peft LoRA layer)] of adapters injected by the finetune stage."""
    try:
        from peft.tuners.lora import LoraLayer
    except Exception:  # noqa: BLE001 - peft absent: nothing can have been injected
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def unload_lora(model, *, merge: bool) -> int:
    """Replace every peft LoRA layer by its base `nn.Linear`; with `merge`, first add the
    adapters' update (B·A·scale) to the base weight (which must not be quantized). Returns the
    number of layers unloaded."""
    import torch

    layers = lora_layers(model)
    for name, mod in layers:
        if merge:
            w = mod.get_base_layer().weight
            if type(w) not in (torch.Tensor, torch.nn.Parameter):
                raise ValueError(f"{name}: cannot merge LoRA into a quantized weight ({type(w).__name__}); "
                                 "quant.when: post expects an unquantized fine-tuned model")
            mod.merge(safe_merge=True)
        _set_module(model, name, mod.get_base_layer())
    return len(layers)


def torchao_config(q: dict, device: str = "cpu"):
    """The torchao config for a calibration-free tensor-subclass method (rtn, hqq, w8a8, fp8)."""
    from .rtn import torchao_config as _cfg

    return _cfg(q, device)


def quantize_model(model, q: dict, device: str = "cpu", *, calib_ids=None) -> dict:
    """Quantize the decoder's linear layers in place; returns storage facts for the manifest."""
    method = LEGACY_METHODS.get(q["method"], q["method"])
    if method == "none":
        return {"storage": "none", "kernel": None, "tensor_types": {}}
    if method in ("rtn", "hqq", "w8a8", "fp8"):
        from torchao.quantization import quantize_

        quantize_(model, torchao_config({**q, "method": method}, device), filter_fn=_linear_filter)
    elif method == "nf4":
        from .rtn import nf4_linear

        for name, mod in list(_linears(model)):
            _set_module(model, name[: -len(".weight")], nf4_linear(mod, q.get("group_size") or 64))
    elif method in CALIBRATED:
        if calib_ids is None:
            raise ValueError(f"quant.method {method} calibrates: pass calib_ids (see calibrated.calibration_ids)")
        from . import calibrated

        (calibrated.gptq_quantize if method == "gptq" else calibrated.awq_quantize)(model, calib_ids, q, device)
    else:
        raise ValueError(f"quant.method {q['method']!r} is not implemented; allowed: {', '.join(METHODS)}")
    return describe(model, device)


def describe(model, device: str = "cpu") -> dict:
    """Which tensor types hold the quantized weights, and whether a real low-bit kernel reads them."""
    from .tensors import KERNELS

    types: dict = {}
    for _, mod in _linears(model):
        n = type(mod.weight).__name__
        types[n] = types.get(n, 0) + 1
    kinds = set()
    for n in types:
        if n in KERNEL_TYPES:
            kinds.add("kernel")
        elif n == "Int8Tensor":  # torchao: w8a8 (dynamic activations, torch._int_mm) or weight-only (dequant)
            w = next(m.weight for _, m in _linears(model) if type(m.weight).__name__ == n)
            kinds.add("kernel" if getattr(w, "act_quant_kwargs", None) is not None else "dequant")
        elif n == "Params4bit":
            kinds.add("kernel" if device.startswith("cuda") else "dequant")
        elif n in ("Parameter", "Tensor"):
            kinds.add("none")
        else:
            kinds.add("dequant")
    storage = kinds.pop() if len(kinds) == 1 else "mixed"
    return {"storage": storage, "kernel": {n: KERNELS.get(n, n) for n in types}, "tensor_types": types}


def quantized_weights(model) -> dict:
    """The quantized linear weights by state-dict name."""
    return {name: mod.weight for name, mod in _linears(model)}


def linear_stats(model) -> dict:
    """Numbers of weights and bytes of the quantized linears (scales and zero points included)."""
    n = sum(mod.in_features * mod.out_features for _, mod in _linears(model))
    b = sum(checkpoint.tensor_bytes(mod.weight) for _, mod in _linears(model))
    return {"linear_weights": n, "linear_bytes": b, "effective_bits_per_weight": round(8.0 * b / max(n, 1), 4)}


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run(cfg: dict, parent: Path, out_dir: Path, *, tracking_cfg: Optional[dict] = None, sweep: str = "",
        name: str = "", work_dir: str = "work") -> dict:
    """Quantize the parent chain's model; `cfg` = {"quant": ..., "data": ...} (data: calibrated methods)."""
    started = time.time()
    q = cfg["quant"]
    method = LEGACY_METHODS.get(q["method"], q["method"])
    device = _device()
    if method in CUDA_ONLY and device != "cuda":
        raise RuntimeError(f"quant option {q.get('name', method)!r} (method {method}) needs CUDA; none is available")
    if method in CALIBRATED and not cfg.get("data"):
        raise ValueError(f"quant.method {method} calibrates on the sweep's data: run() needs cfg['data'] "
                         "(grid.stage_config must pass it for calibrated methods)")
    with tracking.run(tracking_cfg, job_type="quantize", group=sweep, name=name or q["name"], config=cfg,
                      work_dir=work_dir) as wb:
        lp = checkpoint.load_point(parent, device=device)
        when = q.get("when", "pre")
        parents = [m["stage"] for m in lp.manifests]   # pre: [base]; post: [base, surgery?, finetune?]
        merged = unload_lora(lp.model, merge=True)  # post: fold the fine-tuned adapters into the weights
        calib, calib_info = None, None
        if method in CALIBRATED:
            from .calibrated import calibration_ids

            samples, seq_len = int(q.get("calib_samples", 32)), int(q.get("calib_seq_len", 256))
            calib = calibration_ids(lp.tokenizer, cfg["data"], samples, seq_len, seed=int(cfg["data"].get("seed", 0)))
            calib_info = {"samples": samples, "seq_len": seq_len, "tokens": samples * seq_len,
                          "corpus": cfg["data"]["corpus"], "split": "train"}
        t0 = time.time()
        facts = quantize_model(lp.model, q, device, calib_ids=calib)
        quant_s = time.time() - t0

        def write(tmp: Path) -> dict:
            from . import storage

            saved = storage.save(quantized_weights(lp.model), tmp)
            return {"quant": {"device": device, "method": method, "option": q.get("name"), "bits": q["bits"],
                              "when": when, "parent_stages": parents, "lora_merged_layers": merged,
                              "group_size": q.get("group_size"), "symmetric": bool(q.get("symmetric", False)),
                              "library": LIBRARY.get(method),
                              "format": saved["format"], "files_written": saved["files"],
                              "calibration": calib_info, "quantize_s": round(quant_s, 3), **facts,
                              **linear_stats(lp.model), "weight_bytes": checkpoint.model_weight_bytes(lp.model)}}

        manifest = checkpoint.save_stage(Path(out_dir), stage="quantize", config=cfg, parent=Path(parent),
                                         write=write, started=started)
        wb.summary({k: v for k, v in manifest["quant"].items() if isinstance(v, (int, float, str))})
    return manifest


def apply_delta(model, ckpt_dir: Path, manifest: dict):
    """Put the stored quantized weights into a model of the parent chain (bit-identical)."""
    import torch

    from . import storage
    from .tensors import PackedIntxTensor  # noqa: F401  (safe globals for weights_only loading)

    weights = storage.load(Path(ckpt_dir))
    unload_lora(model, merge=False)  # when: post — the stored weights already contain the merged adapters
    expected = {name for name, _ in _linears(model)}
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise checkpoint.IntegrityError(f"{ckpt_dir}: quantized weights do not match the model "
                                        f"(missing {missing[:3]}, unexpected {extra[:3]})")
    dev = next(model.parameters()).device
    stored_dev = manifest.get("quant", {}).get("device", "cpu")
    plain = {}
    for name, w in weights.items():
        if isinstance(w, tuple) and w and w[0] == "bnb4":
            from .rtn import nf4_linear_from_state

            fqn = name[: -len(".weight")]
            _set_module(model, fqn, nf4_linear_from_state(model.get_submodule(fqn), w[1], w[2]))
            continue
        if w.device != dev:
            try:
                w = w.to(dev)
            except Exception as e:  # noqa: BLE001 - layout tied to the device it was quantized on
                raise checkpoint.IntegrityError(
                    f"{ckpt_dir}: {type(w).__name__} quantized on {stored_dev} cannot move to {dev} ({e}); "
                    f"load this chain on {stored_dev} or re-run quantize there") from e
        plain[name] = torch.nn.Parameter(w, requires_grad=False)
    result = model.load_state_dict(plain, strict=False, assign=True)
    if result.unexpected_keys:
        raise checkpoint.IntegrityError(f"{ckpt_dir}: unexpected keys {result.unexpected_keys[:3]}")
    return model
