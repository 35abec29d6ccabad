"""``report.html``: one self-contained page (plotly.js, the data, the CSS and JS inline; it
works offline) for people who read a sweep's results.

It opens with the answer (:mod:`frontier.results.answer`: per family pair, at matched quality,
the L* per cost metric, measured and modelled), then the Pareto frontiers and cost-vs-L plots
(:mod:`frontier.results.figures`), the recall heatmap, and the runs / fronts / crossover tables
(:mod:`frontier.results.tables`); the sweep's metadata and the PNG and Parquet files last.
"""

from __future__ import annotations

import html
import re
from importlib import resources
from pathlib import Path

from frontier.results.answer import answer_intro, family_answers, pair_lead, pair_title, source_sentence
from frontier.results.families import FAMILY_MEANING, fam_rank, hex_color
from frontier.results.figures import cost_vs_l_figure, frontier_figure, recall_figure
from frontier.results.labels import FRONT_AXES, SECTIONS, WEIGHT_PANEL_TITLE, front_panel_title
from frontier.results.parquet_io import read_rows, sweep_metadata, write_text
from frontier.results.plots import plot_caption
from frontier.results.tables import crossover_table, fronts_table, recall_column, runs_table

e = html.escape
_VERDICT = re.compile(r"(equal at every L|from L ≈ [\d,]+|only below L ≈ [\d,]+|at every L|at no L)")


def _asset(name: str) -> str:
    return (resources.files("frontier.results") / "assets" / name).read_text()


def _linked(text: str, answers: dict, pids: list[str], anchors: dict) -> str:
    """Escape ``text``; link the labels of ``pids`` to their runs-table rows; bold the verdicts."""
    out = e(text)
    for pid in pids:
        lab = e(answers["labels"].get(pid, pid))
        if pid in anchors:
            out = out.replace(f"({lab},", f"(<a href='#{anchors[pid]}'>{lab}</a>,", 1)
    return _VERDICT.sub(r"<b>\1</b>", out)


def answer_html(answers: dict, anchors: dict) -> str:
    parts = [f"<p class='intro'>{e(answer_intro(answers))}</p>"]
    main = [p for p in answers["pairs"] if p["question"]]
    rest = [p for p in answers["pairs"] if not p["question"]]
    for group, cls in ((main, "pair"), (rest, "pair minor")):
        if group is rest and rest:
            parts.append("<h3 class='others'>Other family pairs</h3><div class='grid'>")
        for p in group:
            pids = [p["point_x"], p["point_y"]]
            sents = "".join(f"<span class='src'>{_linked(source_sentence(p, s), answers, pids, anchors)}</span>"
                            for s in p["sources"])
            badge = "" if p["matched"] else " <span class='bad'>quality not matched</span>"
            parts.append(f"<div class='{cls}'><h3><span class='dot' style='background:{hex_color(p['x'])}'></span>"
                         f"{e(pair_title(p))}{badge}</h3><p>{_linked(pair_lead(p, answers), answers, pids, anchors)}"
                         f" {sents}</p></div>")
        if group is rest and rest:
            parts.append("</div>")
    return "".join(parts)


def _fig_html(fig, div_id: str, title: str) -> str:
    return f"<h3 class='figt'>{e(title)}</h3>" + fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                       config={"displaylogo": False, "responsive": True, "toImageButtonOptions": {"scale": 2}})


def figures_html(out_dir: Path, runs_ok: dict, labels: dict, anchors: dict, reps: set) -> dict[str, list[str]]:
    """{"frontiers": [...], "cost": [...], "recall": [...]}: the figures' HTML per section."""
    costs = read_rows(out_dir, "costs")
    cross = read_rows(out_dir, "crossover")
    rcol = recall_column(list(runs_ok.values()))
    out: dict[str, list[str]] = {"frontiers": [], "cost": [], "recall": []}
    wb = {pid: r.get("weight_bytes") for pid, r in runs_ok.items()}
    by_src: dict[tuple, list[dict]] = {}
    for c in costs:
        if c["point_id"] in runs_ok and c["context_len"]:
            by_src.setdefault((c["source"], str(c["hardware"])), []).append(c)
    keys = sorted(by_src, key=lambda k: (k[0] != "measured", k[1]))
    if not any(k[0] == "measured" for k in keys):
        keys = [("measured", None)] + keys
    n = 0
    for source, hw in keys:
        rows = by_src.get((source, hw), [])
        panels = [{"title": WEIGHT_PANEL_TITLE, "metric": "weight_bytes", "values": wb}] if source == "measured" \
            and n == 0 else []
        lmax = max((c["context_len"] for c in rows), default=None)
        for metric, axis in FRONT_AXES[source]:
            vals = {c["point_id"]: c["value"] for c in rows if c["metric"] == metric and c["context_len"] == lmax}
            if vals:
                panels.append({"title": front_panel_title(axis, lmax), "metric": metric, "values": vals, "axis": axis})
        what = "Measured" if source == "measured" else "Modelled (roofline)"
        title = f"{what} on {hw}: perplexity against each cost" + (f" at the largest L ({lmax:,})" if lmax else "")
        fig = frontier_figure(panels, runs_ok, labels, anchors, rcol)
        if fig is not None:
            n += 1
            out["frontiers"].append(_fig_html(fig, f"fig-front-{n}", title if hw else
                                              "Perplexity against stored weight bytes"))
        if hw is not None:
            fig = cost_vs_l_figure(source, hw, costs, cross, runs_ok, labels, anchors, reps)
            if fig is not None:
                out["cost"].append(_fig_html(fig, f"fig-cost-{len(out['cost']) + 1}",
                                             f"{what} on {hw}: cost against context length L"))
    fig = recall_figure(list(runs_ok.values()), labels, anchors)
    if fig is not None:
        out["recall"].append(_fig_html(fig, "fig-recall", "Recall accuracy (exact match) per point and context "
                                                          "length L"))
    return out


