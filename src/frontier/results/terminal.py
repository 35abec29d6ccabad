"""What ``frontier show`` prints: the Pareto fronts at the largest L and the crossover
answer ("from which L does attention surgery beat quantization, at matched quality"), with
short point labels and costs in their units; and the raw front / crossover tables."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from frontier.results.answer import where_cheaper
from frontier.results.crossover import attention_class, cost_series
from frontier.results.families import QUESTION_PAIRS, challenger_pairs, fam_rank
from frontier.results.labels import (
    LATENCY,
    METRIC_WORDS,
    RECALL,
    XO_METRICS,
    fmt_cost,
    fmt_q,
    format_table,
    short_labels,
)
from frontier.results.parquet_io import read_metadata, read_rows
from frontier.results.schema import cost_lower_is_better


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


def _largest_l_rows(rows: list[dict]) -> list[dict]:
    """Keep each (source, hardware, cost_metric) group at its largest context length."""
    top: dict[tuple, int | None] = {}
    for r in rows:
        k = (r["source"], r["hardware"], r["cost_metric"])
        L = r["context_len"]
        if k not in top or (L is not None and (top[k] is None or L > top[k])):
            top[k] = L
    return [r for r in rows if r["context_len"] == top[(r["source"], r["hardware"], r["cost_metric"])]]


def frontier_summary(out_dir: Path, quality_metric: str = "ppl") -> str:
    """The Pareto front of every cost metric at its largest context length (measured first,
    then modelled per hardware), short point labels, costs with units; and how many points
    are off those fronts and why (every L and quality metric is in ``frontier.parquet``)."""
    out_dir = Path(out_dir)
    rows = [r for r in read_rows(out_dir, "frontier") if r["quality_metric"] == quality_metric]
    if not rows:
        return f"(no {quality_metric} frontier in {out_dir / 'frontier.parquet'})"
    rows = _largest_l_rows(rows)
    labels = short_labels(r["point_id"] for r in rows)
    runs = {r["point_id"]: r for r in read_rows(out_dir, "runs")}
    rcols = [k for k in next(iter(runs.values()), {}) if RECALL.match(k) and k.startswith("recall")]
    rcol = max(rcols, key=lambda k: int(RECALL.match(k)["L"]), default=None)
    front = [r for r in rows if r.get("on_front", True)]
    front.sort(key=lambda r: (r["source"] != "measured", str(r["hardware"]), list(METRIC_WORDS).index(r["cost_metric"])
                              if r["cost_metric"] in METRIC_WORDS else 99, r["cost_metric"],
                              r["cost"] if cost_lower_is_better(r["cost_metric"]) else -r["cost"]))
    table, prev = [], None
    for r in front:
        key = (r["source"], r["hardware"], r["cost_metric"], r["context_len"])
        head = [r["source"], r["hardware"] or "-", r["cost_metric"], r["context_len"]] if key != prev else ["", "", "", ""]
        prev = key
        extra = [runs.get(r["point_id"], {}).get(rcol)] if rcol else []
        table.append([*head, labels[r["point_id"]], r["family"], fmt_cost(r["cost_metric"], r["cost"]),
                      fmt_q(r["quality"]), *[fmt_q(v) for v in extra]])
    headers = ["source", "hardware", "cost", "L", "point", "family", "value", quality_metric]
    txt = format_table(headers + ([rcol] if rcol else []), table)
    off = [r for r in rows if not r.get("on_front", True) and r.get("reason")]
    if off:
        kinds: dict[str, set] = {}
        for r in off:
            kinds.setdefault(r["reason"].split(" ")[0].rstrip(":"), set()).add(r["point_id"])
        txt += ("\noff these fronts: " + ", ".join(f"{len(v)} point(s) {k}" for k, v in sorted(kinds.items()))
                + " (frontier.parquet: on_front = false, reason)")
    return txt


def _phrase(r: dict | None, x: str, series: dict | None = None) -> str:
    c = where_cheaper(r, x, series)
    rng = f"{r['l_min']:.0f}..{r['l_max']:.0f}" if r else ""
    return {"-": "not measured", "never": f"never (L {rng})", "all L": f"at every L ({rng})",
            "tied": f"tied (L {rng})"}.get(
        c, ("from L ≈ " + c[5:]) if c.startswith("L >=") else f"only below L ≈ {c[4:]}")


def _level_context(out_dir: Path, level: str) -> tuple[list[dict], dict, dict, dict]:
    """(crossover rows of ``level``, runs by point_id, short labels, cost series) of a results folder."""
    rows = [r for r in read_rows(out_dir, "crossover") if r["level"] == level]
    runs = {r["point_id"]: r for r in read_rows(out_dir, "runs")}
    labels = short_labels(list(runs) or [r["point_a"] for r in rows] + [r["point_b"] for r in rows])
    return rows, runs, labels, cost_series(read_rows(out_dir, "costs"))


def crossover_summary(out_dir: Path) -> str:
    """Family-level crossovers, one block per (source, hardware): the answer lines ("from which
    L does attention beat quantization in latency and memory, at matched perplexity") and a
    matrix of where the first family of each pair is cheaper."""
    out_dir = Path(out_dir)
    rows, runs, labels, series = _level_context(out_dir, "family")
    if not rows:
        return "(no family-level crossover rows: it needs two families with costs at two or more L)"
    reps = {}
    for r in rows:
        reps[r["family_a"]], reps[r["family_b"]] = r["point_a"], r["point_b"]
    parts = ["family representatives (lowest ppl of each family): " + ", ".join(
        f"{f} = {labels.get(p, p)} (ppl {fmt_q(runs.get(p, {}).get('ppl'))})"
        for f, p in sorted(reps.items(), key=lambda kv: fam_rank(kv[0])))]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["source"], r["hardware"]), []).append(r)
    for (source, hw), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "measured", str(kv[0][1]))):
        metrics = [m for m in XO_METRICS.get(source, ()) if any(r["metric"] == m for r in rs)]
        metrics += sorted({r["metric"] for r in rs} - set(metrics))
        idx = {(frozenset((r["family_a"], r["family_b"])), r["metric"]): r for r in rs}
        lo, hi = min(r["l_min"] for r in rs), max(r["l_max"] for r in rs)
        parts.append(f"\n{source} on {hw}, L = {lo:.0f}..{hi:.0f}:")
        pairs = challenger_pairs({r["family_a"] for r in rs} | {r["family_b"] for r in rs})
        for x, y in pairs:
            if (x, y) not in QUESTION_PAIRS:
                continue
            any_r = next((idx.get((frozenset((x, y)), m)) for m in metrics if idx.get((frozenset((x, y)), m))), None)
            if any_r is None:
                continue
            gap = any_r["quality_gap"]
            gap_x = gap if any_r["family_a"] == x else (None if gap is None else 1.0 / (1.0 + gap) - 1.0)
            matched = ("at matched perplexity" if any_r["matched"] else "NOT at matched perplexity") + (
                f" (ppl gap {gap_x:+.1%})" if gap_x is not None else "")
            lat = "; ".join(f"{METRIC_WORDS.get(m, m)} {_phrase(idx.get((frozenset((x, y)), m)), x, series)}"
                            for m in metrics if m in LATENCY)
            mem = "; ".join(f"{METRIC_WORDS.get(m, m)} {_phrase(idx.get((frozenset((x, y)), m)), x, series)}"
                            for m in metrics if m not in LATENCY)
            parts.append(f"answer: {x} ({labels.get(reps.get(x), reps.get(x))}) beats {y} "
                         f"({labels.get(reps.get(y), reps.get(y))}) {matched} — latency: {lat or '-'}; "
                         f"memory: {mem or '-'}")
        table = [[f"{x} vs {y}", *[where_cheaper(idx.get((frozenset((x, y)), m)), x, series) for m in metrics],
                  "yes" if all(r["matched"] for r in rs if {r["family_a"], r["family_b"]} == {x, y}) else "no"]
                 for x, y in pairs]
        parts.append("where the first family is cheaper:")
        parts.append(format_table(["pair", *metrics, "matched ppl"], table))
    n_pt = len([r for r in read_rows(out_dir, "crossover") if r["level"] == "point"])
    if n_pt:
        parts.append(f"\n(+ {n_pt} point-level rows for matched-quality point pairs in crossover.parquet, level = point)")
    return "\n".join(parts)


def kv_bits_summary(out_dir: Path) -> str:
    """The ``kv_bits`` crossover rows (crossover.compute_crossover): linear, hybrid and sparse
    attention against the best KV-quantized softmax point of each bit width, one line per pair
    and source: where the restructured point is cheaper, and whether the two are at matched
    perplexity. Empty when the sweep has no such pair."""
    rows, runs, labels, series = _level_context(Path(out_dir), "kv_bits")
    if not rows:
        return ""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        att = r["point_a"] if r["family_a"] != "kv_quant" else r["point_b"]
        kvp = r["point_b"] if att == r["point_a"] else r["point_a"]
        groups.setdefault((r["source"], r["hardware"], att, kvp, r["kv_bits"]), []).append(r)
    parts = []
    for (source, hw, att, kvp, bits), rs in sorted(groups.items(), key=lambda kv: (
            kv[0][0] != "measured", str(kv[0][1]), str(attention_class(runs.get(kv[0][2], {}))), kv[0][4])):
        x = runs.get(att, {}).get("family") or rs[0]["family_a"]
        metrics = [m for m in XO_METRICS.get(source, ()) if any(r["metric"] == m for r in rs)]
        idx = {r["metric"]: r for r in rs}
        gap = rs[0]["quality_gap"]
        gap_x = gap if rs[0]["point_a"] == att else (None if gap is None else 1.0 / (1.0 + gap) - 1.0)
        matched = ("matched" if rs[0]["matched"] else "NOT matched") + (
            f", ppl gap {gap_x:+.1%}" if gap_x is not None else "")
        cls = attention_class(runs.get(att, {})) or "restructured"
        cells = "; ".join(f"{METRIC_WORDS.get(m, m)} {_phrase(idx.get(m), x, series)}" for m in metrics)
        parts.append(f"  {source} on {hw}: {cls} ({labels.get(att, att)}) vs {bits}-bit KV "
                     f"({labels.get(kvp, kvp)}) [{matched}]: {cells}")
    return "\n".join(["restructured attention against a KV-quantized softmax cache (crossover level kv_bits):",
                      *parts])


def show_text(out_dir: Path) -> str:
    """What ``frontier show results/<sweep>`` prints."""
    out_dir = Path(out_dir)
    runs = read_rows(out_dir, "runs")
    meta = read_metadata(out_dir / "runs.parquet") if (out_dir / "runs.parquet").exists() else {}
    ok = [r for r in runs if r.get("status") == "ok"]
    fams = sorted({r.get("family") for r in ok}, key=fam_rank)
    head = (f"sweep {meta.get('sweep', out_dir.name)}: {len(runs)} points ({len(ok)} ok, "
            f"{len(runs) - len(ok)} failed); families: {', '.join(map(str, fams)) or '-'}; "
            f"schema {meta.get('schema_version', '?')}")
    failed = [f"  failed {short_labels(r['point_id'] for r in runs)[r['point_id']]}: {r.get('reason')}"
              for r in runs if r.get("status") != "ok"]
    return "\n".join([head, *failed, "",
                      "== Pareto frontiers (quality: ppl, lower is better; each cost at its largest L) ==",
                      frontier_summary(out_dir), "",
                      "== Crossover: context length L* where one family overtakes another ==",
                      crossover_summary(out_dir),
                      *(["", kv] if (kv := kv_bits_summary(out_dir)) else [])])
