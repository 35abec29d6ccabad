"""Pareto fronts over (cost, quality) and cost-curve crossovers in context length L."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

__all__ = ["pareto_front", "fit_cost_curve", "eval_curve", "crossover", "crossover_sampled"]


def _num(v: Any) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


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
        c, q = _num(r.get(cost_key)), _num(r.get(quality_key))
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


def fit_cost_curve(ls: Sequence[float], values: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares ``cost(L) = a + b·L + c·L²``; returns ``(a, b, c)``.

    With fewer than 3 distinct L the fit degrades: 2 → a line (c = 0), 1 → a constant.
    L is rescaled internally for conditioning. Non-finite values are dropped.
    """
    x = np.asarray(ls, dtype=float)
    y = np.asarray(values, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size == 0:
        raise ValueError("fit_cost_curve: no finite points")
    n_distinct = np.unique(x).size
    deg = min(2, n_distinct - 1)
    scale = float(np.max(np.abs(x))) or 1.0
    xs = x / scale
    A = np.vander(xs, deg + 1, increasing=True)
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    coef = list(coef) + [0.0] * (3 - len(coef))
    return (float(coef[0]), float(coef[1]) / scale, float(coef[2]) / scale**2)


def eval_curve(fit: Sequence[float], L: float | np.ndarray) -> float | np.ndarray:
    a, b, c = fit
    return a + b * L + c * L * L


def crossover(fit_a: Sequence[float], fit_b: Sequence[float], l_min: float,
              l_max: float) -> float | None:
    """Smallest L in ``[l_min, l_max]`` from which curve a is strictly cheaper than curve b.

    Choice: if a is already cheaper at ``l_min`` (or becomes cheaper immediately after a tie
    there) the answer is ``l_min`` — "a wins from the start of the range"; callers that want an
    *overtaking* point order the pair so that a is not cheaper at ``l_min`` (``collect`` does).
    Returns None when a is never cheaper in the range (including ties throughout).
    """
    if l_max < l_min:
        l_min, l_max = l_max, l_min
    da = float(fit_a[0]) - float(fit_b[0])
    db = float(fit_a[1]) - float(fit_b[1])
    dc = float(fit_a[2]) - float(fit_b[2])

    def d(L: float) -> float:
        return da + db * L + dc * L * L

    # critical points of d inside (l_min, l_max)
    roots: list[float] = []
    if dc != 0.0:
        disc = db * db - 4.0 * dc * da
        if disc >= 0.0:
            sq = math.sqrt(disc)
            # numerically stable quadratic roots
            qq = -0.5 * (db + math.copysign(sq, db)) if db != 0.0 else -0.5 * sq
            cands = []
            if qq != 0.0:
                cands += [qq / dc, da / qq]
            else:
                cands += [0.0]
            roots = sorted(r for r in cands if l_min < r < l_max)
    elif db != 0.0:
        r = -da / db
        if l_min < r < l_max:
            roots = [r]
    knots = [float(l_min)] + roots + [float(l_max)]
    if l_min == l_max:
        return float(l_min) if d(l_min) < 0.0 else None
    scale = max(abs(da), abs(db) * l_max, abs(dc) * l_max * l_max, 1e-300)
    tol = 1e-12 * scale
    for lo, hi in zip(knots[:-1], knots[1:]):
        if hi <= lo:
            continue
        if d(0.5 * (lo + hi)) < -tol:
            return lo
    if d(l_max) < -tol:
        return float(l_max)
    return None


def crossover_sampled(ls: Sequence[float], cost_a: Sequence[float],
                      cost_b: Sequence[float]) -> float | None:
    """Crossover on sampled curves (piecewise linear between samples, L ascending).

    Same convention as :func:`crossover`: first L where a becomes strictly cheaper than b,
    ``ls[0]`` if already cheaper there, None if never.
    """
    x = np.asarray(ls, dtype=float)
    order = np.argsort(x)
    x = x[order]
    d = (np.asarray(cost_a, dtype=float) - np.asarray(cost_b, dtype=float))[order]
    if x.size == 0:
        return None
    if d[0] < 0:
        return float(x[0])
    for i in range(1, x.size):
        if d[i] < 0:
            # d[i-1] >= 0 > d[i]: interpolate the zero
            t = d[i - 1] / (d[i - 1] - d[i])
            return float(x[i - 1] + t * (x[i] - x[i - 1]))
    return None
