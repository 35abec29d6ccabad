"""The answer to the product's question, from ``crossover.parquet``'s family-level rows: for each
pair of efficiency families, at matched quality, from which context length L* the first one is
cheaper, per cost metric, measured and modelled.

One structure (:func:`family_answers`) feeds the ``answer:`` lines of ``frontier show``, the
answer block at the top of report.html and the opening text of the W&B report, so the three
say the same thing. Each family is represented by its lowest-perplexity point.
"""

from __future__ import annotations

import math
from pathlib import Path

from frontier.results.crossover import cost_series
from frontier.results.families import QUESTION_PAIRS, challenger_pairs
from frontier.results.labels import METRIC_WORDS, XO_METRICS, fmt_q, short_labels
from frontier.results.parquet_io import read_rows


def where_cheaper(r: dict | None, x: str, series: dict | None = None) -> str:
    """Where the point of family ``x`` is strictly cheaper, from one family-level crossover row:
    ``L >= <L*>``, ``L < <L*>``, ``all L``, ``never``, ``tied`` or ``-`` (no row). ``series``
    (:func:`~frontier.results.crossover.cost_series`) tells a tie from "the other is cheaper"."""
    if r is None:
        return "-"
    a_is_x = r["family_a"] == x
    ls = r["l_star"]
    if ls is None and series is not None:
        per = series.get((r["source"], r["hardware"], r["metric"]), {})
        sa, sb = per.get(r["point_a"], {}), per.get(r["point_b"], {})
        common = set(sa) & set(sb)
        if common and all(math.isclose(sa[L], sb[L], rel_tol=1e-6) for L in common):
            return "tied"
    if a_is_x:
        if ls is None:
            return "never"
        return "all L" if ls <= r["l_min"] else f"L >= {ls:.0f}"
    if ls is None:
        return "all L"
    return "never" if ls <= r["l_min"] else f"L < {ls:.0f}"


def _int_l(v: str | float) -> str:
    return f"{int(round(float(v))):,}"


def phrase(where: str) -> str:
    """A :func:`where_cheaper` cell in words, without the L range."""
    if where.startswith("L >= "):
        return f"from L ≈ {_int_l(where[5:])}"
    if where.startswith("L < "):
        return f"only below L ≈ {_int_l(where[4:])}"
    return {"-": "not compared", "never": "at no L", "all L": "at every L", "tied": "equal at every L"}.get(where, where)


def _metric_order(source: str, metrics: set[str]) -> list[str]:
    first = [m for m in XO_METRICS.get(source, ()) if m in metrics]
    return first + sorted(metrics - set(first))


