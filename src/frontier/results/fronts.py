"""Pareto fronts: the non-dominated points on (cost, quality), and ``frontier.parquet``'s rows:
every point of each (cost metric, L, quality metric, source, hardware) group, on the front or
not and why."""

from __future__ import annotations

import math

from frontier.results.runs import quality_columns
from frontier.results.schema import (
    INDEXED_Q,
    cost_lower_is_better,
    quality_lower_is_better,
    to_float,
)

__all__ = ["pareto_front", "compute_frontier"]


def pareto_front(rows: list[dict], cost_key: str, quality_key: str,
                 cost_lower_is_better: bool = True, quality_lower_is_better: bool = True,
                 id_key: str = "point_id") -> tuple[list[str], dict[str, str]]:
    """Non-dominated points of ``rows`` on (cost, quality).

    Returns ``(front_ids, excluded)``: ``front_ids`` sorted from best cost to worst;
    ``excluded`` maps every other id to a reason: ``"failed: <reason>"`` (``status`` present
    and not ``ok``), ``"missing <key>"`` (no finite value), or ``"dominated by <id>"``.
    A point dominates another when it is no worse on both axes and strictly better on one, so
    identical points are never dominated by each other and are both on the front. The
    dominator named is a front point (the one with the best cost, then best quality).
    Decode tokens/s is higher-is-better: pass ``cost_lower_is_better=False``.
    """
    excluded: dict[str, str] = {}
    cand: list[tuple[str, float, float]] = []  # (id, cost, quality) in "lower is better" form
    cs = 1.0 if cost_lower_is_better else -1.0
    qs = 1.0 if quality_lower_is_better else -1.0
    for r in rows:
        pid = str(r[id_key])
        status = r.get("status", "ok")
        if status not in (None, "ok"):
            excluded[pid] = f"failed: {r.get('reason') or status}"
            continue
        c, q = to_float(r.get(cost_key)), to_float(r.get(quality_key))
        if c is None:
            excluded[pid] = f"missing {cost_key}"
            continue
        if q is None:
            excluded[pid] = f"missing {quality_key}"
            continue
        cand.append((pid, cs * c, qs * q))

    cand.sort(key=lambda t: (t[1], t[2], t[0]))
    front: list[tuple[str, float, float]] = []
    for pid, c, q in cand:
        dom = next((f for f in front if f[1] <= c and f[2] <= q and (f[1] < c or f[2] < q)), None)
        if dom is None:
            front.append((pid, c, q))
        else:
            excluded[pid] = f"dominated by {dom[0]}"
    # Sorted by (cost, quality): a later point never dominates an earlier one unless equal cost
    # and strictly better quality — impossible given the sort. So `front` is exact.
    return [f[0] for f in front], excluded


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
    unindexed = [q for q in qcols if not INDEXED_Q.match(q)]
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
                        "point_id": pid, "cost": to_float(r["cost"]), "quality": to_float(r["quality"]),
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
            mq = INDEXED_Q.match(q)
            if mq and L is not None and int(mq["L"]) == int(L):
                qms.append(q)
        for qm in qms:
            emit(metric, L, qm, values, source, hw)
    return out
