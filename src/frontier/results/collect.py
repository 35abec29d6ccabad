"""The collect stage: per-point ``metrics.json`` → ``results/<sweep>/{runs,costs,frontier,
crossover}.parquet`` (merged with what is there), mirrored to W&B.

What each table holds: :mod:`frontier.results.schema` and docs/results-schema.md. Rows:
:mod:`frontier.results.runs`; fronts: :mod:`frontier.results.fronts`; L*:
:mod:`frontier.results.crossover`. Every file is written atomically.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow.parquet as pq

from frontier.results.crossover import compute_crossover
from frontier.results.fronts import compute_frontier
from frontier.results.parquet_io import atomic_write, file_metadata, runs_table, table
from frontier.results.runs import (
    gap_closed,
    load_metrics,
    measured_cost_rows,
    modelled_cost_rows,
    quality_columns,
    run_row,
)
from frontier.results.schema import COSTS_SCHEMA, CROSSOVER_SCHEMA, FRONTIER_SCHEMA

log = logging.getLogger(__name__)

# 128 .. 131072: modelled costs are cheap, and long contexts are where the curves diverge.
DEFAULT_MODELLED_LENS = [2**k for k in range(7, 18)]


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
    # Snakemake deletes a rule's outputs (the Parquet files) before it runs the rule again, so
    # the merge with earlier collects also reads the metrics files those collected, listed in a
    # ledger that is not an output (points whose metrics.json is gone are dropped)
    given = [str(p) for p in metrics_paths]
    earlier = [p for p in _read_ledger(out_dir) if p not in set(given) and Path(p).is_file()]
    runs_path, costs_path = out_dir / "runs.parquet", out_dir / "costs.parquet"
    rebuilt: list[dict] = []
    if earlier and not runs_path.exists():
        rebuilt, _ = load_metrics(earlier)
    metrics, warnings = load_metrics(given)
    # the last file wins for a duplicated point_id
    by_id: dict[str, dict] = {}
    for m in metrics:
        by_id[m["point_id"]] = m
    new_ids = set(by_id)

    new_runs = [run_row(m, sweep) for m in by_id.values()]
    new_measured = [r for m in by_id.values() for r in measured_cost_rows(m)]

    kept_runs: list[dict] = []
    kept_measured: list[dict] = []
    kept_modelled_no_cfg: list[dict] = []
    if runs_path.exists():
        kept_runs = [r for r in pq.read_table(runs_path).to_pylist() if r["point_id"] not in new_ids]
    else:  # rebuilt from the ledger's metrics files
        old = {m["point_id"]: m for m in rebuilt if m["point_id"] not in new_ids}
        kept_runs = [run_row(m, sweep) for m in old.values()]
        kept_measured = [r for m in old.values() for r in measured_cost_rows(m)]
    kept_ids = {r["point_id"] for r in kept_runs}
    if costs_path.exists() and runs_path.exists():
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
    gaps, gaps_nats = gap_closed(runs), gap_closed(runs, log=True)
    for r in runs:
        r["gap_closed"] = gaps.get(r["point_id"])
        r["gap_closed_nats"] = gaps_nats.get(r["point_id"])

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

    meta = file_metadata(sweep)
    atomic_write(runs_table(runs, quality_columns(runs)), runs_path, meta)
    atomic_write(table(costs, COSTS_SCHEMA), costs_path, meta)
    atomic_write(table(frontier, FRONTIER_SCHEMA), out_dir / "frontier.parquet", meta)
    atomic_write(table(cross, CROSSOVER_SCHEMA), out_dir / "crossover.parquet", meta)
    _write_ledger(out_dir, sorted({*earlier, *given}))
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


LEDGER = "collected.json"


def _read_ledger(out_dir: Path) -> list[str]:
    try:
        return [str(p) for p in json.loads((out_dir / LEDGER).read_text())["metrics_paths"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _write_ledger(out_dir: Path, paths: list[str]) -> None:
    import os

    tmp = out_dir / f".{LEDGER}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"metrics_paths": paths}, indent=1))
    os.replace(tmp, out_dir / LEDGER)


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
