"""Cluster resources per rule, the sbatch line, and the planner's cost estimate of a sweep.

Three entry points, all pure arithmetic on the resolved config (nothing measured, no torch):

* :func:`rule_resources` — the Snakemake ``resources:`` of one job: ``mem_mb``, ``runtime``
  (minutes), ``cpus_per_task``, ``nodes``, ``tasks``, ``gpus_per_node``, ``slurm_extra``,
  ``sbatch_args`` (+ ``slurm_partition`` / ``slurm_account`` when configured). Memory and
  runtime start from ``resources.stages.<stage>`` in conf/config.yaml, grow with the model
  (CPU-side loading needs ~2.5x the weights' bytes; runtime adds the modelled compute and
  checkpoint I/O) and are multiplied by ``retry_factor ** (attempt - 1)`` on a retry.
* :func:`sbatch_line` — what the ``cluster-generic`` profile submits for those resources.
* :func:`estimate_plan` — jobs, GPU-hours, peak GPU memory and disk per pipeline stage of a
  sweep, from :mod:`frontier.costmodel` on the sweep's hardware (``cpu``: its fallback numbers,
  never a measurement), printed by ``frontier plan`` and at ``snakemake`` parse time.

How GPUs reach Slurm (snakemake-executor-plugin-slurm 2.8). The plugin treats a job as a GPU job
when it has a ``gpu`` or ``gres`` resource, and then turns ``tasks`` into ``--ntasks-per-gpu``
(a 2-GPU job with tasks=2 starts 4 tasks); its jobstep adds ``--gpus=<gpus|gpu>`` to the inner
``srun -n1``, which is wrong for a multi-node job. So no rule sets ``gpu``, ``gpus`` or ``gres``:
GPUs are requested per node through ``slurm_extra`` (``--gpus-per-node=P``, which the plugin's
slurm_extra validator allows), with ``nodes=N``, ``tasks=N`` (the plugin emits ``--ntasks=N``) and
``--ntasks-per-node=1`` — one task per node, whose torchrun spawns the P per-GPU processes. The
job step inherits all the job's GPUs (Slurm's default for a step without ``--gpus``).
``gpus_per_node`` is informational (plugins ignore it; :func:`sbatch_args` reads it).

A stage runs on GPUs when ``resources.stages.<stage>.gpus > 0``, or, for finetune and evaluate,
when the sweep's hardware is not ``cpu``. Fine-tuning on GPUs uses ``finetune.nproc`` GPUs on
each of ``finetune.nodes`` nodes.
"""
from __future__ import annotations

import json
import math
import os
import shlex
from typing import Any, Optional

from . import costmodel
from .config import softmax_layer_count

STAGES = ("base", "quantize", "surgery", "finetune", "evaluate")   # the pipeline's compute stages
MIB = 1024 * 1024

# CPU-side memory: a job loads the (unquantized) parent chain into host memory; 2.5x the weights'
# bytes covers the state dict, the model and transient copies while a delta is applied.
MEM_FACTOR = 2.5
# Bytes/s assumed for reading/writing checkpoints on a shared file system (runtime only).
IO_BYTES_PER_S = 2.0e8
# Runtime = configured floor + RUNTIME_SAFETY x modelled seconds (roofline is optimistic).
RUNTIME_SAFETY = 3.0
# Training reaches a fraction of the roofline peak (model FLOPs utilization).
TRAIN_UTILIZATION = 0.4
# The planner's CPU numbers for CPU-side stages on a GPU sweep (conf/hardware/cpu.yaml's fallback).
CPU_FALLBACK = {"name": "cpu", "peak_flops": 1.0e11, "mem_bw": 1.0e10, "mem_bytes": 2.4e10}
# Quantization methods that run calibration forwards on data (their quantize job costs device time).
CALIBRATED = ("gptq", "awq")
# Tokens generated per recall sample (the answer), for the evaluate estimate.
RECALL_DECODE_TOKENS = 8
_ESTIMATES: dict = {}
# Files every stage writes besides tensors (manifest, spec, metrics): disk floor per job.
SMALL_FILES = 16 * 1024
ENV_PARTITION = "FRONTIER_SLURM_PARTITION"
ENV_ACCOUNT = "FRONTIER_SLURM_ACCOUNT"
# Resource keys every rule has (values neutral for CPU jobs), so `resources: **...` is fixed per rule.
BASE_KEYS = ("mem_mb", "runtime", "cpus_per_task", "nodes", "tasks", "gpus_per_node", "slurm_extra",
             "sbatch_args")