def family_answers(out_dir: Path) -> dict:
    """``{"reps": {family: point_id}, "ppl": {point_id: ppl}, "labels": {point_id: label},
    "pairs": [pair, ...]}``; each pair: ``x``, ``y`` (x the challenger, see
    :func:`~frontier.results.families.challenger_pairs`), ``question`` (one of
    :data:`~frontier.results.families.QUESTION_PAIRS`), ``point_x``, ``point_y``, ``gap_x``
    (ppl_x / ppl_y - 1), ``matched``, and ``sources``: per (source, hardware), measured first,
    ``l_min``, ``l_max`` and ``metrics`` [{metric, where, l_star, row}]. Question pairs first."""
    out_dir = Path(out_dir)
    rows = [r for r in read_rows(out_dir, "crossover") if r["level"] == "family"]
    runs = {r["point_id"]: r for r in read_rows(out_dir, "runs")}
    labels = short_labels(list(runs) or [r["point_a"] for r in rows] + [r["point_b"] for r in rows])
    series = cost_series(read_rows(out_dir, "costs")) if rows else {}
    reps: dict[str, str] = {}
    for r in rows:
        reps[r["family_a"]], reps[r["family_b"]] = r["point_a"], r["point_b"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["source"], r["hardware"]), []).append(r)
    order = sorted(groups, key=lambda k: (k[0] != "measured", str(k[1])))
    pairs = challenger_pairs(reps)
    pairs = [p for p in QUESTION_PAIRS if p in pairs] + [p for p in pairs if p not in QUESTION_PAIRS]
    out = []
    for x, y in pairs:
        key = frozenset((x, y))
        mine = [r for r in rows if frozenset((r["family_a"], r["family_b"])) == key]
        if not mine:
            continue
        r0 = mine[0]
        gap = r0["quality_gap"]
        gap_x = gap if r0["family_a"] == x else (None if gap is None else 1.0 / (1.0 + gap) - 1.0)
        sources = []
        for source, hw in order:
            rs = [r for r in groups[(source, hw)] if frozenset((r["family_a"], r["family_b"])) == key]
            if not rs:
                continue
            by_metric = {r["metric"]: r for r in rs}
            metrics = []
            for m in _metric_order(source, set(by_metric)):
                r = by_metric[m]
                w = where_cheaper(r, x, series)
                metrics.append({"metric": m, "where": w, "row": r,
                                "l_star": r["l_star"] if w.startswith("L ") else None})
            sources.append({"source": source, "hardware": hw, "l_min": min(r["l_min"] for r in rs),
                            "l_max": max(r["l_max"] for r in rs), "metrics": metrics})
        out.append({"x": x, "y": y, "question": (x, y) in QUESTION_PAIRS, "point_x": reps[x], "point_y": reps[y],
                    "gap_x": gap_x, "matched": all(r["matched"] for r in mine), "sources": sources})
    return {"reps": reps, "ppl": {p: r.get("ppl") for p, r in runs.items()}, "labels": labels, "pairs": out}


def pair_title(pair: dict) -> str:
    return f"{pair['x'].capitalize()} vs {pair['y']}"


def pair_lead(pair: dict, answers: dict) -> str:
    """Which points stand for the two families, and their quality gap."""
    lab, ppl = answers["labels"], answers["ppl"]
    px, py = pair["point_x"], pair["point_y"]
    gap = pair["gap_x"]
    if gap is None:
        q = "perplexity gap unknown"
    else:
        q = f"perplexity {abs(gap):.1%} {'higher' if gap > 0 else 'lower'}" if abs(gap) >= 5e-4 else "equal perplexity"
    q += (", matched quality" if pair["matched"] else
          ", NOT matched quality (beyond the collect tolerance): the L* below compare unequal quality")
    return (f"{pair['x'].capitalize()} ({lab.get(px, px)}, ppl {fmt_q(ppl.get(px))}) against {pair['y']} "
            f"({lab.get(py, py)}, ppl {fmt_q(ppl.get(py))}): {q}.")


def source_sentence(pair: dict, src: dict) -> str:
    """``Measured on cpu (L 128–1,024), where attention is cheaper: prefill latency from L ≈ 324; ...``"""
    parts = [f"{METRIC_WORDS.get(m['metric'], m['metric'])} {phrase(m['where'])}" for m in src["metrics"]]
    return (f"{src['source'].capitalize()} on {src['hardware']} (L {_int_l(src['l_min'])}–{_int_l(src['l_max'])}), "
            f"where {pair['x']} is cheaper: " + "; ".join(parts) + ".")


def paragraph(pair: dict, answers: dict) -> str:
    """The pair's answer as one plain-text paragraph (HTML and W&B use it as it is)."""
    return " ".join([pair_lead(pair, answers), *[source_sentence(pair, s) for s in pair["sources"]]])


def answer_intro(answers: dict) -> str:
    if not answers["pairs"]:
        return ("No answer yet: a crossover needs two efficiency families with costs at two or more "
                "context lengths.")
    return ("Each family is represented by its lowest-perplexity point. L* is the context length from "
            "which the first family's point is strictly cheaper than the second's, per cost metric; "
            "measured costs are fitted by a quadratic in L, modelled ones (roofline) are read off the "
            "curve.")
