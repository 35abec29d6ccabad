"""DeepSpeed: the config dict of a training phase, engine construction, parameter gathering.

One engine per phase (attention transfer, then LoRA), each with a client `torch.optim.AdamW`
over that phase's trainable parameters only (no C++ build needed), a linear-warmup + cosine
learning-rate schedule (a client `LambdaLR`, stepped by the engine and saved in its
checkpoints), ZeRO stage / precision / clipping from the finetune config.

Optimizer offload (`offload_optimizer: true`, ZeRO >= 1): `zero_optimization.offload_optimizer
= {device: cpu}`: the fp32 partitions, their gradients and the optimizer step live on the CPU.
On CUDA the client optimizer is DeepSpeed's `DeepSpeedCPUAdam` (the fast CPU Adam offload is
built for; it JIT-compiles once, ~40 s). Without CUDA the "device" already is the CPU, and
CPUAdam's build buys nothing there: the client `torch.optim.AdamW` stays, with
`zero_force_ds_cpu_optimizer: false` (DeepSpeed otherwise refuses a client optimizer under
offload). The engine then runs ZeRO-Offload's code path (CPU fp32 partitions, gradient
copies into them) with torch's AdamW stepping them.

Frozen quantized weights: ZeRO 1/2 partition only what the optimizer holds (the trainable
parameters), so a torchao-quantized frozen base is fine there; ZeRO-3 partitions every
parameter and cannot hold torchao tensor subclasses (rejected at plan time by the config).
DeepSpeed's start-up broadcast of all parameters from rank 0 views each tensor as bytes,
which torchao's tensor subclasses do not support; every rank loads the identical parent
checkpoint, so those are skipped (`patch_engine`).
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Iterable, Optional

WARMUP_FRACTION = 0.1
MIN_LR_RATIO = 0.1


def dist_backend() -> str:
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def lr_lambda(steps: int, warmup: Optional[int] = None):
    """Multiplier of the peak lr at optimizer step `i` (0-based): linear warmup, cosine to 10%."""
    warm = max(1, int(round(WARMUP_FRACTION * steps))) if warmup is None else max(1, warmup)

    def f(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        frac = min(1.0, (i - warm) / max(1, steps - warm))
        return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * frac))

    return f


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in (b or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def ds_config(ft: dict, phase: dict, world: int, overrides: Optional[dict] = None, *,
              cuda: Optional[bool] = None) -> dict:
    """The DeepSpeed config of one phase.

    `ft` is the finetune config, `phase` its `transfer`, `lora` or `full` section, `world`
    the number of data-parallel processes; `overrides` is merged in last. `cuda` (default:
    whether CUDA is there) decides the optimizer side of offload (see the module docstring).
    """
    mb, ga = int(phase["micro_batch"]), int(phase.get("grad_accum", 1))
    stage = int(ft["zero_stage"])
    cuda = _cuda() if cuda is None else cuda
    zero = {"stage": stage}
    if stage >= 2:
        # gloo has no reduce-scatter: DeepSpeed emulates it with one reduce per rank, which measured
        # ~5 ms/step slower than a single all-reduce of the bucket on 2 CPU processes
        # (bench/finetune.py); NCCL has the real thing, and it halves the gradient traffic
        zero.update(contiguous_gradients=True, overlap_comm=False, reduce_scatter=bool(cuda))
    offload = bool(ft.get("offload_optimizer", False))
    if offload:
        if stage == 0:
            raise ValueError("finetune.offload_optimizer needs zero_stage 1, 2 or 3")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": bool(cuda)}
    cfg = {
        "train_micro_batch_size_per_gpu": mb,
        "gradient_accumulation_steps": ga,
        "train_batch_size": mb * ga * world,
        "gradient_clipping": float(ft["grad_clip"]),
        "zero_optimization": zero,
        "bf16": {"enabled": ft["precision"] == "bf16"},
        "fp16": {"enabled": False},
        # a client torch AdamW under ZeRO: supported, just not on DeepSpeed's own list
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        "checkpoint": {"tag_validation": "Warn"},
    }
    if offload and not cuda:
        cfg["zero_force_ds_cpu_optimizer"] = False  # keep the client torch AdamW (no CPUAdam build)
    return _merge(cfg, overrides or {})


def uses_cpu_adam(cfg: dict) -> bool:
    """Whether a phase with this DeepSpeed config steps with DeepSpeedCPUAdam (offload on CUDA)."""
    z = cfg.get("zero_optimization", {})
    return bool(z.get("offload_optimizer")) and z["offload_optimizer"].get("device") == "cpu" \
        and cfg.get("zero_force_ds_cpu_optimizer", True)


def patch_engine() -> None:
    """Let DeepSpeedEngine take a model with torchao-quantized frozen weights (idempotent).

    - the start-up broadcast of every parameter from rank 0 skips tensor subclasses (each
      rank loaded the same checkpoint; the byte view the broadcast takes does not exist);
    - the engine's `module.to(device)` is skipped for such a model (the worker placed it on
      its device already; torchao tensors cannot be swapped in place by `Module.to`).
    """
    from deepspeed.runtime.engine import DeepSpeedEngine

    from .lora import is_quantized_tensor

    if getattr(DeepSpeedEngine, "_frontier_patched", False):
        return
    original = DeepSpeedEngine._broadcast_model

    def _broadcast_model(self):
        module = self.module
        hidden = {}
        # temporarily hide quantized parameters from named_parameters()
        for mname, mod in module.named_modules():
            for pname, p in list(mod._parameters.items()):
                if p is not None and is_quantized_tensor(p):
                    hidden[(mname, pname)] = (mod, p)
                    del mod._parameters[pname]
        try:
            original(self)
        finally:
            for (mname, pname), (mod, p) in hidden.items():
                mod._parameters[pname] = p

    original_cdm = DeepSpeedEngine._configure_distributed_model

    def _configure_distributed_model(self, model):
        if any(is_quantized_tensor(p) for p in model.parameters()):
            self.dont_change_device = True
        return original_cdm(self, model)

    DeepSpeedEngine._broadcast_model = _broadcast_model
    DeepSpeedEngine._configure_distributed_model = _configure_distributed_model
    DeepSpeedEngine._frontier_patched = True


def build(module, params: Iterable, ft: dict, phase: dict, world: int, steps: int,
          overrides: Optional[dict] = None):
    """deepspeed.initialize on `module` training only `params`; returns (engine, ds_config)."""
    import deepspeed
    import torch

    patch_engine()
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters for this phase")
    cfg = ds_config(ft, phase, world, overrides)
    kw = dict(lr=float(phase["lr"]), betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    if uses_cpu_adam(cfg):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(params, adamw_mode=True, **kw)
    else:
        opt = torch.optim.AdamW(params, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps))
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched, config=cfg)
    return engine, cfg


@contextlib.contextmanager
def gathered(params: list, zero_stage: int):
    """Full values of `params` inside the block (ZeRO-3 gathers its partitions)."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def gather_named(named: dict, zero_stage: int) -> dict:
    """{name: CPU fp32 copy} of the full parameters (collective under ZeRO-3: call on every rank)."""
    import torch

    items = list(named.items())
    with gathered([p for _, p in items], zero_stage):
        return {n: p.detach().to("cpu", torch.float32).clone() for n, p in items}


def current_lr(engine) -> float:
    try:
        return float(engine.get_lr()[0])
    except Exception:  # noqa: BLE001
        return float(engine.optimizer.param_groups[0]["lr"])
