"""Stage `surgery`: swap the attention modules of the parent model.

The new modules (from `frontier.attention`) reuse each layer's q/k/v/o projections —
quantized or not — and add their own parameters (feature maps, gates). The delta is
those new parameters plus the resolved attention spec; reloading re-swaps and loads them.
A hybrid with `keep_softmax: auto` chooses its softmax layers here, on calibration windows
from the sweep's training split run through the parent (softmax) model; the per-layer
diagnostics and the choice go into the manifest (`attention.diagnostics`).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from . import attention, checkpoint, tracking

PARAMS = "attention.safetensors"


def run(cfg: dict, parent: Path, out_dir: Path, *, tracking_cfg: Optional[dict] = None, sweep: str = "",
        name: str = "", work_dir: str = "work") -> dict:
    started = time.time()
    spec = cfg["attention"]
    with tracking.run(tracking_cfg, job_type="surgery", group=sweep, name=name or spec["name"], config=cfg,
                      work_dir=work_dir):
        lp = checkpoint.load_point(parent)
        calib = None
        if spec.get("keep_softmax") == "auto":
            from .quantize.calibrated import calibration_ids

            calib = calibration_ids(lp.tokenizer, cfg["data"], int(spec.get("calib_samples", 8)),
                                    int(spec.get("calib_seq_len", 128)), seed=int(cfg["data"].get("seed", 0)))
        spec, diagnostics = attention.resolve_keep_softmax(lp.model, spec, calib)
        if spec.get("kind") == "lolcats":  # the manifest records the mixing convention and the gate's init
            full = attention.normalize_config(spec)
            spec = {**spec, "mix": full["mix"], "gate_init": full["gate_init"]}
        attention.swap_attention(lp.model, spec)
        params = attention.attention_parameters(lp.model)

        def write(tmp: Path) -> dict:
            checkpoint.save_tensors(params, tmp / PARAMS)
            return {"attention": {"spec": spec, "new_params": int(sum(p.numel() for p in params.values())),
                                  "layers": len(lp.model.model.layers),
                                  "keep_softmax": list(spec.get("keep_softmax") or []),
                                  "diagnostics": diagnostics,
                                  "model_class": type(lp.model).__name__}}

        return checkpoint.save_stage(Path(out_dir), stage="surgery", config=cfg, parent=Path(parent),
                                     write=write, started=started)


def apply_delta(model, ckpt_dir: Path, manifest: dict):
    # the resolved spec (keep_softmax: auto → the chosen layers); older manifests: the config
    spec = (manifest.get("attention") or {}).get("spec") or manifest["config"]["attention"]
    if spec.get("kind") == "lolcats" and "mix" not in spec:  # written when (g, 1 - g) was the only convention
        from .attention.lolcats import LEGACY_MIX

        spec = {**spec, "mix": LEGACY_MIX}
    attention.swap_attention(model, spec)
    params = checkpoint.load_tensors(Path(ckpt_dir) / PARAMS)
    expected = set(attention.attention_parameters(model))
    if set(params) != expected:
        raise checkpoint.IntegrityError(f"{ckpt_dir}: attention parameters do not match the swapped model "
                                        f"(missing {sorted(expected - set(params))[:3]}, "
                                        f"unexpected {sorted(set(params) - expected)[:3]})")
    model.load_state_dict(params, strict=False)
    return model
