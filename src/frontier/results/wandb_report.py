"""The sweep's W&B report (``frontier report --wandb``): a ``wandb_workspaces.reports.v2``
report over the sweep's runs (``group`` = sweep), saved when online, else its spec written to
``wandb_report.json`` (re-create and save it later with :func:`upload_wandb_report`)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from frontier.results.labels import METRIC_WORDS, RECALL, recall_sort_key
from frontier.results.parquet_io import read_rows, sweep_metadata, write_text
from frontier.results.terminal import show_text

WANDB_REPORT_FORMAT = "frontier.wandb_report/1"


def _sweep_facts(out_dir: Path) -> dict:
    runs = read_rows(out_dir, "runs")
    meta = sweep_metadata(out_dir)
    measured = [c for c in read_rows(out_dir, "costs") if c["source"] == "measured" and c["context_len"]]
    ls = sorted({int(c["context_len"]) for c in measured})
    metrics = [m for m in ("state_bytes", "prefill_ms", "decode_tok_s", "peak_mem_bytes")
               if any(c["metric"] == m for c in measured)]
    cols = list(runs[0]) if runs else []
    recall = sorted((c for c in cols if RECALL.match(c)), key=recall_sort_key)
    return {"sweep": meta.get("sweep", out_dir.name), "ls": ls, "metrics": metrics, "recall": recall,
            "has_ppl": "ppl" in cols}


def build_wandb_report(out_dir: Path, entity: str, project: str = "frontier"):
    """The sweep's W&B report as a ``wandb_workspaces.reports.v2.Report`` (built locally; nothing
    is sent). Panel grids over the sweep's runs (``group`` = sweep): the evaluate runs' summary
    metrics (``ppl``, ``weight_bytes``, ``<cost>@<L>``, ``recall_acc@<L>``) as the frontier
    scatters, cost-vs-L and recall-vs-L parallel coordinates; the collect run's W&B Tables
    (runs, frontier, crossover); and the ``frontier show`` text."""
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    out_dir = Path(out_dir)
    f = _sweep_facts(out_dir)
    sweep, lmax = f["sweep"], (f["ls"][-1] if f["ls"] else None)

    def runset(job_type: str) -> Any:
        return wr.Runset(entity=entity, project=project, name=f"{sweep}: {job_type} runs",
                         filters=[expr.Metric("Group") == sweep, expr.Metric("JobType") == job_type])

    ident = [wr.ParallelCoordinatesPlotColumn(metric=wr.Config(k), display_name=k.split(".")[0])
             for k in ("quant.name", "attention.name", "finetune.name")]
    frontier_panels = [wr.ScatterPlot(title="perplexity vs weight bytes", x="weight_bytes", y="ppl", log_x=True)]
    for m in f["metrics"]:
        frontier_panels.append(wr.ScatterPlot(title=f"perplexity vs {METRIC_WORDS.get(m, m)} at L={lmax} (measured)",
                                              x=f"{m}@{lmax}", y="ppl", log_x=True))
    cost_panels = [wr.ParallelCoordinatesPlot(
        title=f"{METRIC_WORDS.get(m, m)} vs L (measured)", columns=ident + [
            wr.ParallelCoordinatesPlotColumn(metric=f"{m}@{L}", display_name=f"L={L}", log=True) for L in f["ls"]])
        for m in f["metrics"]]
    recall_panels = [wr.ParallelCoordinatesPlot(title="recall accuracy vs L", columns=ident + [
        wr.ParallelCoordinatesPlotColumn(metric=c) for c in f["recall"]])] if f["recall"] else []
    table_panels = [wr.WeavePanelSummaryTable(table_name=t, layout=wr.Layout(w=24, h=12))
                    for t in ("runs", "frontier", "crossover")]
    blocks = [
        wr.P(f"Sweep {sweep}: quantization vs attention surgery, quality and cost as a function of context "
             f"length L. Runs are grouped by sweep (group = {sweep}) with job_type = pipeline stage; the "
             "Parquet files in results/" + sweep + "/ are the store (docs/results-schema.md)."),
        wr.H1("Pareto frontiers"),
        wr.P("Perplexity (lower is better) against each cost; one point per evaluate run."),
        wr.PanelGrid(runsets=[runset("evaluate")], panels=frontier_panels),
    ]
    if cost_panels:
        blocks += [wr.H1("Cost vs context length"),
                   wr.P("Each line is a point of the grid across its measured context lengths."),
                   wr.PanelGrid(runsets=[runset("evaluate")], panels=cost_panels)]
    if recall_panels:
        blocks += [wr.H1("Recall accuracy vs context length"),
                   wr.PanelGrid(runsets=[runset("evaluate")], panels=recall_panels)]
    blocks += [wr.H1("Collected tables"),
               wr.P("The collect run's W&B Tables: runs, frontier (on_front + reason), crossover (L*)."),
               wr.PanelGrid(runsets=[runset("collect")], panels=table_panels)]
    if (out_dir / "crossover.parquet").exists():
        blocks += [wr.H1("Frontier and crossover summary"),
                   wr.CodeBlock(code=show_text(out_dir), language="markdown")]
    return wr.Report(project=project, entity=entity, title=f"frontier: {sweep}"[:128],
                     description="Quantization vs attention surgery: Pareto frontiers and crossover context lengths.",
                     blocks=blocks, width="fluid")


def _to_spec(obj: Any) -> Any:
    """A report object as JSON: every dataclass (``_type`` = its wr class) with its init fields."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        d = {"_type": type(obj).__name__}
        for fld in dataclasses.fields(obj):
            if fld.init and not fld.name.startswith("_"):
                d[fld.name] = _to_spec(getattr(obj, fld.name))
        return d
    if isinstance(obj, (list, tuple)):
        return [_to_spec(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _to_spec(v) for k, v in obj.items()}
    return obj


def _from_spec(obj: Any) -> Any:
    import wandb_workspaces.reports.v2 as wr

    if isinstance(obj, dict) and "_type" in obj:
        return getattr(wr, obj["_type"])(**{k: _from_spec(v) for k, v in obj.items() if k != "_type"})
    if isinstance(obj, list):
        return [_from_spec(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _from_spec(v) for k, v in obj.items()}
    return obj


def _panel_index(spec: dict) -> list[dict]:
    out, section = [], None
    for b in spec["blocks"]:
        if b["_type"] in ("H1", "H2", "H3"):
            section = b["text"]
        for p in b.get("panels", []) if b["_type"] == "PanelGrid" else []:
            row = {"section": section, "type": p["_type"], "title": p.get("title") or p.get("table_name")}
            if p["_type"] == "ScatterPlot":
                row.update(x=p["x"], y=p["y"])
            if p["_type"] == "WeavePanelSummaryTable":
                row["table"] = p["table_name"]
            row["runset"] = [rs["filters"] for rs in b["runsets"]]
            out.append(row)
    return out


def load_wandb_report(path: str | Path, entity: str | None = None, project: str | None = None):
    """Re-create the Report of a ``wandb_report.json``; ``entity``/``project`` replace the
    spec's (in the report and every run set)."""
    spec = json.loads(Path(path).read_text())
    if spec.get("format") != WANDB_REPORT_FORMAT:
        raise ValueError(f"{path}: not a {WANDB_REPORT_FORMAT} file")
    rep = spec["report"]
    for obj in [rep] + [rs for b in rep["blocks"] for rs in b.get("runsets", [])]:
        if entity is not None:
            obj["entity"] = entity
        if project is not None:
            obj["project"] = project
    return _from_spec(rep)


def _wandb_online() -> tuple[bool, str]:
    if os.environ.get("WANDB_MODE") != "online":
        return False, "WANDB_MODE is not 'online'"
    if os.environ.get("WANDB_API_KEY"):
        return True, ""
    try:
        import wandb

        wandb.Api()
        return True, ""
    except Exception as e:  # noqa: BLE001 - no key: stay offline
        return False, f"no W&B API key ({type(e).__name__})"


def _default_entity() -> str:
    import wandb

    return wandb.Api().default_entity or ""


def upload_wandb_report(path: str | Path, entity: str | None = None, project: str | None = None) -> str:
    """Save the report of a ``wandb_report.json`` to the W&B server (online, API key needed;
    upload the runs first with ``wandb sync``). Returns the report URL."""
    spec = json.loads(Path(path).read_text())
    entity = entity or os.environ.get("WANDB_ENTITY") or spec.get("entity") or _default_entity()
    report = load_wandb_report(path, entity=entity, project=project)
    report.save()
    return report.url


def wandb_report(out_dir: Path, entity: str | None = None, project: str | None = None) -> dict:
    """Build the sweep's W&B report; write its spec to ``<out_dir>/wandb_report.json``; save it
    on the server when online (``WANDB_MODE=online`` and an API key). Returns ``{"path", "saved",
    "url", "message"}``; ``message`` says how to upload when it was not saved."""
    import importlib.metadata as md

    out_dir = Path(out_dir)
    online, why = _wandb_online()
    entity = entity or os.environ.get("WANDB_ENTITY") or ""
    project = project or os.environ.get("WANDB_PROJECT") or "frontier"
    if online and not entity:
        try:
            entity = _default_entity()
        except Exception as e:  # noqa: BLE001
            online, why = False, f"no default W&B entity ({type(e).__name__}: {e})"
    report = build_wandb_report(out_dir, entity, project)
    rep = _to_spec(report)
    facts = _sweep_facts(out_dir)
    spec = {"format": WANDB_REPORT_FORMAT, "sweep": facts["sweep"], "entity": entity or None,
            "project": project, "wandb_workspaces": md.version("wandb-workspaces"),
            "panels": _panel_index(rep), "report": rep}
    path = out_dir / "wandb_report.json"
    write_text(path, json.dumps(spec, indent=1))
    result = {"path": str(path), "saved": False, "url": None, "message": ""}
    if online:
        try:
            report.save()
            result.update(saved=True, url=report.url, message=f"W&B report saved: {report.url}")
            return result
        except Exception as e:  # noqa: BLE001 - report the failure, keep the spec
            why = f"saving failed: {type(e).__name__}: {e}"
    wdir = out_dir.resolve().parents[1] / "work" / "wandb" if len(out_dir.resolve().parents) > 1 else None
    runs_glob = f"{wdir}/offline-run-*" if wdir is not None and wdir.is_dir() else "work/wandb/offline-run-*"
    ent = f"entity={entity!r}" if entity else "entity='<your-entity>'"
    result["message"] = (
        f"W&B report not saved ({why}); its spec is in {path}.\n"
        "To publish it:\n"
        f"  1. upload the offline runs:  wandb sync {runs_glob}\n"
        f"  2. save the report, online:  WANDB_MODE=online WANDB_API_KEY=... frontier report {out_dir} --wandb\n"
        f"     or from the spec:         python -c \"from frontier.results.wandb_report import upload_wandb_report as u; "
        f"print(u('{path}', {ent}))\"")
    return result
