"""Crossovers in context length: the L* from which one point's (or family's) cost curve is
strictly cheaper than another's, and ``crossover.parquet``'s rows.

Measured costs are fitted by a least-squares quadratic in L per point (:func:`fit_cost_curve`,
:func:`crossover`); modelled costs are compared piecewise linearly between their samples
(:func:`crossover_sampled`).
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Sequence

import numpy as np

from frontier import costmodel
from frontier.results.families import FAMILIES
from frontier.results.runs import row_config
from frontier.results.schema import to_float

__all__ = ["fit_cost_curve", "eval_curve", "crossover", "crossover_sampled", "cost_series", "compute_crossover",
           "attention_class", "kv_bits_pairs"]

# attention kinds (frontier.config.ATTENTION_KINDS) by the shape of their state: a fixed-size
# recurrent state (linear), a bounded window of KV (sparse); a hybrid keeps some softmax layers
LINEAR_KINDS = ("linear", "lolcats")
SPARSE_KINDS = ("sliding_window", "sink_window", "block_sparse", "topk")


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
    *overtaking* point order the pair so that a is not cheaper at ``l_min`` (:func:`compute_crossover` does).
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


def cost_series(costs: list[dict]) -> dict[tuple, dict[str, dict[int, float]]]:
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


def attention_class(row: dict) -> str | None:
    """``hybrid`` (restructured, some layers kept softmax) | ``linear`` | ``sparse`` for a
    restructured point of ``runs``; None for softmax attention (or an unknown kind)."""
    acfg = row_config(row).get("attention") or {}
    kind = acfg.get("kind") or row.get("cfg.attention.kind")
    if kind in (None, "softmax"):
        return None
    kept = row.get("attn.keep_softmax")
    kept = json.loads(kept) if isinstance(kept, str) and kept else acfg.get("keep_softmax")
    if kept:
        return "hybrid"
    return "linear" if kind in LINEAR_KINDS else "sparse" if kind in SPARSE_KINDS else None


def kv_bits_of(row: dict) -> int:
    q = row_config(row).get("quant") or {}
    return int(q.get("kv_bits") or row.get("cfg.quant.kv_bits") or 16)


def _best(pids, ok: dict) -> str | None:
    """The lowest-perplexity point of ``pids`` (first point_id on ties / no ppl)."""
    best = None
    for pid in sorted(pids):
        ppl = to_float(ok[pid].get("ppl"))
        cur = None if best is None else to_float(ok[best].get("ppl"))
        if best is None or (ppl is not None and (cur is None or ppl < cur)):
            best = pid
    return best


def kv_bits_pairs(ok: dict) -> list[tuple[str, str, int]]:
    """(restructured point, KV-quantized point, kv_bits): for each attention class (linear,
    hybrid, sparse) its lowest-perplexity point with unquantized weights (family ``attention``,
    or ``combined`` when only its KV cache is quantized), against the lowest-perplexity
    ``kv_quant`` point (softmax attention, unquantized weights) of each KV bit width."""
    by_class: dict[str, list[str]] = {}
    by_bits: dict[int, list[str]] = {}
    for pid, r in ok.items():
        fam = r.get("family")
        if fam == "kv_quant":
            by_bits.setdefault(kv_bits_of(r), []).append(pid)
        elif fam in ("attention", "combined"):
            cls = attention_class(r)
            weights_quantized = fam == "combined" and costmodel._is_quantized(row_config(r).get("quant") or {})
            if cls and not weights_quantized:
                by_class.setdefault(cls, []).append(pid)
    out = []
    for cls in ("linear", "hybrid", "sparse"):
        if cls not in by_class:
            continue
        a = _best(by_class[cls], ok)
        for bits in sorted(by_bits):
            out.append((a, _best(by_bits[bits], ok), bits))
    return out


def compute_crossover(runs: list[dict], costs: list[dict], quality_tolerance: float = 0.1) -> list[dict]:
    """crossover.parquet's rows (schema ``crossover``): levels ``family``, ``point`` and
    ``kv_bits`` (:func:`kv_bits_pairs`: linear / hybrid / sparse attention against the best
    KV-quantized softmax point of each bit width, matched or not; ``matched`` says which)."""
    ok = {r["point_id"]: r for r in runs if r.get("status") == "ok"}
    series = cost_series(costs)

    # family representatives: lowest ppl (ties/no ppl: first point_id)
    by_family: dict[str, list[str]] = {}
    for pid, r in ok.items():
        by_family.setdefault(r.get("family"), []).append(pid)
    reps = {fam: _best(pids, ok) for fam, pids in by_family.items()}

    def matched(pa_: str, pb_: str) -> bool:
        qa, qb = to_float(ok[pa_].get("ppl")), to_float(ok[pb_].get("ppl"))
        if qa is None or qb is None:
            return False
        return abs(qa - qb) / max(min(qa, qb), 1e-300) <= quality_tolerance

    point_pairs = [(a, b) for a, b in itertools.combinations(sorted(ok), 2) if matched(a, b)]
    fam_order = [f for f in FAMILIES if f in reps] + sorted(f for f in reps if f not in FAMILIES)
    fam_pairs = [(reps[a], reps[b]) for a, b in itertools.combinations(fam_order, 2)]
    kv_pairs = kv_bits_pairs(ok)
    kv_of = {(a, b): bits for a, b, bits in kv_pairs}

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

        for level, pairs in (("family", fam_pairs), ("point", point_pairs),
                             ("kv_bits", [(a, b) for a, b, _ in kv_pairs])):
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
                    "quality_gap": _rel_gap(to_float(ok[a_].get("ppl")), to_float(ok[b_].get("ppl"))),
                    "matched": matched(a_, b_), "l_min": lo, "l_max": hi,
                    "method": "sampled" if sampled else "quadratic_fit",
                    "source": source, "hardware": hw,
                    "kv_bits": kv_of[(a, b)] if level == "kv_bits" else None,
                })
    return out
