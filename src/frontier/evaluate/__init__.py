"""Stage `evaluate`: quality and measured cost of one grid point, written to `metrics.json`.

`run()` loads the point's checkpoint chain (`frontier.checkpoint.load_point`), measures

* quality: strided perplexity on the held-out split (`perplexity`); accuracy of the
  synthetic long-context tasks of `eval.recall.tasks` (key-value recall, passkey, RULER-style
  needles, MQAR) at each `eval.recall.context_lens` (`recall`, `ruler`, `mqar`); the
  lm-evaluation-harness tasks of `eval.harness.tasks`, in-process on the loaded model
  (`harness`, quality keys `harness.<task>.<metric>`). Quality and cost run the same
  quantized layers (`frontier.quantize.fastpath` picks the computation by shape: the low-bit
  kernel for decode, the weight dequantized on the fly for prefill); `metrics.json` records
  `quality_weights: kernel` for a quantized model (`eval.quality_weights` is accepted for
  old configs and ignored: there are no dense copies any more);
* cost: prefill latency, decode tokens/s, peak memory and cache/state bytes at each
  `eval.cost.context_lens` (`measure`), weight bytes, logical parameter count and the
  effective bits per decoder Linear weight;
* with `quant.kv_bits < 16` all of it on the quantized KV cache (`frontier.kvcache`): the cost
  ladder prefills into it and decodes from it; perplexity, MQAR and the recall prompts stream
  through it `eval.kv_chunk` tokens at a time (a one-shot prefill attends in full precision);

and writes `metrics.json` atomically. `metrics.json` is the source of truth; W&B mirrors it.
A point that fails (any exception, a non-finite perplexity, a missing/corrupt or failed
parent checkpoint) is written with `status: failed` and a one-line reason, never lost.
Non-fatal problems (a recall task whose prompt cannot fit at some L, a harness failure under
`eval.harness.on_error: warn`) are listed, one line each, under `warnings`.
"""
from __future__ import annotations

import logging
import math
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from frontier import checkpoint, dequant, kvcache, tracking as _tracking

from . import harness as _harness
from .measure import device_name, measure_costs, weight_stats
from .perplexity import evaluate_perplexity
from .recall import evaluate_recall

__all__ = ["run", "ParentFailed", "metrics_record"]
log = logging.getLogger(__name__)


class ParentFailed(RuntimeError):
    """A checkpoint in the point's chain was recorded as failed; nothing to evaluate."""


