"""Collect per-point ``metrics.json`` into the sweep's Parquet tables.

``results/<sweep>/``:

* ``runs.parquet`` — one row per point: choice names, ``ovr.<key>`` overrides, flattened
  ``cfg.<group>.<key>`` config (strings; lists as JSON), quality columns (float), weight bytes,
  params, effective bits, efficiency family, status/reason, versions (JSON), wall time, and
  ``config_json`` (the full resolved config, so modelled costs can be recomputed on merge).
* ``costs.parquet`` — long form: point_id, context_len, metric, value, source
  (``measured``|``modelled``), hardware (device for measured, hardware config name for
  modelled).
* ``frontier.parquet`` — Pareto-optimal points per (cost_metric, context_len, quality_metric,
  source, hardware). ``weight_bytes`` (from runs) has ``context_len`` null.
* ``crossover.parquet`` — L* per metric for matched-quality point pairs (``level = "point"``)
  and for family representatives (``level = "family"``).

All four carry schema-level metadata: ``sweep``, ``schema_version``, ``versions`` (JSON),
``git_commit``. Every file is written atomically (temp file in the same dir + ``os.replace``).
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

SCHEMA_VERSION = "1"
CHOICE_GROUPS = ("model", "quant", "attention", "finetune", "eval")
FAMILIES = ("baseline", "quantization", "attention", "combined")
# 128 .. 131072: modelled costs are cheap, and long contexts are where the curves diverge.
DEFAULT_MODELLED_LENS = [2**k for k in range(7, 18)]

_STR_BASE = ["sweep", "point_id", *CHOICE_GROUPS, "family", "status", "reason", "device", "metrics_path"]
_INT_BASE = ["weight_bytes", "params"]
_FLOAT_BASE = ["effective_bits", "wall_s"]
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
])
CROSSOVER_SCHEMA = pa.schema([
    ("level", pa.string()), ("metric", pa.string()), ("point_a", pa.string()),
    ("point_b", pa.string()), ("family_a", pa.string()), ("family_b", pa.string()),
    ("l_star", pa.float64()), ("quality_gap", pa.float64()), ("matched", pa.bool_()),
    ("l_min", pa.float64()), ("l_max", pa.float64()), ("method", pa.string()),
    ("source", pa.string()), ("hardware", pa.string()),
])

_INDEXED_Q = re.compile(r"^(?P<base>.+)@(?P<L>\d+)$")


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
    for k, v in (m.get("quality") or {}).items():
        row[str(k)] = _float(v)
    return row


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
                                  ("state_bytes", e["state_bytes"]), ("weight_bytes", e["weight_bytes"])):
                rows.append({"point_id": point_id, "context_len": int(L), "metric": metric,
                             "value": value, "source": "modelled", "hardware": name})
    return rows


def _runs_table(rows: list[dict]) -> pa.Table:
    cols: set[str] = set()
    for r in rows:
        cols.update(r)
    ovr = sorted(c for c in cols if c.startswith("ovr."))
    cfg = sorted(c for c in cols if c.startswith("cfg."))
    quality = sorted((c for c in cols if c not in _KNOWN_RUN_COLS and not c.startswith(("ovr.", "cfg."))),
                     key=_q_sort_key)
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
    for c in ovr + cfg:
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
    return sorted((c for c in cols if c not in _KNOWN_RUN_COLS and not c.startswith(("ovr.", "cfg."))),
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
    ok = {r["point_id"]: r for r in runs if r.get("status") == "ok"}
    qcols = quality_columns(runs)
    unindexed = [q for q in qcols if not _INDEXED_Q.match(q)]
    out: list[dict] = []

    def emit(cost_metric, L, qm, values: dict[str, float], source, hw):
        rows = [{"point_id": pid, "cost": v, "quality": ok[pid].get(qm)} for pid, v in values.items() if pid in ok]
        if not rows:
            return
        front, _ = pareto_front(rows, "cost", "quality", cost_lower_is_better(cost_metric),
                                quality_lower_is_better(qm))
        by_id = {r["point_id"]: r for r in rows}
        for pid in front:
            out.append({"cost_metric": cost_metric, "context_len": L, "quality_metric": qm,
                        "point_id": pid, "cost": float(by_id[pid]["cost"]),
                        "quality": float(by_id[pid]["quality"]), "source": source,
                        "hardware": hw, "family": ok[pid].get("family")})

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
            elif metric not in ("prefill_ms", "state_bytes", "decode_s"):
                continue
        else:
            if metric not in ("prefill_s", "decode_s", "state_bytes"):
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
    rows = [r for r in pq.read_table(path).to_pylist() if r["quality_metric"] == quality_metric]
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
