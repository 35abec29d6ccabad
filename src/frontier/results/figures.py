"""The interactive figures of report.html (Plotly): quality-vs-cost frontiers with the Pareto
front as a step line, cost vs context length on log axes with the crossovers L* marked, and the
recall heatmap. Families are legend groups (a click on the legend hides one family in every
panel); point labels show on hover, never printed; ``customdata[0]`` of every point trace is
the anchor of the point's row in the runs table (report.js jumps there on click)."""

from __future__ import annotations

import html
import math

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from frontier.results.families import fam_rank, hex_color
from frontier.results.fronts import pareto_front
from frontier.results.labels import COST_PANELS, METRIC_WORDS, RECALL, fmt_cost, fmt_q, is_num, recall_sort_key
from frontier.results.schema import cost_lower_is_better

FRONT_COLOR = "#d62728"
LSTAR_COLOR = "#b00020"


def point_hover(r: dict, label: str, recall_col: str | None) -> str:
    """The hover text of a point: label, family, the config choices and the numbers."""
    e = html.escape
    ovr = [f"{k[4:]}={v}" for k, v in sorted(r.items()) if k.startswith("ovr.") and v is not None]
    lines = [f"<b>{e(label)}</b>", f"family: {e(str(r.get('family')))}",
             "quant {} · attention {} · finetune {} · eval {}".format(
                 *(e(str(r.get(g))) for g in ("quant", "attention", "finetune", "eval")))]
    if ovr:
        lines.append("overrides: " + e(", ".join(ovr)))
    nums = [f"ppl {fmt_q(r.get('ppl'))}"]
    if recall_col and is_num(r.get(recall_col)):
        nums.append(f"{recall_col} {fmt_q(r.get(recall_col))}")
    nums.append(f"weights {fmt_cost('weight_bytes', r.get('weight_bytes'))}")
    if is_num(r.get("effective_bits")):
        nums.append(f"{float(r['effective_bits']):.3g} bits/weight")
    if is_num(r.get("gap_closed")):
        nums.append(f"gap closed {float(r['gap_closed']):.0%}")
    lines.append(" · ".join(nums))
    return "<br>".join(lines)


def _log_ok(vals: list[float]) -> bool:
    return bool(vals) and min(vals) > 0 and max(vals) / min(vals) > 20


def _bytes_linear_axis(vals: list[float]) -> dict:
    """About five ticks at round multiples of KiB / MiB / GiB, labelled in those units."""
    hi = max(vals)
    unit = 1024 ** max(0, min(4, int(math.log(max(hi, 1), 1024))))
    raw = ((hi - min(vals)) or hi) / unit / 5
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)
                if m * 10 ** math.floor(math.log10(raw)) >= raw), default=raw) * unit if raw > 0 else unit
    lo = math.floor(min(vals) / step) * step
    ticks = [lo + i * step for i in range(int((hi - lo) / step) + 2)]
    name = ("B", "KiB", "MiB", "GiB", "TiB")[round(math.log(unit, 1024))]
    return {"tickvals": ticks, "ticktext": [f"{t / unit:.3g} {name}" for t in ticks]}


def _bytes_axis(vals: list[float]) -> dict:
    """Tick labels in binary units at powers of 4 (log) for a byte axis."""
    lo, hi = min(vals), max(vals)
    k0, k1 = math.floor(math.log(lo, 4)), math.ceil(math.log(hi, 4))
    ticks = [4.0 ** k for k in range(k0, k1 + 1)]
    return {"tickvals": ticks, "ticktext": [fmt_cost("bytes", t).replace(".0 ", " ") for t in ticks]}


def _layout(fig: go.Figure, nrow: int, left: int) -> None:
    """Subplot grid layout: the legend on one line at the top of the figure, above the subplot
    titles (a click on an entry hides that family in every panel)."""
    fig.update_layout(height=330 * nrow + 90, margin={"l": left, "r": 20, "t": 85, "b": 50},
                      legend={"orientation": "h", "yref": "container", "y": 1.0, "yanchor": "top", "x": 0.0,
                              "xanchor": "left", "title": {"text": "click to hide: "}, "font": {"size": 12}},
                      hovermode="closest", template="plotly_white", font={"size": 12})


def _log_axis(metric: str, vals: list[float]) -> dict:
    """A log axis: byte axes at powers of 4 in binary units; others labelled at 1, 2, 5 only."""
    return {"type": "log", **(_bytes_axis(vals) if metric.endswith("bytes") else {"dtick": "D2"})}