# ------------------------------------------------------------------------------------ helpers
def _stage_cfg(resources_cfg: dict, stage: str) -> dict:
    stages = resources_cfg.get("stages") or {}
    if stage not in stages:
        raise KeyError(f"resources.stages has no '{stage}' (has: {', '.join(stages)})")
    return stages[stage]


def _is_gpu_hardware(hardware: Optional[dict]) -> bool:
    return bool(hardware) and hardware.get("name") != "cpu"


def partition_account(resources_cfg: dict, env: Optional[dict] = None) -> tuple[Optional[str], Optional[str]]:
    """Partition and account: config first, then FRONTIER_SLURM_PARTITION / FRONTIER_SLURM_ACCOUNT."""
    env = os.environ if env is None else env
    part = resources_cfg.get("partition") or env.get(ENV_PARTITION) or None
    acct = resources_cfg.get("account") or env.get(ENV_ACCOUNT) or None
    return part, acct


def resource_keys(resources_cfg: dict, env: Optional[dict] = None) -> tuple[str, ...]:
    """The keys :func:`rule_resources` returns for this config (the same for every stage)."""
    part, acct = partition_account(resources_cfg, env)
    return BASE_KEYS + (("slurm_partition",) if part else ()) + (("slurm_account",) if acct else ())


def full_weight_bytes(model_cfg: dict) -> float:
    """Bytes of the unquantized model in its dtype (what loading the parent chain materialises)."""
    return costmodel.weight_bytes(model_cfg, None)["total"]


def _cpu_hw(hardware: Optional[dict]) -> dict:
    return hardware if hardware and hardware.get("name") == "cpu" and hardware.get("peak_flops") else CPU_FALLBACK


def _gpus(stage: str, point_cfg: dict, sc: dict) -> tuple[int, int]:
    """(nodes, GPUs per node) of a job."""
    gpu_hw = _is_gpu_hardware(point_cfg.get("hardware"))
    if stage == "finetune" and (point_cfg.get("finetune") or {}).get("method", "none") != "none":
        ft = point_cfg["finetune"]
        nodes = int(ft.get("nodes", 1))
        return nodes, (int(ft.get("nproc", 1)) if (sc.get("gpus", 0) > 0 or gpu_hw) else 0)
    if stage == "evaluate":
        return 1, int(sc.get("gpus", 0)) or (1 if gpu_hw else 0)
    return 1, int(sc.get("gpus", 0))


# ------------------------------------------------------------------------------------ work model
# Modelled seconds and bytes of one job of each stage. `hw` is the device the work runs on.
def _lora_params(point_cfg: dict) -> int:
    m, lora = point_cfg["model"], point_cfg["finetune"].get("lora")
    if not isinstance(lora, dict):
        return 0
    shapes = dict(zip(("q_proj", "k_proj", "v_proj", "o_proj"), costmodel.linear_shapes(m)[:4]))
    per_layer = sum(int(lora.get("r", 8)) * (i + o) for t, (i, o) in shapes.items() if t in lora.get("targets", []))
    return int(m["layers"]) * per_layer


