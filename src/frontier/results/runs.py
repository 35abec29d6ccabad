"""From per-point ``metrics.json`` to rows: the runs row of a point, its measured and modelled
cost rows, the quality columns of a sweep, and ``gap_closed`` of fine-tuned points."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

from frontier import costmodel
from frontier.results.families import family_of
from frontier.results.schema import (
    _KNOWN_RUN_COLS,
    CHOICE_GROUPS,
    INDEXED_Q,
    to_float,
    to_int,
    to_str,
)

# gap_closed is null when |ppl_untuned - ppl_softmax| <= GAP_REL_EPS * ppl_softmax (nothing to close)
GAP_REL_EPS = 1e-3


def load_metrics(paths: Iterable[str | Path]) -> tuple[list[dict], list[str]]:
    """Read metrics.json files; unreadable ones are reported in the warnings, not fatal."""
    out, warnings = [], []
    for p in paths:
        p = Path(p)
        try:
            m = json.loads(p.read_text())
            if "point_id" not in m:
                raise KeyError("point_id")
        except (OSError, ValueError, KeyError) as e:
            warnings.append(f"skipped {p}: {type(e).__name__}: {e}")
            continue
        m["_path"] = str(p)
        out.append(m)
    return out, warnings


def _flatten(d: dict, prefix: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for k, v in (d or {}).items():
        key = f"{prefix}.{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = to_str(v)
    return out


def run_row(m: dict, sweep: str) -> dict:
    """The ``runs.parquet`` row of one point's metrics (``gap_closed`` is added over the sweep)."""
    choices = m.get("choices") or {}
    config = m.get("config") or {}
    row: dict[str, Any] = {
        "sweep": m.get("sweep") or sweep,
        "point_id": m["point_id"],
        **{g: to_str(choices.get(g)) for g in CHOICE_GROUPS},
        "family": family_of(choices, config),
        "status": m.get("status") or "ok",
        "reason": to_str(m.get("reason")),
        "device": to_str(m.get("device")),
        "quality_weights": to_str(m.get("quality_weights")),
        "metrics_path": m.get("_path"),
        "weight_bytes": to_int(m.get("weight_bytes")),
        "params": to_int(m.get("params")),
        "effective_bits": to_float(m.get("effective_bits")),
        "wall_s": to_float(m.get("wall_s")),
        "wandb_url": _wandb_link(m.get("wandb")),
        "versions": json.dumps(m.get("versions") or {}, sort_keys=True, default=str),
        "config_json": json.dumps(config, sort_keys=True, default=str),
    }
    for k, v in (m.get("overrides") or {}).items():
        row[f"ovr.{k}"] = to_str(v)
    for group, sub in config.items():
        if isinstance(sub, dict):
            row.update(_flatten(sub, f"cfg.{group}"))
        else:
            row[f"cfg.{group}"] = to_str(sub)
    layers = m.get("attention_layers") or {}
    if layers:
        row["attn.keep_softmax"] = json.dumps(layers.get("keep_softmax") or [])
        for k in ("entropy", "sink_mass", "massive", "score"):
            d = (layers.get("diagnostics") or {}).get(k)
            row[f"attn.{k}"] = None if d is None else json.dumps(d)
    for k, v in (m.get("quality") or {}).items():
        row[str(k)] = to_float(v)
    return row


def _wandb_link(ref) -> str | None:
    """The W&B run's URL, or ``file://<run dir>`` for an offline run (``wandb sync <dir>``)."""
    if not isinstance(ref, dict):
        return None
    if ref.get("url"):
        return str(ref["url"])
    return f"file://{ref['dir']}" if ref.get("dir") else None


def _q_sort_key(name: str) -> tuple:
    m = INDEXED_Q.match(name)
    if name == "ppl":
        return (0, "", 0)
    if m:
        return (2, m["base"], int(m["L"]))
    return (1, name, 0)


def quality_columns(runs: list[dict]) -> list[str]:
    """The quality columns of ``runs``: ``ppl``, other unindexed ones, then ``<metric>@<L>`` by L."""
    cols: set[str] = set()
    for r in runs:
        cols.update(r)
    return sorted((c for c in cols if c not in _KNOWN_RUN_COLS and not c.startswith(("ovr.", "cfg.", "attn."))),
                  key=_q_sort_key)


def point_parts(point_id: str) -> tuple | None:
    """(model, quant, attention, finetune, eval) components of a point_id, None if it has another
    shape. A `quant.when: post` point, `<model>/none/<attention>/<finetune>/<quant>~when=post/<eval>`,
    maps to (model, "<quant>~when=post", attention, finetune, eval): its quant is the post one."""
    parts = str(point_id).split("/")
    if len(parts) == len(CHOICE_GROUPS):
        return tuple(parts)
    if len(parts) == len(CHOICE_GROUPS) + 1:
        m, _, a, ft, q, e = parts
        return (m, q, a, ft, e)
    return None


def _untuned(row: dict, parts: tuple) -> bool:
    method = row.get("cfg.finetune.method")
    return method == "none" if method is not None else parts[3] == "none"


def _softmax(row: dict, parts: tuple) -> bool:
    kind = row.get("cfg.attention.kind")
    return kind == "softmax" if kind is not None else parts[2] == "softmax"


def row_config(row: dict) -> dict:
    """A runs row's resolved config (its ``config_json``); {} when absent or unreadable."""
    try:
        return json.loads(row.get("config_json") or "{}") or {}
    except (TypeError, ValueError):
        return {}