def _finite(x: Any) -> Any:
    """JSON-safe numbers: non-finite floats become None (strict JSON has no NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def _reason(e: BaseException) -> str:
    msg = " ".join(str(e).split())  # one line
    if isinstance(e, ParentFailed):
        return msg
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def check_parents(ckpt_dir: Path) -> None:
    """Walk the chain's manifests (unverified) from `ckpt_dir` towards the base; raise
    ParentFailed, with its reason, for the failed manifest closest to the base (the root cause)
    when any is recorded `status: failed`. A missing manifest raises IntegrityError, unless a
    failed stage above it already explains the failure."""
    failed: Optional[dict] = None
    cur: Optional[Path] = Path(ckpt_dir)
    for _ in range(17):
        if cur is None:
            break
        try:
            m = checkpoint.read_manifest(cur, verify=False)
        except Exception:
            if failed is None:
                raise
            break
        if m.get("status", "ok") == "failed":
            failed = m
        cur = (cur / m["parent"]).resolve() if m.get("parent") else None
    if failed is not None:
        raise ParentFailed(f"{failed.get('stage', 'parent')} stage failed: {failed.get('reason') or 'no reason recorded'}")


def metrics_record(*, point_id: str, sweep: str, choices: dict, overrides: dict, cfg: dict) -> dict:
    """A metrics.json skeleton with every key present."""
    return {"point_id": point_id, "sweep": sweep, "status": "ok", "reason": None,
            "choices": dict(choices or {}), "overrides": dict(overrides or {}), "config": cfg,
            "quality": {}, "weight_bytes": None, "params": None, "effective_bits": None,
            "costs": [], "versions": checkpoint.library_versions(), "device": None, "wall_s": None,
            "attention_layers": None, "quality_weights": None, "warnings": [], "wandb": None}


def _evaluate(rec: dict, ckpt_dir: Path, cfg: dict, progress: bool) -> None:
    import torch

    check_parents(ckpt_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = time.time()
    point = checkpoint.load_point(Path(ckpt_dir), verify=True, device=device)
    model, tok = point.model, point.tokenizer
    model.eval()
    rec["device"] = device_name(model)
    log.info("loaded %s (%d stages) on %s in %.1fs", ckpt_dir, len(point.manifests), rec["device"], time.time() - t)

    rec.update(weight_stats(model))
    for m in point.manifests:  # hybrids: which layers kept softmax, and (auto) the diagnostics behind it
        if m.get("stage") == "surgery" and isinstance(m.get("attention"), dict):
            rec["attention_layers"] = {"keep_softmax": m["attention"].get("keep_softmax") or [],
                                       "diagnostics": m["attention"].get("diagnostics")}
    ev = cfg["eval"]
    # one path for quality and cost: the quantized layers themselves (eval.quality_weights is ignored)
    rec["quality_weights"] = "kernel" if dequant.has_quantized_weights(model) else None
    _quality(rec, model, tok, cfg, progress)
    t = time.time()
    rec["costs"] = measure_costs(model, ev["cost"], seed=int(ev["recall"].get("seed", 0)), progress=progress,
                                 weight_bytes=rec["weight_bytes"], kv=kvcache.kv_spec(cfg["quant"]))
    log.info("cost ladder done (%.1fs)", time.time() - t)


def _quality(rec: dict, model, tok, cfg: dict, progress: bool) -> None:
    ev = cfg["eval"]
    t = time.time()
    model.frontier_kv = kvcache.kv_spec(cfg["quant"])  # quant.kv_bits < 16: quality streams through that cache
    rec["quality"].update(evaluate_perplexity(model, tok, ev, cfg["data"], progress=progress))
    log.info("perplexity %.3f (%.1fs)", rec["quality"]["ppl"], time.time() - t)
    t = time.time()
    rec["quality"].update(evaluate_recall(model, tok, {**ev["recall"], "kv_chunk": int(ev.get("kv_chunk", 32))},
                                          progress=progress, warnings=rec["warnings"]))
    log.info("recall done (%.1fs)", time.time() - t)
    hcfg = ev.get("harness") or {}
    if hcfg.get("tasks"):
        t = time.time()
        rec["versions"]["lm_eval"] = _harness.version()
        try:
            rec["quality"].update(_harness.evaluate_harness(model, tok, hcfg, seed=int(ev["recall"].get("seed", 0))))
        except Exception as e:  # noqa: BLE001 - on_error: warn keeps the point's other metrics
            if hcfg.get("on_error", "fail") != "warn":
                raise
            msg = f"harness failed: {_reason(e)}"
            log.error("%s\n%s", msg, traceback.format_exc())
            rec["warnings"].append(msg)
        log.info("harness done (%.1fs)", time.time() - t)


def run(ckpt_dir: Path, cfg: dict, *, point_id: str, sweep: str, choices: dict, overrides: dict,
        out_path: Path, tracking: Optional[dict] = None, work_dir: str = "work",
        progress: bool = True) -> dict:
    """Evaluate the checkpoint at `ckpt_dir` (a `_ckpt` dir) and write `metrics.json` at `out_path`.

    `cfg` is the full resolved point config (model, quant, attention, finetune, eval, hardware,
    data). Returns the record written. Never raises for a failed evaluation: the record then
    has `status: "failed"` and `reason: "<ExceptionType>: message"` (the traceback is logged).
    """
    t0 = time.time()
    rec = metrics_record(point_id=point_id, sweep=sweep, choices=choices, overrides=overrides, cfg=cfg)
    with _tracking.run(tracking, job_type="evaluate", group=sweep, name=point_id, config=cfg,
                       work_dir=work_dir) as wb:
        try:
            _evaluate(rec, Path(ckpt_dir), cfg, progress)
        except Exception as e:  # noqa: BLE001 - a failed point is recorded, not lost
            rec["status"], rec["reason"] = "failed", _reason(e)
            if isinstance(e, ParentFailed):
                log.error("evaluate %s: %s", point_id, rec["reason"])
            else:
                log.error("evaluate %s failed: %s\n%s", point_id, rec["reason"], traceback.format_exc())
        if rec["device"] is None:
            rec["device"] = device_name()
        rec["wall_s"] = round(time.time() - t0, 3)
        rec["wandb"] = wb.ref()
        rec = _finite(rec)
        checkpoint.atomic_write_json(Path(out_path), rec)
        try:
            summary = {**rec["quality"], "status": rec["status"], "weight_bytes": rec["weight_bytes"],
                       "params": rec["params"], "effective_bits": rec["effective_bits"], "wall_s": rec["wall_s"]}
            summary.update({f"{c['metric']}@{c['context_len']}": c["value"] for c in rec["costs"]})
            if rec["reason"]:
                summary["reason"] = rec["reason"]
            wb.summary({k: v for k, v in summary.items() if v is not None})
            if rec["costs"]:
                wb.table("costs", ["context_len", "metric", "value"],
                         [[c["context_len"], c["metric"], c["value"]] for c in rec["costs"]])
        except Exception as e:  # noqa: BLE001 - tracking never fails an evaluation
            log.warning("tracking failed: %s", e)
    return rec
