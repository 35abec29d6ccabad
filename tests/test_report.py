"""Results side: the documented schema, plots, `frontier show`, the W&B report spec and the
collect run's W&B Table (offline)."""
import json
import re

import pyarrow.parquet as pq
import pytest

from frontier import cli
from frontier.results import collect, html, parquet_io, plots, schema, wandb_report
from frontier.results.labels import short_labels
from test_collect import BASE, COMB, FAIL, LIN, QNT, write  # noqa: F401 - hand-made points

TABLES = ("runs", "costs", "frontier", "crossover")


def _collect(tmp_path):
    out = tmp_path / "results" / "demo"
    collect.run("demo", write(tmp_path, [BASE, QNT, LIN, COMB, FAIL]), out, modelled_context_lens=[1024, 131072])
    return out


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """Collected once for the read-only tests of this module."""
    return _collect(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def rendered(out):
    return plots.plot_all(out), html.write_html(out)


def doc_tables() -> dict[str, dict[str, str]]:
    """The column tables of docs/results-schema.md: {table: {column: type}}."""
    text = schema.SCHEMA_DOC.read_text()
    out: dict[str, dict[str, str]] = {}
    for name, body in re.findall(r"^### `(\w+)\.parquet`\n(.*?)(?=^### |\Z)", text, re.M | re.S):
        cols = re.findall(r"^\| `([^`]+)` \| (\w+) \|", body, re.M)
        out[name] = dict(cols)
    return out


def _pattern(col: str) -> str | None:
    if col.startswith("ovr."):
        return "ovr.<key>"
    if col.startswith("cfg."):
        return "cfg.<group>.<key>"
    if col.startswith("attn."):
        return "attn.<key>"
    if re.match(r"^.+@\d+$", col):
        return "<metric>@<L>"
    return None


def test_schema_doc_is_generated_from_schemas():
    text = schema.SCHEMA_DOC.read_text()
    begin, end = schema.SCHEMA_DOC_MARKERS
    generated = text.split(begin, 1)[1].split(end, 1)[0]
    assert generated.strip() == schema.schema_markdown().strip(), (
        "docs/results-schema.md is stale: run "
        "`.venv/bin/python -c 'from frontier.results.schema import write_schema_doc; write_schema_doc()'`")
    docs = doc_tables()
    assert set(docs) == set(TABLES)
    for t in TABLES:
        assert docs[t] == {c: typ for c, typ, _ in schema.SCHEMAS[t]}
    # the fixed Arrow schemas are exactly the documented ones, in order
    for t, arrow in (("costs", schema.COSTS_SCHEMA), ("frontier", schema.FRONTIER_SCHEMA),
                     ("crossover", schema.CROSSOVER_SCHEMA)):
        assert [(f.name, str(f.type)) for f in arrow] == [(c, typ) for c, typ, _ in schema.SCHEMAS[t]]


def test_schema_round_trip(tmp_path):
    """Files read back have the documented columns and types, and the documented metadata."""
    out = _collect(tmp_path)
    docs = doc_tables()
    for t in TABLES:
        arrow = pq.read_schema(out / f"{t}.parquet")
        doc = docs[t]
        fixed = {c: typ for c, typ in doc.items() if "<" not in c}
        written = {f.name: str(f.type) for f in arrow}
        if t != "runs":
            assert written == fixed
            continue
        assert set(fixed) <= set(written), set(fixed) - set(written)
        # every column the writer always emits is documented by name (not only by a pattern)
        always = schema._STR_BASE + schema._INT_BASE + schema._FLOAT_BASE + schema._STR_TAIL
        assert set(always) == set(fixed) - {"ppl"}, set(always) ^ (set(fixed) - {"ppl"})
        for c, typ in written.items():
            if c in fixed:
                assert typ == fixed[c], c
            else:
                pat = _pattern(c) or "<quality>"
                assert pat in doc and typ == doc[pat], (c, typ)
        md = parquet_io.read_metadata(out / f"{t}.parquet")
        assert set(schema.FILE_METADATA) <= set(md)
        assert set(md) - set(schema.FILE_METADATA) <= set(schema.TABLE_METADATA.get(t, {}))
        assert md["schema_version"] == schema.SCHEMA_VERSION
    for t in TABLES:
        md = parquet_io.read_metadata(out / f"{t}.parquet")
        assert set(md) == set(schema.FILE_METADATA) | set(schema.TABLE_METADATA.get(t, {}))
    # costs only use documented metric names
    metrics = {r["metric"] for r in pq.read_table(out / "costs.parquet").to_pylist()}
    assert metrics <= set(schema.COST_METRICS)
    # re-collecting with nothing new is a fixed point: the tables read back and are rewritten unchanged
    before = {t: pq.read_table(out / f"{t}.parquet") for t in TABLES}
    collect.run("demo", [], out, modelled_context_lens=[1024, 131072])
    for t in TABLES:
        assert pq.read_table(out / f"{t}.parquet").equals(before[t]), t


def test_plots_render(out, rendered):
    pngs, html_path = rendered
    names = {p.name for p in pngs}
    assert {f"{n}.png" for n in plots.REQUIRED_PLOTS} | {"cost_vs_L_modelled.png", "frontier_prefill_ms.png",
                                                          "frontier_decode_tok_s.png",
                                                          "frontier_peak_mem_bytes.png"} <= names
    for p in pngs:
        data = p.read_bytes()
        assert len(data) > 5000 and data[:8] == b"\x89PNG\r\n\x1a\n", p.name
    html = html_path.read_text()
    for n in names:
        assert f"src='{n}'" in html
    assert "cost_vs_L_modelled.png" in html and "answer: attention" in html and BASE["point_id"] in html
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_short_labels():
    ids = ["m/int8/linear_elu/lolcats/default", "m/none/softmax/none/default"]
    assert short_labels(ids) == {ids[0]: "int8/linear_elu/lolcats", ids[1]: "none/softmax/none"}
    two_models = ids + ["n/int8/linear_elu/lolcats/default"]
    assert short_labels(two_models)[two_models[2]] == "n/int8/linear_elu/lolcats"
    assert short_labels(["odd"]) == {"odd": "odd"}
    post = "m/none/linear_elu/lolcats/int8~when=post/default"
    assert short_labels(ids + [post])[post] == "int8~when=post/linear_elu/lolcats"


def test_show_prints_frontier_and_crossover_answer(out, capsys):
    assert cli.main(["show", str(out)]) == 0
    txt = capsys.readouterr().out
    # concise: short labels, not point ids
    assert "none/linear_elu/none" in txt and LIN["point_id"] not in txt
    assert "failed int4_g32/softmax/none: RuntimeError: OOM" in txt
    # the frontier at the largest measured L per cost metric
    assert re.search(r"measured\s+cpu\s+state_bytes\s+512", txt)
    assert re.search(r"modelled\s+cpu\s+peak_mem_bytes\s+131072", txt)
    assert "dominated" in txt
    # the answer: linear attention (10.5) vs int8 softmax (10.2), matched within 10 %;
    # prefill: 5 + 0.02 L vs 1 + 1e-4 L^2 -> L* = 323.6; state: 4352 B vs 256 L B -> always
    line = next(ln for ln in txt.splitlines() if ln.startswith("answer: attention") and "prefill_ms" not in ln)
    assert "beats quantization (int8/softmax/none) at matched perplexity" in line
    assert "prefill latency from L ≈ 324" in line
    assert "state memory at every L (128..512)" in line
    assert re.search(r"attention vs quantization\s+L >= 324", txt)


def test_show_without_results(tmp_path, capsys):
    assert cli.main(["show", str(tmp_path)]) == 2


def test_wandb_report_spec_offline(out, monkeypatch, capsys):
    # the plots are test_plots_render's business: only the W&B part runs here
    monkeypatch.setattr(plots, "plot_all", lambda out_dir: [])
    monkeypatch.setattr(html, "write_html", lambda out_dir: out_dir / "report.html")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    assert cli.main(["report", str(out), "--wandb"]) == 0
    printed = capsys.readouterr().out
    assert "wandb sync" in printed and "upload_wandb_report" in printed
    spec = json.loads((out / "wandb_report.json").read_text())
    assert spec["format"] == wandb_report.WANDB_REPORT_FORMAT and spec["sweep"] == "demo"
    panels = spec["panels"]
    scatter = {(p["x"], p["y"]) for p in panels if p["type"] == "ScatterPlot"}
    assert {("weight_bytes", "ppl"), ("state_bytes@512", "ppl"), ("prefill_ms@512", "ppl"),
            ("decode_tok_s@512", "ppl"), ("peak_mem_bytes@512", "ppl")} <= scatter
    assert {p["table"] for p in panels if p["type"] == "WeavePanelSummaryTable"} == {"runs", "frontier", "crossover"}
    assert any(p["type"] == "ParallelCoordinatesPlot" and "recall" in p["title"] for p in panels)
    # runs filtered by group == sweep (and the stage)
    for p in panels:
        assert all("Metric(\"Group\") == 'demo'" in f for f in p["runset"])
    assert any("'collect'" in f for p in panels for f in p["runset"])
    # the spec re-creates the Report object (to save later, online)
    rep = wandb_report.load_wandb_report(out / "wandb_report.json", entity="someone")
    assert type(rep).__name__ == "Report" and rep.entity == "someone" and rep.title == "frontier: demo"
    grids = [b for b in rep.blocks if type(b).__name__ == "PanelGrid"]
    assert all(rs.entity == "someone" for g in grids for rs in g.runsets)
    assert sum(len(g.panels) for g in grids) == len(panels)


def test_collect_logs_tables_to_an_offline_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("FRONTIER_NO_WANDB", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out, work = tmp_path / "results" / "demo", tmp_path / "work"
    collect.run("demo", write(tmp_path, [BASE, LIN, FAIL]), out, modelled_context_lens=[],
                tracking={"mode": "offline", "project": "frontier", "entity": None}, work_dir=work)
    runs = list((work / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb")), "the offline run's .wandb file"
    tables = {p.name.split("_")[0]: p for p in (runs[0] / "files" / "media" / "table").glob("*.table.json")}
    assert set(tables) == {"runs", "frontier", "crossover"}
    t = json.loads(tables["runs"].read_text())
    assert t["columns"][:3] == ["point_id", "family", "status"] and len(t["data"]) == 3
    f = json.loads(tables["frontier"].read_text())
    assert {"on_front", "reason"} <= set(f["columns"])