def frontier_figure(panels: list[dict], runs: dict[str, dict], labels: dict[str, str],
                    anchors: dict[str, str], recall_col: str | None) -> go.Figure | None:
    """``panels``: [{"title", "metric", "values": {point_id: cost}}]; quality = ppl. One subplot
    per panel, two per row; families share a legend group across subplots."""
    panels = [p for p in panels if any(is_num(v) and is_num(runs[pid].get("ppl"))
                                       for pid, v in p["values"].items() if pid in runs)]
    if not panels:
        return None
    ncol = 2 if len(panels) > 1 else 1
    nrow = math.ceil(len(panels) / ncol)
    fig = make_subplots(rows=nrow, cols=ncol, subplot_titles=[p["title"] for p in panels],
                        horizontal_spacing=0.09, vertical_spacing=0.22 / max(nrow, 1) + 0.06)
    shown: set[str] = set()
    for i, p in enumerate(panels):
        row, col = i // ncol + 1, i % ncol + 1
        metric = p["metric"]
        pts = [(pid, runs[pid].get("family"), float(v), float(runs[pid]["ppl"])) for pid, v in p["values"].items()
               if pid in runs and is_num(v) and is_num(runs[pid].get("ppl"))]
        pts.sort(key=lambda t: (fam_rank(t[1]), t[0]))
        lower = cost_lower_is_better(metric)
        front, _ = pareto_front([{"point_id": a, "cost": c, "quality": q} for a, _, c, q in pts],
                                "cost", "quality", lower, True)
        fams = sorted({f for _, f, _, _ in pts}, key=fam_rank)
        for fam in fams:
            mine = [t for t in pts if t[1] == fam]
            fig.add_trace(go.Scatter(
                x=[t[2] for t in mine], y=[t[3] for t in mine], mode="markers", name=str(fam),
                legendgroup=str(fam), showlegend=fam not in shown,
                marker={"color": hex_color(fam), "size": 9, "line": {"width": 0.5, "color": "white"}},
                customdata=[[anchors.get(t[0], ""), fmt_cost(metric, t[2])] for t in mine],
                text=[point_hover(runs[t[0]], labels.get(t[0], t[0]), recall_col) for t in mine],
                hovertemplate="%{text}<br>" + html.escape(METRIC_WORDS.get(metric, metric)) +
                              ": %{customdata[1]}<extra></extra>"), row=row, col=col)
            shown.add(fam)
        fp = sorted((c, q) for pid, _, c, q in pts if pid in front)
        if fp:
            fig.add_trace(go.Scatter(
                x=[c for c, _ in fp], y=[q for _, q in fp], mode="lines+markers", name="Pareto front",
                legendgroup="front", showlegend="front" not in shown, hoverinfo="skip",
                line={"color": FRONT_COLOR, "width": 1.5, "shape": "hv" if lower else "vh"},
                marker={"symbol": "circle-open", "size": 15, "color": FRONT_COLOR, "line": {"width": 1.5}}),
                row=row, col=col)
            shown.add("front")
        xs = [t[2] for t in pts]
        xaxis: dict = {"title": {"text": p.get("axis", METRIC_WORDS.get(metric, metric)), "font": {"size": 11}}}
        if _log_ok(xs):
            xaxis.update(_log_axis(metric, xs))
        elif metric.endswith("bytes"):
            xaxis.update(_bytes_linear_axis(xs))
        fig.update_xaxes(row=row, col=col, **xaxis)
        fig.update_yaxes(row=row, col=col, title={"text": "perplexity" if col == 1 else "", "font": {"size": 11}})
    _layout(fig, nrow, left=60)
    return fig


def _lstar_marks(cross: list[dict], source: str, hw: str, xmetric: str) -> list[tuple[float, str]]:
    """(L*, hover text) of the real crossings (L* inside the range) of family pairs for one panel;
    crossings within 2 % of each other share a mark."""
    marks = sorted(((float(r["l_star"]), r) for r in cross
                    if r.get("level") == "family" and r["source"] == source and str(r["hardware"]) == hw
                    and r["metric"] == xmetric and r["l_star"] is not None and r["l_star"] > r["l_min"] * 1.001),
                   key=lambda t: t[0])
    out: list[tuple[float, list[str]]] = []
    for x, r in marks:
        txt = (f"{r['family_a']} cheaper than {r['family_b']} from L ≈ {x:,.0f}"
               + ("" if r.get("matched", True) else " (ppl not matched)"))
        if out and x <= out[-1][0] * 1.02:
            out[-1][1].append(txt)
        else:
            out.append((x, [txt]))
    return [(x, "<b>L* " + METRIC_WORDS.get(xmetric, xmetric) + "</b><br>" + "<br>".join(t)) for x, t in out]


def _pow2_ticks(ls: list[int]) -> dict:
    lo, hi = min(ls), max(ls)
    ticks = [2 ** k for k in range(math.floor(math.log2(lo)), math.ceil(math.log2(hi)) + 1)]
    if len(ticks) > 9:
        ticks = ticks[::2]
    return {"tickvals": ticks, "ticktext": [f"{t // 1024}k" if t >= 1024 else str(t) for t in ticks]}