def attention_params(model_cfg: dict, attention_cfg: dict) -> int:
    """New parameters a surgery adds (planning estimate): a learned per-head map of the q/k features
    (head_dim x width, per query head and per kv head; hedgehog/taylor always learn theirs) and
    LoLCATs' per-head gate; layers kept softmax add nothing."""
    kind = attention_cfg.get("kind")
    if kind not in ("linear", "lolcats"):
        return 0
    fm = attention_cfg.get("feature_map") or ("hedgehog" if kind == "lolcats" else "elu")
    hd = int(model_cfg.get("head_dim") or int(model_cfg["hidden"]) // int(model_cfg["heads"]))
    width = {"hedgehog": attention_cfg.get("feature_dim") or hd, "taylor": attention_cfg.get("feature_dim") or 16}
    learned = fm in width or bool(attention_cfg.get("learned_map", fm != "performer"))
    per_layer = (int(model_cfg["heads"]) + int(model_cfg["kv_heads"])) * hd * int(width.get(fm, hd)) if learned else 0
    if kind == "lolcats":
        per_layer += int(model_cfg["heads"])
    keep = attention_cfg.get("keep_softmax")
    n_keep = (softmax_layer_count(attention_cfg, int(model_cfg["layers"])) if keep == "auto"
              else len(set(keep or ())))
    return max(int(model_cfg["layers"]) - n_keep, 0) * per_layer


def _act_bits(model_cfg: dict) -> int:
    return costmodel.dtype_bits(model_cfg)


def _infer_activation_bytes(model_cfg: dict, batch: int, L: int) -> float:
    """Working set of one layer's forward at context L (layers run one at a time in inference)."""
    h, inter = int(model_cfg["hidden"]), int(model_cfg["intermediate"])
    return batch * L * (4 * h + 3 * inter) * _act_bits(model_cfg) / 8.0


def _train_activation_bytes(model_cfg: dict, batch: int, L: int) -> float:
    """Stored activations for backward: ~34·s·b·h bytes per layer at 16 bit (no s² term: SDPA)."""
    return int(model_cfg["layers"]) * 34.0 * batch * L * int(model_cfg["hidden"]) * _act_bits(model_cfg) / 16.0


def _logits_bytes(model_cfg: dict, batch: int, L: int) -> float:
    return batch * L * int(model_cfg["vocab"]) * 4.0  # fp32 logits


def _finetune_phases(point_cfg: dict) -> list[dict]:
    ft = point_cfg["finetune"]
    out = []
    for p in ("transfer", "lora", "full"):
        ph = ft.get(p)
        if not isinstance(ph, dict):
            continue
        if p == "transfer" and ph.get("block_size"):   # block-wise: `steps` per block of layers
            blocks = -(-int(point_cfg["model"]["layers"]) // int(ph["block_size"]))
            ph = {**ph, "steps": int(ph["steps"]) * blocks}
        out.append(ph)
    return out


def _job_work(stage: str, point_cfg: dict, hw: dict) -> dict:
    """{"seconds": device-seconds of the job's compute on hw (per device for finetune: wall),
    "mem": peak device bytes, "disk": bytes written}."""
    m, q, a = point_cfg["model"], point_cfg.get("quant"), point_cfg.get("attention")
    full = full_weight_bytes(m)
    bw = float(hw["mem_bw"])
    if stage == "base":
        tr = m.get("train")
        if m.get("source") == "embedded" and tr:
            tokens = int(tr["steps"]) * int(tr["batch"]) * int(tr["seq_len"])
            secs = costmodel.train_seconds(m, None, None, hw, int(tr["seq_len"]), tokens, batch=int(tr["batch"]),
                                           utilization=TRAIN_UTILIZATION)
            params = costmodel.param_count(m)
            mem = params * 16.0 + _train_activation_bytes(m, int(tr["batch"]), int(tr["seq_len"])) \
                + _logits_bytes(m, int(tr["batch"]), int(tr["seq_len"]))
        else:  # import an HF checkpoint: one pass over the weights
            secs, mem = full / bw, full
        return {"seconds": secs, "mem": mem, "disk": full + SMALL_FILES}
    if stage == "quantize":
        qb = costmodel.weight_bytes(m, q)
        secs = 2.0 * full / bw                       # read the weights, write the quantized ones
        mem = full + qb["total"]
        if q and q.get("method") in CALIBRATED:      # calibration forwards (+ GPTQ's per-linear solves)
            sl, n = int(q.get("calib_seq_len", 256)), int(q.get("calib_samples", 32))
            secs += n * costmodel.estimate(m, None, None, hw, sl, prefill_logits="all")["prefill"]["seconds"]
            if q["method"] == "gptq":
                flops = int(m["layers"]) * sum(i ** 3 / 3.0 + 2.0 * i * i * o for i, o in costmodel.linear_shapes(m))
                secs += flops / float(hw["peak_flops"])
            mem += _infer_activation_bytes(m, n, sl)
        return {"seconds": secs, "mem": mem, "disk": qb["linears"] + SMALL_FILES}
    if stage == "surgery":
        new = attention_params(m, a or {}) * 4.0  # new parameters are kept in fp32
        wb = costmodel.weight_bytes(m, q)["total"]
        return {"seconds": (wb + new) / bw, "mem": wb + new, "disk": new + SMALL_FILES}
    if stage == "finetune":
        ft = point_cfg["finetune"]
        world = int(ft.get("nodes", 1)) * int(ft.get("nproc", 1))
        secs = 0.0
        act = 0.0
        for ph in _finetune_phases(point_cfg):
            mb, sl = int(ph["micro_batch"]), int(ph["seq_len"])
            tokens_per_rank = int(ph["steps"]) * mb * int(ph.get("grad_accum", 1)) * sl
            if tokens_per_rank:
                secs += costmodel.train_seconds(m, q, a, hw, sl, tokens_per_rank, batch=mb,
                                                utilization=TRAIN_UTILIZATION)
            act = max(act, _train_activation_bytes(m, mb, sl) + _logits_bytes(m, mb, sl))
        if ft.get("method") == "full":
            trainable = costmodel.param_count(m) + attention_params(m, a or {})
        else:
            trainable = attention_params(m, a or {}) + _lora_params(point_cfg)
        # fp32 param + grad (4+4) per trainable parameter; Adam's two fp32 states sharded by ZeRO >= 1
        opt = trainable * 8.0 / (world if int(ft.get("zero_stage", 0)) >= 1 else 1)
        mem = costmodel.weight_bytes(m, q)["total"] + trainable * 8.0 + opt + act
        return {"seconds": secs, "mem": mem, "disk": trainable * 4.0 + SMALL_FILES, "devices": world}
    if stage == "evaluate":
        ev = point_cfg["eval"]
        cost, rec, ppl = ev["cost"], ev["recall"], ev["ppl"]
        batch = int(cost.get("batch", 1))
        kv_bits = None  # costmodel.kv_spec reads quant.kv_bits / kv_group / kv_residual
        key = json.dumps([m, q, a, hw], sort_keys=True, default=str)

        def est(L: int, b: int = 1, logits: str = "last") -> dict:   # costmodel.estimate, memoised
            k = (key, L, b, logits)
            if k not in _ESTIMATES:
                if len(_ESTIMATES) > 200_000:
                    _ESTIMATES.clear()
                _ESTIMATES[k] = costmodel.estimate(m, q, a, hw, L, batch=b, prefill_logits=logits, kv_bits=kv_bits)
            return _ESTIMATES[k]

        def ladder(lens, decode_tokens: int, b: int = 1) -> float:     # = costmodel.eval_seconds
            return sum(est(int(L), b)["prefill"]["seconds"] + decode_tokens * est(int(L), b)["decode"]["seconds"]
                       for L in lens)

        repeats = int(cost.get("repeats", 1)) + int(cost.get("warmup", 0))
        secs = repeats * ladder(cost["context_lens"], int(cost["decode_tokens"]), batch)
        windows = math.ceil(int(ppl["max_tokens"]) / int(ppl["stride"]))
        secs += windows * est(int(ppl["seq_len"]), 1, "all")["prefill"]["seconds"]
        secs += int(rec["samples"]) * ladder(rec["context_lens"], RECALL_DECODE_TOKENS)
        lmax = max([*cost["context_lens"], *rec["context_lens"]])
        wb = costmodel.weight_bytes(m, q)["total"]
        mem = wb + est(int(lmax), batch)["state_bytes"] + _infer_activation_bytes(m, batch, lmax)
        mem = max(mem, wb + _infer_activation_bytes(m, 1, int(ppl["seq_len"])) + _logits_bytes(m, 1, int(ppl["seq_len"])))
        return {"seconds": secs, "mem": mem, "disk": SMALL_FILES}
    raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")


# ------------------------------------------------------------------------------------ rule resources
def rule_resources(stage: str, point_cfg: dict, resources_cfg: dict, attempt: int = 1,
                   env: Optional[dict] = None) -> dict:
    """Snakemake resources of one job of `stage` (base, quantize, surgery, finetune, evaluate, collect).

    `point_cfg` is the point's resolved config (its model, quant, attention, finetune, eval,
    hardware), `resources_cfg` the `resources:` section, `attempt` Snakemake's attempt (1 first).
    """
    sc = _stage_cfg(resources_cfg, stage)
    attempt = max(1, int(attempt))
    factor = float(resources_cfg.get("retry_factor", 1.5)) ** (attempt - 1)
    mem_mb = float(sc.get("mem_mb", 4000))
    minutes = float(sc.get("runtime", 60))
    cpus = int(sc.get("cpus", 1))
    nodes, gpn = 1, 0
    if stage != "collect":
        nodes, gpn = _gpus(stage, point_cfg, sc)
        full = full_weight_bytes(point_cfg["model"])
        procs = 1
        if stage == "finetune" and point_cfg["finetune"].get("method", "none") != "none":
            procs = int(point_cfg["finetune"].get("nproc", 1))   # every rank loads the model on the host
            cpus = max(cpus, procs)
        mem_mb = max(mem_mb, MEM_FACTOR * full * procs / MIB)
        hw = point_cfg.get("hardware") if gpn else _cpu_hw(point_cfg.get("hardware"))
        work = _job_work(stage, point_cfg, costmodel.resolve_hardware(hw or CPU_FALLBACK))
        # finetune's seconds are per rank (tokens per rank): on GPUs that is the wall time; on CPUs
        # the node's ranks share the cores the roofline numbers describe
        secs = work["seconds"] * (procs if not gpn else 1)
        io = (full + work["disk"]) / IO_BYTES_PER_S
        minutes += RUNTIME_SAFETY * (secs + io) / 60.0
    part, acct = partition_account(resources_cfg, env)
    res: dict[str, Any] = {
        "mem_mb": int(math.ceil(mem_mb * factor)),
        "runtime": int(math.ceil(minutes * factor)),
        "cpus_per_task": cpus,
        "nodes": nodes,
        "tasks": nodes,                         # one task per node
        "gpus_per_node": gpn,
        "slurm_extra": "",
    }
    extra = []
    if nodes > 1 or (gpn and stage == "finetune"):
        extra.append("--ntasks-per-node=1")    # torchrun on each node spawns the per-GPU processes
    if gpn:
        extra.append(f"--gpus-per-node={gpn}")
    res["slurm_extra"] = " ".join(extra)
    if part:
        res["slurm_partition"] = part
    if acct:
        res["slurm_account"] = acct
    res["sbatch_args"] = sbatch_args(res)
    return res


def sbatch_args(resources: dict) -> str:
    """sbatch flags for a resources dict (everything but job name, output and the script)."""
    r = resources
    args = []
    if r.get("slurm_partition"):
        args.append(f"--partition={shlex.quote(str(r['slurm_partition']))}")
    if r.get("slurm_account"):
        args.append(f"--account={shlex.quote(str(r['slurm_account']))}")
    nodes = int(r.get("nodes") or 1)
    args += [f"--nodes={nodes}", f"--ntasks={int(r.get('tasks') or nodes)}"]
    if r.get("slurm_extra"):
        args.append(str(r["slurm_extra"]))
    args += [f"--cpus-per-task={int(r.get('cpus_per_task') or 1)}", f"--mem={int(r['mem_mb'])}",
             f"--time={int(r['runtime'])}", "--requeue"]
    return " ".join(args)


def sbatch_line(resources: dict, job_name: str, output: Optional[str] = None) -> str:
    """The submit command the cluster-generic profile builds (before the job script path)."""
    out = f" --output={shlex.quote(output)}" if output else ""
    flags = resources.get("sbatch_args") or sbatch_args(resources)
    return f"sbatch --parsable --job-name={shlex.quote(job_name)}{out} {flags}"


# ------------------------------------------------------------------------------------ plan estimate
def _hardware(plan) -> dict:
    hw = dict(plan.globals.get("hardware") or {})
    if not (hw.get("peak_flops") and hw.get("mem_bw")):
        hw = {**CPU_FALLBACK, **{k: v for k, v in hw.items() if v is not None}} if hw.get("name") in (None, "cpu") \
            else costmodel.resolve_hardware(hw)
    return hw


def estimate_plan(plan) -> dict:
    """Per pipeline stage and in total: jobs, GPU-hours, peak GPU memory, disk written.

    GPU-hours are device-hours on the sweep's hardware (`plan.globals["hardware"]`; for `cpu`
    the config's fallback numbers, never a measurement): evaluate = the eval ladder (cost
    ladder + perplexity windows + recall samples), finetune = train_seconds of the transfer +
    LoRA token budgets per rank x nodes x nproc at TRAIN_UTILIZATION, base = training the
    embedded model (or one pass over an imported checkpoint), quantize/surgery = passes over the
    weights. Peak GPU memory = weights + KV cache/state at the largest context + activations.
    Disk: base = full weights, quantize = quantized linears, surgery = new parameters,
    finetune = the trained delta, evaluate = metrics files.
    """
    hw = _hardware(plan)
    work_cache: dict = {}
    out: dict = {"hardware": hw.get("name", "?"), "stages": {}, "total": {}}
    for stage, jobs in plan.jobs().items():
        if stage not in STAGES:
            continue
        row = {"jobs": 0, "gpu_hours": 0.0, "peak_gpu_mem_bytes": 0.0, "disk_bytes": 0.0}
        for point in jobs.values():
            key = (stage, _fingerprint(stage, point.cfg))
            w = work_cache.get(key)
            if w is None:
                w = work_cache[key] = _job_work(stage, point.cfg, hw)
            row["jobs"] += 1
            row["gpu_hours"] += costmodel.gpu_hours(w["seconds"], w.get("devices", 1))
            row["peak_gpu_mem_bytes"] = max(row["peak_gpu_mem_bytes"], w["mem"])
            row["disk_bytes"] += w["disk"]
        out["stages"][stage] = row
    rows = list(out["stages"].values())
    out["total"] = {"jobs": sum(r["jobs"] for r in rows), "gpu_hours": sum(r["gpu_hours"] for r in rows),
                    "peak_gpu_mem_bytes": max((r["peak_gpu_mem_bytes"] for r in rows), default=0.0),
                    "disk_bytes": sum(r["disk_bytes"] for r in rows)}
    return out


_STAGE_SECTIONS = {"base": ("model",), "quantize": ("model", "quant"), "surgery": ("model", "quant", "attention"),
                   "finetune": ("model", "quant", "attention", "finetune"),
                   "evaluate": ("model", "quant", "attention", "finetune", "eval")}


def _fingerprint(stage: str, cfg: dict) -> str:
    return json.dumps([cfg.get(s) for s in _STAGE_SECTIONS[stage]], sort_keys=True, default=str)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n:.1f} PiB"  # pragma: no cover


def _fmt_hours(h: float) -> str:
    if h == 0:
        return "0"
    if h >= 100:
        return f"{h:,.0f}"
    return f"{h:.3g}"


def format_estimate(est: dict) -> str:
    """The cost table printed by `frontier plan` and at snakemake parse time."""
    hw = est.get("hardware", "?")
    note = " (planner fallback numbers, not measured)" if hw == "cpu" else ""
    lines = [f"estimated cost on hardware {hw}{note}:",
             f"  {'stage':<10} {'jobs':>6} {'GPU-h':>10} {'peak GPU mem':>13} {'disk':>11}"]

    def row(name: str, r: dict) -> str:
        return (f"  {name:<10} {r['jobs']:>6} {_fmt_hours(r['gpu_hours']):>10} "
                f"{_fmt_bytes(r['peak_gpu_mem_bytes']):>13} {_fmt_bytes(r['disk_bytes']):>11}")

    for name, r in est["stages"].items():
        lines.append(row(name, r))
    lines.append(row("total", est["total"]))
    return "\n".join(lines)