def _ppl_protocol(row: dict, e: str) -> str:
    """What a point's perplexity was measured under: the eval's `ppl` section and the KV cache
    (quant.kv_bits / kv_group / kv_residual), from its resolved config; the eval component of
    the point_id when the row has no config. Two eval options with the same ppl protocol (e.g.
    a long and a short recall ladder) give comparable perplexities."""
    cfg = row_config(row)
    ppl = (cfg.get("eval") or {}).get("ppl")
    if not isinstance(ppl, dict):
        return e
    q = cfg.get("quant") or {}
    kv = int(q.get("kv_bits") or 16)
    return json.dumps({"ppl": ppl, "kv": [kv, q.get("kv_group"), q.get("kv_residual")] if kv < 16 else 16},
                      sort_keys=True, default=str)


def gap_closed(runs: list[dict], quality: str = "ppl", rel_eps: float = GAP_REL_EPS,
               log: bool = False) -> dict[str, float | None]:
    """{point_id: fraction of the perplexity gap closed} for every fine-tuned point (others: None).

    ``(ppl_untuned - ppl_tuned) / (ppl_untuned - ppl_softmax)`` (``log``: of the log-perplexities,
    i.e. of the losses in nats, which does not flatter: closing 93 % of a 238 → 6.2 gap in ppl is
    64 % in nats), where *untuned* is the point with the same model/quant/attention and
    perplexity protocol and finetune ``none``, and *softmax* the one with the same
    model/quant/protocol, softmax attention and finetune ``none`` (matched on the point_id's
    components ``<model>/<quant>/<attention>/<finetune>/<eval>``, the eval component read as its
    perplexity protocol (:func:`_ppl_protocol`); a component whose option is literally
    ``none``/``softmax`` preferred when several match). 1 = the fine-tuned point reaches softmax
    quality, 0 = no better than untuned, < 0 = worse. None when the point or a reference failed
    or has no ``quality`` value, or when the gap is ~0 (``|untuned - softmax| <= rel_eps *
    softmax``, e.g. a fine-tuned softmax point).
    """
    f = (lambda x: math.log(x)) if log else (lambda x: x)
    untuned: dict[tuple, list] = {}
    softmax: dict[tuple, list] = {}
    for r in runs:
        parts = point_parts(r["point_id"])
        q = to_float(r.get(quality))
        if parts is None or r.get("status") != "ok" or q is None or not _untuned(r, parts):
            continue
        m, qu, a, ft, e = parts
        e = _ppl_protocol(r, e)
        untuned.setdefault((m, qu, a, e), []).append((ft != "none", r["point_id"], q))
        if _softmax(r, parts):
            softmax.setdefault((m, qu, e), []).append((a != "softmax", ft != "none", r["point_id"], q))
    out: dict[str, float | None] = {}
    for r in runs:
        parts = point_parts(r["point_id"])
        out[r["point_id"]] = None
        if parts is None or _untuned(r, parts):
            continue
        m, qu, a, _, e = parts
        e = _ppl_protocol(r, e)
        tuned = to_float(r.get(quality)) if r.get("status") == "ok" else None
        u, s = untuned.get((m, qu, a, e)), softmax.get((m, qu, e))
        if tuned is None or not u or not s:
            continue
        ppl_u, ppl_s = min(u)[-1], min(s)[-1]
        if log and min(ppl_u, ppl_s, tuned) <= 0:
            continue
        gap = f(ppl_u) - f(ppl_s)
        if abs(ppl_u - ppl_s) <= rel_eps * abs(ppl_s):
            continue
        out[r["point_id"]] = (f(ppl_u) - f(tuned)) / gap
    return out


def measured_cost_rows(m: dict) -> list[dict]:
    """``costs.parquet`` rows of a point's measured costs (hardware = its device)."""
    hw = to_str(m.get("device")) or "unknown"
    rows = []
    for c in m.get("costs") or []:
        v, L = to_float(c.get("value")), to_int(c.get("context_len"))
        if c.get("metric") is None:
            continue
        rows.append({"point_id": m["point_id"], "context_len": L, "metric": str(c["metric"]),
                     "value": v, "source": "measured", "hardware": hw})
    return rows


def modelled_cost_rows(point_id: str, config: dict, hardware_cfgs: list[dict],
                       context_lens: Iterable[int]) -> list[dict]:
    """costmodel.estimate per hardware and L, at the eval's batch (``eval.cost.batch``) and the
    point's KV cache (``quant.kv_bits`` / ``kv_group`` / ``kv_residual``, read by the cost model;
    16: the model dtype's)."""
    ev = config.get("eval") or {}
    evc = ev.get("cost") if isinstance(ev.get("cost"), dict) else {}
    kv_bits = None  # costmodel.kv_spec reads the quant config
    batch = int(evc.get("batch") or 1)
    rows = []
    for hw in hardware_cfgs:
        hw_res = costmodel.resolve_hardware(hw, measure=True)
        name = str(hw_res.get("name") or hw.get("name") or "unknown")
        for L in context_lens:
            e = costmodel.estimate(config["model"], config.get("quant"), config.get("attention"),
                                   hw_res, int(L), batch=batch, kv_bits=kv_bits)
            dec = e["decode"]["seconds"]
            for metric, value in (("prefill_s", e["prefill"]["seconds"]), ("decode_s", dec),
                                  ("decode_tok_s", 1.0 / dec if dec > 0 else None),
                                  ("state_bytes", e["state_bytes"]), ("weight_bytes", e["weight_bytes"]),
                                  # a lower bound: activations and workspace are not modelled
                                  ("peak_mem_bytes", e["weight_bytes"] + e["state_bytes"])):
                rows.append({"point_id": point_id, "context_len": int(L), "metric": metric,
                             "value": value, "source": "modelled", "hardware": name})
    return rows
