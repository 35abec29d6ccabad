"""Collect per-point ``metrics.json`` into the sweep's Parquet tables.

``results/<sweep>/``:

* ``runs.parquet`` — one row per point: choice names, ``ovr.<key>`` overrides, flattened
  ``cfg.<group>.<key>`` config (strings; lists as JSON), quality columns (float), weight bytes,
  params, effective bits, efficiency family, status/reason, versions (JSON), wall time,
  ``gap_closed`` (fine-tuned points: the fraction of the perplexity gap to softmax that the
  fine-tuning closed, see :func:`gap_closed`), and ``config_json`` (the full resolved config,
  so modelled costs can be recomputed on merge).
* ``costs.parquet`` — long form: point_id, context_len, metric, value, source
  (``measured``|``modelled``), hardware (device for measured, hardware config name for
  modelled).
* ``frontier.parquet`` — per (cost_metric, context_len, quality_metric, source, hardware), every
  point with ``on_front`` and, off the front, the ``reason`` (dominated by / failed / missing).
  ``weight_bytes`` (from runs) has ``context_len`` null.
* ``crossover.parquet`` — L* per metric for matched-quality point pairs (``level = "point"``)
  and for family representatives (``level = "family"``).

All four carry schema-level metadata: ``sweep``, ``schema_version``, ``versions`` (JSON),
``git_commit``. Columns, types and meanings: :data:`SCHEMAS`, rendered in docs/results-schema.md. Every file is written atomically (temp file in the same dir + ``os.replace``).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import subprocess
import tempfile
from importlib import metadata as _md
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from frontier import costmodel
from frontier.pareto import crossover, crossover_sampled, eval_curve, fit_cost_curve, pareto_front

log = logging.getLogger(__name__)

# 2: frontier.parquet keeps every considered point (``on_front`` + ``reason``); modelled
#    ``peak_mem_bytes``; peak memory in crossovers. Documented in docs/results-schema.md.
SCHEMA_VERSION = "2"
CHOICE_GROUPS = ("model", "quant", "attention", "finetune", "eval")
FAMILIES = ("baseline", "quantization", "attention", "combined")
# gap_closed is null when |ppl_untuned - ppl_softmax| <= GAP_REL_EPS * ppl_softmax (nothing to close)
GAP_REL_EPS = 1e-3
# 128 .. 131072: modelled costs are cheap, and long contexts are where the curves diverge.
DEFAULT_MODELLED_LENS = [2**k for k in range(7, 18)]

_STR_BASE = ["sweep", "point_id", *CHOICE_GROUPS, "family", "status", "reason", "device", "quality_weights",
             "metrics_path"]
_INT_BASE = ["weight_bytes", "params"]
_FLOAT_BASE = ["effective_bits", "wall_s", "gap_closed"]
_STR_TAIL = ["versions", "config_json"]
_KNOWN_RUN_COLS = set(_STR_BASE) | set(_INT_BASE) | set(_FLOAT_BASE) | set(_STR_TAIL)

COSTS_SCHEMA = pa.schema([
    ("point_id", pa.string()), ("context_len", pa.int64()), ("metric", pa.string()),
    ("value", pa.float64()), ("source", pa.string()), ("hardware", pa.string()),
])
FRONTIER_SCHEMA = pa.schema([
    ("cost_metric", pa.string()), ("context_len", pa.int64()), ("quality_metric", pa.string()),
    ("point_id", pa.string()), ("cost", pa.float64()), ("quality", pa.float64()),
    ("source", pa.string()), ("hardware", pa.string()), ("family", pa.string()),
    ("on_front", pa.bool_()), ("reason", pa.string()),
])
CROSSOVER_SCHEMA = pa.schema([
    ("level", pa.string()), ("metric", pa.string()), ("point_a", pa.string()),
    ("point_b", pa.string()), ("family_a", pa.string()), ("family_b", pa.string()),
    ("l_star", pa.float64()), ("quality_gap", pa.float64()), ("matched", pa.bool_()),
    ("l_min", pa.float64()), ("l_max", pa.float64()), ("method", pa.string()),
    ("source", pa.string()), ("hardware", pa.string()),
])

_INDEXED_Q = re.compile(r"^(?P<base>.+)@(?P<L>\d+)$")

# ---- the documented schema -------------------------------------------------------------------
# docs/results-schema.md embeds schema_markdown() (tests/test_report.py checks the doc, this dict
# and the files actually written agree). Per table: (column, Arrow type, meaning). A name with
# "<...>" is a pattern for data-dependent columns (runs only).
FILE_METADATA = {
    "sweep": "sweep name",
    "schema_version": "schema version of the writer (`frontier.collect.SCHEMA_VERSION`)",
    "versions": "JSON object {package: version} of the collecting environment",
    "git_commit": "commit of the frontier code that collected (env `FRONTIER_GIT_COMMIT`, else `git rev-parse HEAD`, else `unknown`)",
}
TABLE_METADATA = {"runs": {"quality_columns": "JSON list of the quality columns of this file, in display order"}}
SCHEMAS: dict[str, list[tuple[str, str, str]]] = {
    "runs": [
        ("sweep", "string", "sweep name"),
        ("point_id", "string", "`<model>/<quant>/<attention>/<finetune>/<eval>`: each segment the group's "
                               "choice, followed by `~key=value,...` when value overrides of that group "
                               "apply; primary key"),
        ("model", "string", "choice in config group `model`"),
        ("quant", "string", "choice in config group `quant`"),
        ("attention", "string", "choice in config group `attention`"),
        ("finetune", "string", "choice in config group `finetune`"),
        ("eval", "string", "choice in config group `eval`"),
        ("family", "string", "efficiency family: `baseline` | `quantization` | `attention` | `combined`"),
        ("status", "string", "`ok` | `failed`"),
        ("reason", "string", "why the point failed (`<ExceptionType>: message`); null when ok"),
        ("device", "string", "device the point was evaluated on (the `hardware` of its measured costs)"),
        ("quality_weights", "string", "what the quality metrics ran on for a quantized model: `kernel` (the "
                                      "quantized layers, the same ones the cost ladder times) | `dequantized` (cached "
                                      "dense copies; only in results written before issue 15); null when unquantized"),
        ("metrics_path", "string", "the `metrics.json` the row was read from"),
        ("weight_bytes", "int64", "bytes of all parameters and buffers as stored (quantized tensors at "
                                  "their storage size)"),
        ("params", "int64", "logical parameter count (quantized weights by their logical shape, tied ones once)"),
        ("effective_bits", "double", "stored bits per logical weight of the decoder's Linear layers, scales "
                                     "and zero points included (embeddings and lm_head excluded)"),
        ("wall_s", "double", "evaluation wall time, seconds"),
        ("gap_closed", "double", "fine-tuned points: (ppl_untuned - ppl) / (ppl_untuned - ppl_softmax), the "
                                 "fraction of the perplexity gap to softmax the fine-tuning closed (1 = softmax "
                                 "quality, 0 = no better than untuned); null otherwise or when the gap is ~0"),
        ("ppl", "double", "held-out perplexity (lower is better); null for a failed point"),
        ("<metric>@<L>", "double", "quality at context length L: `recall_acc@L`, `passkey_acc@L` "
                                   "(exact-match accuracy in [0, 1], higher is better)"),
        ("<quality>", "double", "any other quality metric a point reports (lower is better when the "
                                "name contains ppl/perplexity/loss/nll/bpb, else higher)"),
        ("ovr.<key>", "string", "a value override applied to the point, e.g. `ovr.attention.window`; "
                                "null where it does not apply"),
        ("cfg.<group>.<key>", "string", "the resolved config, flattened: scalars as strings, lists as JSON"),
        ("attn.<key>", "string", "swapped-attention layers, JSON: `attn.keep_softmax` (layers kept softmax; "
                                 "`[]` when every layer was swapped) and, for keep_softmax=auto, one list per "
                                 "layer of `attn.entropy` (normalised attention entropy), `attn.sink_mass`, "
                                 "`attn.massive` (max/median |hidden|), `attn.score` (need for softmax); absent "
                                 "or null for unswapped points"),
        ("versions", "string", "JSON object {package: version} of the evaluate job"),
        ("config_json", "string", "the full resolved config as JSON (modelled costs are recomputed "
                                  "from it when a later collect merges)"),
    ],
    "costs": [
        ("point_id", "string", "the point (`runs.point_id`)"),
        ("context_len", "int64", "context length L, tokens"),
        ("metric", "string", "cost metric (see *Cost metrics*)"),
        ("value", "double", "the cost, in the metric's unit; null when not measurable"),
        ("source", "string", "`measured` (the evaluate stage) | `modelled` (roofline, `frontier.costmodel`)"),
        ("hardware", "string", "measured: the device; modelled: the hardware config name"),
    ],
    "frontier": [
        ("cost_metric", "string", "cost axis (see *Cost metrics*); `weight_bytes` is the runs column"),
        ("context_len", "int64", "L of the cost (and of an `@L` quality); null for `weight_bytes`"),
        ("quality_metric", "string", "quality axis: `ppl`, or `<metric>@<L>` at the same L as the cost"),
        ("point_id", "string", "the point"),
        ("cost", "double", "its cost; null when missing or failed"),
        ("quality", "double", "its quality; null when missing or failed"),
        ("source", "string", "`measured` | `modelled`"),
        ("hardware", "string", "as in costs; null for `weight_bytes`"),
        ("family", "string", "efficiency family of the point"),
        ("on_front", "bool", "true for a Pareto-optimal point of this (cost_metric, context_len, "
                             "quality_metric, source, hardware) group"),
        ("reason", "string", "why a point is not on the front: `dominated by <point_id>`, "
                             "`failed: <reason>`, `missing <cost|quality>`; null on the front"),
    ],
    "crossover": [
        ("level", "string", "`family` (the lowest-perplexity point of each family) | `point` "
                            "(every pair of points within the quality tolerance)"),
        ("metric", "string", "lower-is-better cost compared: measured `prefill_ms`, `decode_s` "
                             "(1 / decode_tok_s), `state_bytes`, `peak_mem_bytes`; modelled `prefill_s`, "
                             "`decode_s`, `state_bytes`, `peak_mem_bytes`"),
        ("point_a", "string", "the point that is not cheaper at `l_min` (the challenger)"),
        ("point_b", "string", "the other point"),
        ("family_a", "string", "family of point_a"),
        ("family_b", "string", "family of point_b"),
        ("l_star", "double", "smallest L in [l_min, l_max] from which a is strictly cheaper than b; "
                             "null: a never overtakes b in that range"),
        ("quality_gap", "double", "ppl_a / ppl_b - 1"),
        ("matched", "bool", "the two perplexities are within the quality tolerance (default 10 %)"),
        ("l_min", "double", "smallest L both points have"),
        ("l_max", "double", "largest L both points have"),
        ("method", "string", "`quadratic_fit` (measured: least-squares a + bL + cL² per point) | "
                             "`sampled` (modelled: piecewise linear between the modelled L)"),
        ("source", "string", "`measured` | `modelled`"),
        ("hardware", "string", "as in costs"),
    ],
}
# metric -> (sources, unit, meaning)
COST_METRICS: dict[str, tuple[str, str, str]] = {
    "prefill_ms": ("measured", "ms", "one forward over an L-token prompt (median of repeats)"),
    "decode_tok_s": ("measured, modelled", "tokens/s", "greedy decode throughput continuing from an L-token "
                     "prefill (higher is better); modelled: 1 / decode_s"),
    "peak_mem_bytes": ("measured, modelled", "bytes", "peak memory of a prefill at L: weights + activations + "
                       "cache (see `frontier.evaluate.measure`); modelled: weights + KV cache/state only, a "
                       "lower bound"),
    "state_bytes": ("measured, modelled", "bytes", "KV cache (softmax, window) or recurrent state (linear) "
                    "right after the prefill at L"),
    "prefill_s": ("modelled", "s", "roofline time of the prefill"),
    "decode_s": ("modelled", "s", "roofline time of one decode step at context L"),
    "weight_bytes": ("modelled", "bytes", "weight bytes the cost model predicts (the measured value is "
                     "`runs.weight_bytes`)"),
}


def schema_markdown() -> str:
    """The generated part of docs/results-schema.md (tables, columns, metadata keys)."""
    def row(*cells: str) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    out = [f"Schema version: **{SCHEMA_VERSION}**", ""]
    for name, cols in SCHEMAS.items():
        out += [f"### `{name}.parquet`", "", row("column", "type", "meaning"), row("---", "---", "---")]
        out += [row(f"`{c}`", t, m) for c, t, m in cols]
        out.append("")
    out += ["### Cost metrics", "", row("metric", "source", "unit", "meaning"), row("---", "---", "---", "---")]
    out += [row(f"`{k}`", s, u, m) for k, (s, u, m) in COST_METRICS.items()]
    out += ["", "### File metadata (Parquet schema key/value metadata)", "",
            row("key", "files", "meaning"), row("---", "---", "---")]
    out += [row(f"`{k}`", "all four", m) for k, m in FILE_METADATA.items()]
    for table, keys in TABLE_METADATA.items():
        out += [row(f"`{k}`", f"{table}.parquet", m) for k, m in keys.items()]
    return "\n".join(out) + "\n"


SCHEMA_DOC = Path(__file__).resolve().parents[2] / "docs" / "results-schema.md"
SCHEMA_DOC_MARKERS = ("<!-- BEGIN GENERATED: frontier.collect.schema_markdown() -->",
                      "<!-- END GENERATED -->")


def write_schema_doc(path: str | Path = SCHEMA_DOC) -> Path:
    """Replace the generated section of docs/results-schema.md with :func:`schema_markdown`."""
    path = Path(path)
    begin, end = SCHEMA_DOC_MARKERS
    text = path.read_text() if path.exists() else f"# Results schema\n\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{schema_markdown()}{end}{tail}")
    return path


# --------------------------------------------------------------------------------------------
# small helpers


def quality_lower_is_better(name: str) -> bool:
    """ppl / loss-like metrics are lower-is-better; accuracies are higher-is-better."""
    n = name.lower()
    return any(t in n for t in ("ppl", "perplexity", "loss", "nll", "bpb", "bits_per"))


def cost_lower_is_better(metric: str) -> bool:
    """Costs are lower-is-better except throughputs (``*tok_s``)."""
    m = metric.lower()
    return not (m.endswith("tok_s") or "throughput" in m)


def _float(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None if v is None else float(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _int(v: Any) -> int | None:
    f = _float(v)
    return None if f is None or math.isinf(f) else int(round(f))


def _scalar_str(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, str):
        return v
    return json.dumps(v, sort_keys=True, default=str)


def _flatten(d: dict, prefix: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for k, v in (d or {}).items():
        key = f"{prefix}.{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = _scalar_str(v)
    return out


def family_of(choices: dict, config: dict) -> str:
    """baseline | quantization | attention | combined, from the resolved config (else names)."""
    qcfg = (config or {}).get("quant") or {}
    acfg = (config or {}).get("attention") or {}
    if qcfg:
        quantized = costmodel._is_quantized(qcfg)
    else:
        quantized = (choices or {}).get("quant", "none") not in ("none", None)
    if acfg:
        kind = acfg.get("kind") or acfg.get("name") or "softmax"
    else:
        kind = (choices or {}).get("attention", "softmax")
    restructured = kind not in ("softmax", None)
    if quantized and restructured:
        return "combined"
    if quantized:
        return "quantization"
    if restructured:
        return "attention"
    return "baseline"


def _q_sort_key(name: str) -> tuple:
    m = _INDEXED_Q.match(name)
    if name == "ppl":
        return (0, "", 0)
    if m:
        return (2, m["base"], int(m["L"]))
    return (1, name, 0)


def library_versions() -> dict[str, str]:
    out = {}
    for pkg in ("frontier", "pyarrow", "numpy", "torch", "transformers", "torchao", "matplotlib"):
        try:
            out[pkg] = _md.version(pkg)
        except _md.PackageNotFoundError:
            pass
    return out


def git_commit() -> str:
    env = os.environ.get("FRONTIER_GIT_COMMIT")
    if env:
        return env
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                           capture_output=True, text=True, timeout=5)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def _file_metadata(sweep: str) -> dict[str, str]:
    return {
        "sweep": sweep,
        "schema_version": SCHEMA_VERSION,
        "versions": json.dumps(library_versions(), sort_keys=True),
        "git_commit": git_commit(),
    }


def _atomic_write(table: pa.Table, path: Path, meta: dict[str, str]) -> None:
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_metadata(path: str | Path) -> dict[str, str]:
    """Schema-level key/value metadata of a Parquet file, decoded."""
    md = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in md.items()}


# --------------------------------------------------------------------------------------------
# rows


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


def run_row(m: dict, sweep: str) -> dict:
    choices = m.get("choices") or {}
    config = m.get("config") or {}
    row: dict[str, Any] = {
        "sweep": m.get("sweep") or sweep,
        "point_id": m["point_id"],
        **{g: _scalar_str(choices.get(g)) for g in CHOICE_GROUPS},
        "family": family_of(choices, config),
        "status": m.get("status") or "ok",
        "reason": _scalar_str(m.get("reason")),
        "device": _scalar_str(m.get("device")),
        "quality_weights": _scalar_str(m.get("quality_weights")),
        "metrics_path": m.get("_path"),
        "weight_bytes": _int(m.get("weight_bytes")),
        "params": _int(m.get("params")),
        "effective_bits": _float(m.get("effective_bits")),
        "wall_s": _float(m.get("wall_s")),
        "versions": json.dumps(m.get("versions") or {}, sort_keys=True, default=str),
        "config_json": json.dumps(config, sort_keys=True, default=str),
    }
    for k, v in (m.get("overrides") or {}).items():
        row[f"ovr.{k}"] = _scalar_str(v)
    for group, sub in config.items():
        if isinstance(sub, dict):
            row.update(_flatten(sub, f"cfg.{group}"))
        else:
            row[f"cfg.{group}"] = _scalar_str(sub)
    layers = m.get("attention_layers") or {}
    if layers:
        row["attn.keep_softmax"] = json.dumps(layers.get("keep_softmax") or [])
        for k in ("entropy", "sink_mass", "massive", "score"):
            d = (layers.get("diagnostics") or {}).get(k)
            row[f"attn.{k}"] = None if d is None else json.dumps(d)
    for k, v in (m.get("quality") or {}).items():
        row[str(k)] = _float(v)
    return row


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


def gap_closed(runs: list[dict], quality: str = "ppl", rel_eps: float = GAP_REL_EPS) -> dict[str, float | None]:
    """{point_id: fraction of the perplexity gap closed} for every fine-tuned point (others: None).

    ``(ppl_untuned - ppl_tuned) / (ppl_untuned - ppl_softmax)``, where *untuned* is the point
    with the same model/quant/attention/eval and finetune ``none``, and *softmax* the one with
    the same model/quant/eval, softmax attention and finetune ``none`` (matched on the
    point_id's components ``<model>/<quant>/<attention>/<finetune>/<eval>``; a component whose
    option is literally ``none``/``softmax`` preferred when several match). 1 = the fine-tuned
    point reaches softmax quality, 0 = no better than untuned, < 0 = worse. None when the point
    or a reference failed or has no ``quality`` value, or when the gap is ~0 (``|untuned -
    softmax| <= rel_eps * softmax``, e.g. a fine-tuned softmax point).
    """
    untuned: dict[tuple, list] = {}
    softmax: dict[tuple, list] = {}
    for r in runs:
        parts = point_parts(r["point_id"])
        q = _float(r.get(quality))
        if parts is None or r.get("status") != "ok" or q is None or not _untuned(r, parts):
            continue
        m, qu, a, ft, e = parts
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
        tuned = _float(r.get(quality)) if r.get("status") == "ok" else None
        u, s = untuned.get((m, qu, a, e)), softmax.get((m, qu, e))
        if tuned is None or not u or not s:
            continue
        ppl_u, ppl_s = min(u)[-1], min(s)[-1]
        gap = ppl_u - ppl_s
        if abs(gap) <= rel_eps * abs(ppl_s):
            continue
        out[r["point_id"]] = (ppl_u - tuned) / gap
    return out


def measured_cost_rows(m: dict) -> list[dict]:
    hw = _scalar_str(m.get("device")) or "unknown"
    rows = []
    for c in m.get("costs") or []:
        v, L = _float(c.get("value")), _int(c.get("context_len"))
        if c.get("metric") is None:
            continue
        rows.append({"point_id": m["point_id"], "context_len": L, "metric": str(c["metric"]),
                     "value": v, "source": "measured", "hardware": hw})
    return rows


def modelled_cost_rows(point_id: str, config: dict, hardware_cfgs: list[dict],
                       context_lens: Iterable[int]) -> list[dict]:
    """costmodel.estimate per hardware and L, at the eval's batch (``eval.cost.batch``) and KV
    bits (``eval.cost.kv_bits`` / ``eval.kv_bits``, else the model dtype's)."""
    ev = config.get("eval") or {}
    evc = ev.get("cost") if isinstance(ev.get("cost"), dict) else {}
    kv_bits = evc.get("kv_bits") or ev.get("kv_bits") or (config.get("attention") or {}).get("kv_bits")
    kv_bits = int(kv_bits) if kv_bits else None
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


def _runs_table(rows: list[dict]) -> pa.Table:
    cols: set[str] = set()
    for r in rows:
        cols.update(r)
    ovr = sorted(c for c in cols if c.startswith("ovr."))
    cfg = sorted(c for c in cols if c.startswith("cfg."))
    attn = sorted(c for c in cols if c.startswith("attn."))
    quality = quality_columns(rows)
    fields, arrays = [], []

    def add(name: str, typ: pa.DataType, conv) -> None:
        fields.append(pa.field(name, typ))
        arrays.append(pa.array([conv(r.get(name)) for r in rows], type=typ))

    for c in _STR_BASE:
        add(c, pa.string(), _scalar_str)
    for c in _INT_BASE:
        add(c, pa.int64(), _int)
    for c in _FLOAT_BASE:
        add(c, pa.float64(), _float)
    for c in quality:
        add(c, pa.float64(), _float)
    for c in ovr + cfg + attn:
        add(c, pa.string(), _scalar_str)
    for c in _STR_TAIL:
        add(c, pa.string(), _scalar_str)
    meta = {"quality_columns": json.dumps(quality)}
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=meta))