def write_html(out_dir: Path) -> Path:
    """Write ``<out_dir>/report.html`` from the sweep's Parquet files; returns its path."""
    import plotly.offline

    out_dir = Path(out_dir)
    runs = read_rows(out_dir, "runs")
    meta = sweep_metadata(out_dir)
    sweep = meta.get("sweep", out_dir.name)
    answers = family_answers(out_dir)
    labels = {**answers["labels"]}
    anchors = {pid: f"run-{i + 1}" for i, pid in enumerate(sorted(r["point_id"] for r in runs))}
    runs_ok = {r["point_id"]: r for r in runs if r.get("status") == "ok"}
    figs = figures_html(out_dir, runs_ok, labels, anchors, set(answers["reps"].values()))
    fams = sorted({r.get("family") for r in runs_ok.values()}, key=fam_rank)
    failed = len(runs) - len(runs_ok)
    legend = " ".join(f"<span class='fam'><span class='dot' style='background:{hex_color(f)}'></span><b>{e(str(f))}</b>"
                      f"{(': ' + e(FAMILY_MEANING[f])) if f in FAMILY_MEANING else ''}</span>" for f in fams)
    nav = " · ".join(f"<a href='#{k}'>{e(v)}</a>" for k, v in SECTIONS.items())
    sections = [
        f"<section id='answer' class='answer'><h2>{SECTIONS['answer']}</h2>{answer_html(answers, anchors)}</section>",
        f"<section id='frontiers'><h2>{SECTIONS['frontiers']}</h2><p class='note'>"
        "Perplexity (lower is better) against "
        "each cost, one marker per point, coloured by family; the Pareto front is the red step line through the "
        "ringed points. Hover a point for its configuration and numbers, click it for its row in the runs table, "
        "click a family in the legend to hide it.</p>"
        + ("".join(figs["frontiers"]) or "<p>No point has both a cost and a perplexity.</p>") + "</section>",
        f"<section id='cost'><h2>{SECTIONS['cost']}</h2><p class='note'>"
        "One line per point (family "
        "representatives thick), log axes. Dashed red lines mark L*, where one family's representative becomes "
        "cheaper than another's; hover the triangle at the top for the pair.</p>"
        + ("".join(figs["cost"]) or "<p>No costs at two or more context lengths.</p>") + "</section>",
        f"<section id='recall'><h2>{SECTIONS['recall']}</h2>"
        + ("".join(figs["recall"]) or "<p>No recall metric in this sweep.</p>") + "</section>",
        f"<section id='tables'><h2>{SECTIONS['tables']}</h2><h3>Runs</h3>" + runs_table(runs, labels, anchors)
        + "<h3>Pareto fronts</h3>" + fronts_table(read_rows(out_dir, "frontier"), labels, anchors)
        + "<h3>Crossovers</h3>" + crossover_table(read_rows(out_dir, "crossover"), labels, anchors) + "</section>",
    ]
    pngs = sorted(p.name for p in out_dir.glob("*.png"))
    foot = (f"<footer><p>Store: <code>runs.parquet</code>, <code>costs.parquet</code>, <code>frontier.parquet</code>, "
            f"<code>crossover.parquet</code> beside this file (schema {e(meta.get('schema_version', '?'))}, "
            f"docs/results-schema.md); git {e(meta.get('git_commit', '?'))}; versions {e(meta.get('versions', '{}'))}."
            "</p><p>Static plots (Snakemake report, docs): "
            + (", ".join(f"<a href='{e(p)}' title='{e(plot_caption(p[:-4]))}'>{e(p)}</a>" for p in pngs) or "none")
            + ".</p></footer>")
    head = (f"<header><h1>frontier report: {e(sweep)}</h1><p class='sub'>{len(runs)} points ({len(runs_ok)} ok"
            f"{f', <span class=bad>{failed} failed</span>' if failed else ''}) · {legend}</p>"
            f"<nav>{nav}</nav></header>")
    page = ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>frontier report: {e(sweep)}</title><style>{_asset('report.css')}</style>"
            f"<script>{plotly.offline.get_plotlyjs()}</script></head><body>{head}<main>{''.join(sections)}</main>"
            f"{foot}<script>{_asset('report.js')}</script></body></html>")
    return write_text(out_dir / "report.html", page)