def cost_vs_l_figure(source: str, hw: str, costs: list[dict], cross: list[dict],
                     runs: dict[str, dict], labels: dict[str, str], anchors: dict[str, str],
                     reps: set[str]) -> go.Figure | None:
    """Cost against L for one (source, hardware): one line per point, the family representatives
    thick, log axes, the family-level L* of each metric as a dashed line with a hover mark."""
    rows = [c for c in costs if c["source"] == source and str(c["hardware"]) == hw and c["point_id"] in runs
            and is_num(c["value"]) and c["context_len"]]
    panels = [p for p in COST_PANELS[source] if any(c["metric"] == p[0] for c in rows)]
    if not panels:
        return None
    ncol = 2 if len(panels) > 1 else 1
    nrow = math.ceil(len(panels) / ncol)
    fig = make_subplots(rows=nrow, cols=ncol, subplot_titles=[f"{METRIC_WORDS.get(p[1], p[1])} vs L" for p in panels],
                        horizontal_spacing=0.09, vertical_spacing=0.22 / max(nrow, 1) + 0.06)
    shown: set[str] = set()
    all_ls = sorted({int(c["context_len"]) for c in rows})
    for i, (metric, xmetric, ylabel, tf) in enumerate(panels):
        row, col = i // ncol + 1, i % ncol + 1
        per: dict[str, list[tuple[int, float]]] = {}
        for c in rows:
            if c["metric"] == metric:
                v = tf(c["value"]) if tf else c["value"]
                if is_num(v) and v > 0:
                    per.setdefault(c["point_id"], []).append((int(c["context_len"]), float(v)))
        for pid in sorted(per, key=lambda p: (fam_rank(runs[p].get("family")), p not in reps, p)):
            xs, ys = zip(*sorted(per[pid]))
            fam = runs[pid].get("family")
            thick = pid in reps or not reps
            lab = labels.get(pid, pid)
            fig.add_trace(go.Scatter(
                x=list(xs), y=list(ys), mode="lines+markers", name=str(fam), legendgroup=str(fam),
                showlegend=fam not in shown, opacity=1.0 if thick else 0.45,
                line={"color": hex_color(fam), "width": 3 if thick else 1.2}, marker={"size": 5 if thick else 3},
                customdata=[[anchors.get(pid, ""), fmt_cost(metric if not tf else "decode_ms", y)] for y in ys],
                text=[f"<b>{html.escape(lab)}</b> ({html.escape(str(fam))}"
                      + (", family representative" if pid in reps else "") + ")"] * len(xs),
                hovertemplate="%{text}<br>L = %{x:,}<br>" + html.escape(ylabel) + ": %{y:.4g}<extra></extra>"),
                row=row, col=col)
            shown.add(fam)
        ys_all = [v for pts in per.values() for _, v in pts]
        marks = _lstar_marks(cross, source, hw, xmetric)
        if marks and ys_all:
            lo_y, hi_y = min(ys_all), max(ys_all)
            if _log_ok(ys_all):  # 6 % of the axis above the highest line
                top = hi_y * (hi_y / lo_y) ** 0.06
            else:
                top = hi_y + 0.06 * ((hi_y - lo_y) or abs(hi_y))
            for x, _ in marks:
                fig.add_vline(x=x, line={"color": LSTAR_COLOR, "dash": "dash", "width": 1}, row=row, col=col)
            fig.add_trace(go.Scatter(
                x=[x for x, _ in marks], y=[top] * len(marks), mode="markers", name="L* (family pairs)",
                legendgroup="lstar", showlegend="lstar" not in shown,
                marker={"symbol": "triangle-down", "size": 11, "color": LSTAR_COLOR},
                text=[t for _, t in marks], hovertemplate="%{text}<extra></extra>"), row=row, col=col)
            shown.add("lstar")
        fig.update_xaxes(row=row, col=col, type="log", title={"text": "context length L", "font": {"size": 11}},
                         **_pow2_ticks(all_ls))
        yaxis: dict = {"title": {"text": ylabel, "font": {"size": 11}}}
        if _log_ok(ys_all):
            yaxis.update(_log_axis(metric, ys_all))
        elif metric.endswith("bytes") and ys_all:
            yaxis.update(_bytes_linear_axis(ys_all))
        fig.update_yaxes(row=row, col=col, **yaxis)
    _layout(fig, nrow, left=70)
    return fig


def recall_figure(runs: list[dict], labels: dict[str, str], anchors: dict[str, str]) -> go.Figure | None:
    """Accuracy per point (rows, grouped by family) and ``<metric>@<L>`` column."""
    cols = sorted({k for r in runs for k, v in r.items() if RECALL.match(k) and is_num(v)}, key=recall_sort_key)
    if not cols:
        return None
    runs = sorted(runs, key=lambda r: (fam_rank(r.get("family")), r["point_id"]), reverse=True)
    z = [[r.get(c) if is_num(r.get(c)) else None for c in cols] for r in runs]
    ylab = [f"{labels.get(r['point_id'], r['point_id'])} ({r.get('family')})" for r in runs]
    fig = go.Figure(go.Heatmap(
        z=z, x=cols, y=ylab, zmin=0, zmax=1, colorscale="Viridis", texttemplate="%{z:.2f}",
        customdata=[[anchors.get(r["point_id"], "")] * len(cols) for r in runs],
        hovertemplate="<b>%{y}</b><br>%{x}: %{z:.3f}<extra></extra>", colorbar={"title": {"text": "accuracy"}}))
    fig.update_layout(height=120 + 26 * len(runs), margin={"l": 10, "r": 10, "t": 20, "b": 60},
                      template="plotly_white", xaxis={"type": "category"}, yaxis={"automargin": True})
    return fig