def _table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


# --------------------------------------------------------------------------------------------
# frontier and crossover


def quality_columns(runs: list[dict]) -> list[str]:
    cols: set[str] = set()
    for r in runs:
        cols.update(r)
    return sorted((c for c in cols if c not in _KNOWN_RUN_COLS and not c.startswith(("ovr.", "cfg.", "attn."))),
                  key=_q_sort_key)


def _group_costs(costs: list[dict]) -> dict[tuple, dict[str, float]]:
    """(source, hardware, metric, context_len) -> {point_id: value}."""
    g: dict[tuple, dict[str, float]] = {}
    for c in costs:
        if c["value"] is None or (isinstance(c["value"], float) and math.isnan(c["value"])):
            continue
        g.setdefault((c["source"], c["hardware"], c["metric"], c["context_len"]), {})[c["point_id"]] = c["value"]
    return g


# modelled decode_s duplicates decode_tok_s; modelled weight_bytes duplicates the runs column
_FRONTIER_SKIP = {("modelled", "decode_s"), ("modelled", "weight_bytes")}


def compute_frontier(runs: list[dict], costs: list[dict]) -> list[dict]:
    """Every point of each (cost_metric, L, quality_metric, source, hardware) group, with
    ``on_front`` and, off the front, the ``reason`` (dominated by / failed / missing)."""
    ok = {r["point_id"]: r for r in runs if r.get("status") == "ok"}
    failed = {r["point_id"]: r for r in runs if r.get("status") != "ok"}
    qcols = quality_columns(runs)
    unindexed = [q for q in qcols if not _INDEXED_Q.match(q)]
    out: list[dict] = []

    def emit(cost_metric, L, qm, values: dict[str, float], source, hw):
        rows = [{"point_id": pid, "cost": values.get(pid), "quality": r.get(qm)} for pid, r in ok.items()]
        rows += [{"point_id": pid, "cost": None, "quality": None, "status": r.get("status") or "failed",
                  "reason": r.get("reason")} for pid, r in failed.items()]
        if not any(r["point_id"] in values for r in rows):
            return
        front, excluded = pareto_front(rows, "cost", "quality", cost_lower_is_better(cost_metric),
                                       quality_lower_is_better(qm))
        rank = {pid: i for i, pid in enumerate(front)}
        for r in sorted(rows, key=lambda r: (r["point_id"] not in rank, rank.get(r["point_id"], 0), r["point_id"])):
            pid = r["point_id"]
            out.append({"cost_metric": cost_metric, "context_len": L, "quality_metric": qm,
                        "point_id": pid, "cost": _float(r["cost"]), "quality": _float(r["quality"]),
                        "source": source, "hardware": hw,
                        "family": (ok.get(pid) or failed.get(pid) or {}).get("family"),
                        "on_front": pid in rank, "reason": excluded.get(pid)})

    # L-independent: stored weight bytes vs every quality metric
    wb = {pid: r["weight_bytes"] for pid, r in ok.items() if r.get("weight_bytes") is not None}
    for qm in qcols:
        emit("weight_bytes", None, qm, wb, "measured", None)

    for (source, hw, metric, L), values in sorted(_group_costs(costs).items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        if (source, metric) in _FRONTIER_SKIP:
            continue
        qms = list(unindexed)
        for q in qcols:
            mq = _INDEXED_Q.match(q)
            if mq and L is not None and int(mq["L"]) == int(L):
                qms.append(q)
        for qm in qms:
            emit(metric, L, qm, values, source, hw)
    return out


def _series(costs: list[dict]) -> dict[tuple, dict[str, dict[int, float]]]:
    """(source, hardware, crossover_metric) -> point -> {L: lower-is-better cost}."""
    s: dict[tuple, dict[str, dict[int, float]]] = {}
    for c in costs:
        v, L = c["value"], c["context_len"]
        if v is None or L is None or (isinstance(v, float) and math.isnan(v)):
            continue
        src, metric = c["source"], c["metric"]
        if src == "measured":
            if metric == "decode_tok_s":
                if v <= 0:
                    continue
                metric, v = "decode_s", 1.0 / v
            elif metric not in ("prefill_ms", "state_bytes", "decode_s", "peak_mem_bytes"):
                continue
        else:
            if metric not in ("prefill_s", "decode_s", "state_bytes", "peak_mem_bytes"):
                continue
        s.setdefault((src, c["hardware"], metric), {}).setdefault(c["point_id"], {})[int(L)] = float(v)
    return s


def _pair_crossover(sa: dict[int, float], sb: dict[int, float], sampled: bool, fa=None, fb=None):
    """Order (a, b) so that a is not cheaper at l_min; return (swapped, l_star, l_min, l_max).

    ``sampled``: piecewise-linear crossover on the common L (modelled costs, whose curves are
    roofline maxima and window plateaus, not quadratics); else each series' least-squares
    quadratic (``fa``/``fb`` if precomputed), searched within the common measured L range.
    """
    common = sorted(set(sa) & set(sb))
    if len(common) < 2:
        return None
    lo, hi = float(common[0]), float(common[-1])
    if sampled:
        va, vb = [sa[L] for L in common], [sb[L] for L in common]
        a0, b0 = va[0], vb[0]
        if a0 < b0:  # b is the challenger
            return True, crossover_sampled(common, vb, va), lo, hi
        x = crossover_sampled(common, va, vb)
        if x is None and a0 == b0:
            y = crossover_sampled(common, vb, va)
            if y is not None:
                return True, y, lo, hi
        return False, x, lo, hi
    fa = fa or fit_cost_curve(list(sa), list(sa.values()))
    fb = fb or fit_cost_curve(list(sb), list(sb.values()))
    a0, b0 = eval_curve(fa, lo), eval_curve(fb, lo)
    if a0 < b0:
        return True, crossover(fb, fa, lo, hi), lo, hi
    x = crossover(fa, fb, lo, hi)
    if x is None and a0 == b0:
        y = crossover(fb, fa, lo, hi)
        if y is not None:
            return True, y, lo, hi
    return False, x, lo, hi


def _rel_gap(qa: float | None, qb: float | None) -> float | None:
    if qa is None or qb is None or qb == 0:
        return None
    return qa / qb - 1.0


def compute_crossover(runs: list[dict], costs: list[dict], quality_tolerance: float = 0.1) -> list[dict]:
    ok = {r["point_id"]: r for r in runs if r.get("status") == "ok"}
    series = _series(costs)

    # family representatives: lowest ppl (ties/no ppl: first point_id)
    reps: dict[str, str] = {}
    for pid in sorted(ok):
        fam = ok[pid].get("family")
        ppl = _float(ok[pid].get("ppl"))
        cur = reps.get(fam)
        if cur is None:
            reps[fam] = pid
        else:
            cur_ppl = _float(ok[cur].get("ppl"))
            if ppl is not None and (cur_ppl is None or ppl < cur_ppl):
                reps[fam] = pid

    def matched(pa_: str, pb_: str) -> bool:
        qa, qb = _float(ok[pa_].get("ppl")), _float(ok[pb_].get("ppl"))
        if qa is None or qb is None:
            return False
        return abs(qa - qb) / max(min(qa, qb), 1e-300) <= quality_tolerance

    point_pairs = [(a, b) for a, b in itertools.combinations(sorted(ok), 2) if matched(a, b)]
    fam_order = [f for f in FAMILIES if f in reps] + sorted(f for f in reps if f not in FAMILIES)
    fam_pairs = [(reps[a], reps[b]) for a, b in itertools.combinations(fam_order, 2)]

    out: list[dict] = []
    for (source, hw, metric), per_point in sorted(series.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        sampled = source == "modelled"
        fits: dict[str, tuple] = {}

        def fit(pid: str) -> tuple | None:
            if sampled:
                return None
            if pid not in fits:
                fits[pid] = fit_cost_curve(list(per_point[pid]), list(per_point[pid].values()))
            return fits[pid]

        for level, pairs in (("family", fam_pairs), ("point", point_pairs)):
            for a, b in pairs:
                if a not in per_point or b not in per_point:
                    continue
                res = _pair_crossover(per_point[a], per_point[b], sampled, fit(a), fit(b))
                if res is None:
                    continue
                swapped, l_star, lo, hi = res
                if swapped:
                    a_, b_ = b, a
                else:
                    a_, b_ = a, b
                out.append({
                    "level": level, "metric": metric, "point_a": a_, "point_b": b_,
                    "family_a": ok[a_].get("family"), "family_b": ok[b_].get("family"),
                    "l_star": l_star,
                    "quality_gap": _rel_gap(_float(ok[a_].get("ppl")), _float(ok[b_].get("ppl"))),
                    "matched": matched(a_, b_), "l_min": lo, "l_max": hi,
                    "method": "sampled" if sampled else "quadratic_fit",
                    "source": source, "hardware": hw,
                })
    return out


# --------------------------------------------------------------------------------------------
# the stage


def run(sweep: str, metrics_paths: list[str | Path], out_dir: Path,
        hardware_cfgs: list[dict] | None = None, quality_tolerance: float = 0.1,
        modelled_context_lens: list[int] | None = None, tracking: dict | None = None,
        work_dir: str | Path | None = None) -> dict:
    """Collect ``metrics_paths`` into ``out_dir``'s Parquet tables (merging with what is there).

    ``hardware_cfgs``: modelled costs for each (default: each point's ``config["hardware"]``);
    a cpu config with ``measure: true`` is measured here (once per process).
    ``tracking``/``work_dir``: mirror the tables to W&B (job_type ``collect``, group = sweep)
    via :mod:`frontier.tracking`; a no-op when tracking is disabled or absent.
    ``modelled_context_lens``: extra L for modelled costs beyond every measured L (default
    :data:`DEFAULT_MODELLED_LENS`, 128..131072; ``[]`` for measured L only). Modelled costs
    are evaluated on one common L grid for all points so frontiers/crossovers compare alike.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics, warnings = load_metrics(metrics_paths)
    # the last file wins for a duplicated point_id
    by_id: dict[str, dict] = {}
    for m in metrics:
        by_id[m["point_id"]] = m
    new_ids = set(by_id)

    new_runs = [run_row(m, sweep) for m in by_id.values()]
    new_measured = [r for m in by_id.values() for r in measured_cost_rows(m)]

    runs_path, costs_path = out_dir / "runs.parquet", out_dir / "costs.parquet"
    kept_runs: list[dict] = []
    kept_measured: list[dict] = []
    kept_modelled_no_cfg: list[dict] = []
    if runs_path.exists():
        kept_runs = [r for r in pq.read_table(runs_path).to_pylist() if r["point_id"] not in new_ids]
    kept_ids = {r["point_id"] for r in kept_runs}
    if costs_path.exists():
        no_cfg = {r["point_id"] for r in kept_runs if not r.get("config_json")}
        for c in pq.read_table(costs_path).to_pylist():
            if c["point_id"] not in kept_ids:
                continue
            if c["source"] == "measured":
                kept_measured.append(c)
            elif c["point_id"] in no_cfg:
                kept_modelled_no_cfg.append(c)

    runs = sorted(kept_runs + new_runs, key=lambda r: r["point_id"])
    measured = kept_measured + new_measured
    # recomputed over every row: a reference point may have arrived in this call
    gaps = gap_closed(runs)
    for r in runs:
        r["gap_closed"] = gaps.get(r["point_id"])

    # modelled costs, recomputed for every ok point on one L grid
    extra = DEFAULT_MODELLED_LENS if modelled_context_lens is None else modelled_context_lens
    ok_ids = {r["point_id"] for r in runs if r.get("status") == "ok"}
    grid = sorted({int(c["context_len"]) for c in measured if c["point_id"] in ok_ids and c["context_len"]}
                  | {int(L) for L in extra})
    modelled: list[dict] = list(kept_modelled_no_cfg)
    for r in runs:
        if r.get("status") != "ok" or not r.get("config_json") or not grid:
            continue
        config = json.loads(r["config_json"])
        hws = hardware_cfgs if hardware_cfgs is not None else ([config["hardware"]] if config.get("hardware") else [])
        try:
            modelled += modelled_cost_rows(r["point_id"], config, hws, grid)
        except (KeyError, ValueError, TypeError) as e:
            warnings.append(f"no modelled cost for {r['point_id']}: {type(e).__name__}: {e}")

    costs = sorted(measured + modelled,
                   key=lambda c: (c["point_id"], c["source"], str(c["hardware"]), c["metric"], c["context_len"] or 0))
    frontier = compute_frontier(runs, costs)
    cross = compute_crossover(runs, costs, quality_tolerance)

    meta = _file_metadata(sweep)
    _atomic_write(_runs_table(runs), runs_path, meta)
    _atomic_write(_table(costs, COSTS_SCHEMA), costs_path, meta)
    _atomic_write(_table(frontier, FRONTIER_SCHEMA), out_dir / "frontier.parquet", meta)
    _atomic_write(_table(cross, CROSSOVER_SCHEMA), out_dir / "crossover.parquet", meta)
    for w in warnings:
        log.warning("collect: %s", w)
    summary = {
        "sweep": sweep,
        "out_dir": str(out_dir),
        "points": len(runs),
        "ok": sum(r.get("status") == "ok" for r in runs),
        "failed": sum(r.get("status") != "ok" for r in runs),
        "new_or_updated": len(new_runs),
        "kept": len(kept_runs),
        "cost_rows": len(costs),
        "frontier_rows": len(frontier),
        "crossover_rows": len(cross),
        "families": sorted({r["family"] for r in runs if r.get("status") == "ok"}),
        "files": {k: str(out_dir / f"{k}.parquet") for k in ("runs", "costs", "frontier", "crossover")},
        "warnings": warnings,
    }
    if tracking and tracking.get("mode", "disabled") != "disabled":
        _mirror_to_wandb(summary, runs, frontier, cross, tracking, work_dir)
    return summary


def _mirror_to_wandb(summary: dict, runs: list[dict], frontier: list[dict], cross: list[dict],
                     tracking: dict, work_dir: str | Path | None) -> None:
    """W&B mirror of the tables (never the store; never fails the stage)."""
    try:
        from frontier import tracking as trk
    except ImportError as e:  # pragma: no cover
        log.warning("collect: tracking unavailable (%s)", e)
        return
    qcols = quality_columns(runs)
    run_cols = ["point_id", "family", "status", "weight_bytes", "effective_bits", *qcols]
    try:
        with trk.run(tracking, job_type="collect", group=summary["sweep"], name=f"{summary['sweep']}/collect",
                     config={"sweep": summary["sweep"]}, work_dir=str(work_dir or "work")) as wb:
            wb.table("runs", run_cols, [[r.get(c) for c in run_cols] for r in runs])
            fcols = [f.name for f in FRONTIER_SCHEMA]
            wb.table("frontier", fcols, [[r.get(c) for c in fcols] for r in frontier])
            ccols = [f.name for f in CROSSOVER_SCHEMA]
            wb.table("crossover", ccols, [[r.get(c) for c in ccols] for r in cross])
            wb.summary({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
    except Exception as e:  # noqa: BLE001 - tracking must never break collect
        log.warning("collect: wandb mirror failed: %s", e)


# --------------------------------------------------------------------------------------------
# plain-text tables


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.4g}"
    return str(v)


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[_fmt(v) for v in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def frontier_table(out_dir: Path, quality_metric: str = "ppl", all_lengths: bool = False) -> str:
    """Pareto fronts for ``quality_metric``: per (source, hardware, cost) at the largest L
    (every L with ``all_lengths``)."""
    path = Path(out_dir) / "frontier.parquet"
    if not path.exists():
        return f"(no frontier at {path})"
    rows = [r for r in pq.read_table(path).to_pylist()
            if r["quality_metric"] == quality_metric and r.get("on_front", True)]  # v1 files: front only
    if not rows:
        return f"(no frontier for {quality_metric})"
    if not all_lengths:
        maxL: dict[tuple, int | None] = {}
        for r in rows:
            k = (r["source"], r["hardware"], r["cost_metric"])
            if r["context_len"] is not None and (maxL.get(k) is None or r["context_len"] > maxL[k]):
                maxL[k] = r["context_len"]
        rows = [r for r in rows if r["context_len"] == maxL.get((r["source"], r["hardware"], r["cost_metric"]))]
    rows.sort(key=lambda r: (r["source"] != "measured", str(r["hardware"]), r["cost_metric"],
                             r["context_len"] or 0, r["cost"] if cost_lower_is_better(r["cost_metric"]) else -r["cost"]))
    return format_table(
        ["source", "hardware", "cost", "L", "point", "family", "cost_value", quality_metric],
        [[r["source"], r["hardware"], r["cost_metric"], r["context_len"], r["point_id"], r["family"],
          r["cost"], r["quality"]] for r in rows])


def crossover_table(out_dir: Path, level: str | None = None, max_rows: int = 60) -> str:
    """Crossover L* rows (family level first); ``l_star`` "never" when a never overtakes b."""
    path = Path(out_dir) / "crossover.parquet"
    if not path.exists():
        return f"(no crossover at {path})"
    rows = pq.read_table(path).to_pylist()
    if level:
        rows = [r for r in rows if r["level"] == level]
    if not rows:
        return "(no crossover rows)"
    rows.sort(key=lambda r: (r["level"] != "family", r["source"] != "measured", str(r["hardware"]),
                             r["metric"], r["point_a"], r["point_b"]))
    more = len(rows) - max_rows
    rows = rows[:max_rows]
    txt = format_table(
        ["level", "source", "hardware", "metric", "a (overtakes)", "family_a", "b", "family_b", "L*", "ppl_gap"],
        [[r["level"], r["source"], r["hardware"], r["metric"], r["point_a"], r["family_a"], r["point_b"],
          r["family_b"], "never" if r["l_star"] is None else r["l_star"], r["quality_gap"]] for r in rows])
    if more > 0:
        txt += f"\n... {more} more rows"
    return txt
