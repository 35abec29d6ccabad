import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from frontier.results import collect, html, parquet_io, plots, schema, terminal

MODEL = {"name": "tiny", "family": "llama", "layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2,
         "head_dim": 16, "intermediate": 128, "vocab": 256, "tie_embeddings": False}
HW = {"name": "cpu", "peak_flops": 1e11, "mem_bw": 1e10, "mem_bytes": 2.4e10}
QUANT = {
    "none": {"name": "none", "method": "none", "bits": 16, "group_size": None},
    "int8": {"name": "int8", "method": "int8_weight_only", "bits": 8, "group_size": None},
    "int4_g32": {"name": "int4_g32", "method": "int4_weight_only", "bits": 4, "group_size": 32},
}
ATTN = {
    "softmax": {"name": "softmax", "kind": "softmax"},
    "linear_elu": {"name": "linear_elu", "kind": "linear", "feature_dim": None},
    "sliding_window": {"name": "sliding_window", "kind": "sliding_window", "window": 128},
}
LS = (128, 256, 512)


def softmax_prefill(L):  # quadratic: 1 + 1e-4 L^2 ms
    return 1.0 + 1e-4 * L * L


def linear_prefill(L):  # linear with overhead: 5 + 0.02 L ms
    return 5.0 + 0.02 * L


# 1 + 1e-4 L^2 = 5 + 0.02 L  ->  L* = (0.02 + sqrt(0.02^2 + 4e-4 * 4)) / 2e-4
L_STAR_PREFILL = (0.02 + math.sqrt(0.02**2 + 4 * 1e-4 * 4)) / 2e-4  # ≈ 323.6


def metrics(quant, attention, ppl, recall, weight_bytes, prefill, state, status="ok", reason=None,
            overrides=None, tok_s=400.0):
    slug = attention + ("" if not overrides else "~" + ",".join(
        f"{k.split('.')[-1]}={v}" for k, v in overrides.items()))
    pid = f"tiny/{quant}/{slug}/none/default"
    m = {
        "point_id": pid, "sweep": "demo", "status": status, "reason": reason,
        "choices": {"model": "tiny", "quant": quant, "attention": attention, "finetune": "none",
                    "eval": "default"},
        "overrides": overrides or {},
        "config": {"model": MODEL, "quant": QUANT[quant], "attention": ATTN[attention],
                   "finetune": {"name": "none"}, "eval": {"name": "default", "context_lens": list(LS)},
                   "hardware": HW},
        "versions": {"torch": "2.13.0"}, "device": "cpu", "wall_s": 1.5,
    }
    if status == "ok":
        m["quality"] = {"ppl": ppl, **{f"recall_acc@{L}": a for L, a in zip(LS[:2], recall)},
                        "passkey_acc@128": recall[0]}
        m["weight_bytes"] = weight_bytes
        m["params"] = 100_000
        m["effective_bits"] = {"none": 16.0, "int8": 8.0, "int4_g32": 5.0}[quant]
        m["costs"] = [c for L in LS for c in (
            {"context_len": L, "metric": "prefill_ms", "value": prefill(L)},
            {"context_len": L, "metric": "decode_tok_s", "value": tok_s},
            {"context_len": L, "metric": "peak_mem_bytes", "value": 1e7 + state(L)},
            {"context_len": L, "metric": "state_bytes", "value": state(L)},
        )]
    return m


BASE = metrics("none", "softmax", 10.0, (1.0, 0.9), 200_000, softmax_prefill, lambda L: 256 * L)
QNT = metrics("int8", "softmax", 10.2, (1.0, 0.85), 110_000, softmax_prefill, lambda L: 256 * L)
LIN = metrics("none", "linear_elu", 10.5, (0.6, 0.3), 201_000, linear_prefill, lambda L: 4352,
              tok_s=500.0)
COMB = metrics("int8", "sliding_window", 12.0, (0.9, 0.4), 110_000, softmax_prefill,
               lambda L: 256 * min(L, 128), overrides={"attention.window": 128})
FAIL = metrics("int4_g32", "softmax", None, None, None, None, None, status="failed",
               reason="RuntimeError: OOM")


def write(tmp_path: Path, ms: list[dict]) -> list[Path]:
    paths = []
    for i, m in enumerate(ms):
        p = tmp_path / "work" / f"p{abs(hash(m['point_id']))}" / "metrics.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(m))
        paths.append(p)
    return paths


@pytest.fixture
def collected(tmp_path):
    out = tmp_path / "results" / "demo"
    paths = write(tmp_path, [BASE, QNT, LIN, COMB, FAIL])
    summary = collect.run("demo", paths, out, modelled_context_lens=[1024, 131072])
    return tmp_path, out, summary


def by_id(rows):
    return {r["point_id"]: r for r in rows}


def test_runs_table(collected):
    _, out, summary = collected
    assert summary["points"] == 5 and summary["ok"] == 4 and summary["failed"] == 1
    assert summary["families"] == ["attention", "baseline", "combined", "quantization"]
    t = pq.read_table(out / "runs.parquet")
    rows = by_id(t.to_pylist())
    assert len(rows) == 5
    cols = set(t.column_names)
    assert {"sweep", "point_id", "model", "quant", "attention", "finetune", "eval", "family",
            "status", "reason", "weight_bytes", "params", "effective_bits", "versions", "wall_s",
            "ppl", "recall_acc@128", "recall_acc@256", "ovr.attention.window",
            "cfg.model.hidden", "cfg.attention.kind", "cfg.quant.bits", "cfg.hardware.name"} <= cols
    assert str(t.schema.field("ppl").type) == "double"
    assert str(t.schema.field("recall_acc@128").type) == "double"
    assert str(t.schema.field("weight_bytes").type) == "int64"
    b = rows[BASE["point_id"]]
    assert b["family"] == "baseline" and b["ppl"] == 10.0 and b["weight_bytes"] == 200_000
    assert b["recall_acc@256"] == 0.9 and b["cfg.model.hidden"] == "64"
    assert json.loads(b["versions"]) == {"torch": "2.13.0"}
    assert rows[QNT["point_id"]]["family"] == "quantization"
    assert rows[LIN["point_id"]]["family"] == "attention"
    c = rows[COMB["point_id"]]
    assert c["family"] == "combined" and c["ovr.attention.window"] == "128"
    assert b["ovr.attention.window"] is None
    f = rows[FAIL["point_id"]]
    assert f["status"] == "failed" and f["reason"] == "RuntimeError: OOM" and f["ppl"] is None


def test_metadata_and_atomic(collected):
    _, out, _ = collected
    for name in ("runs", "costs", "frontier", "crossover"):
        md = parquet_io.read_metadata(out / f"{name}.parquet")
        assert md["sweep"] == "demo" and md["schema_version"] == schema.SCHEMA_VERSION
        assert "pyarrow" in json.loads(md["versions"])
        assert md["git_commit"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_costs_table(collected):
    _, out, _ = collected
    rows = pq.read_table(out / "costs.parquet").to_pylist()
    meas = [r for r in rows if r["source"] == "measured"]
    assert len(meas) == 4 * 3 * 4  # 4 ok points x 3 L x 4 metrics; failed point has none
    assert {r["hardware"] for r in meas} == {"cpu"}
    mod = [r for r in rows if r["source"] == "modelled"]
    assert {r["metric"] for r in mod} == {"prefill_s", "decode_s", "decode_tok_s", "state_bytes",
                                          "weight_bytes", "peak_mem_bytes"}
    assert {r["context_len"] for r in mod} == {128, 256, 512, 1024, 131072}
    assert {r["point_id"] for r in mod} == {BASE["point_id"], QNT["point_id"], LIN["point_id"],
                                            COMB["point_id"]}
    st = {(r["point_id"], r["context_len"]): r["value"] for r in mod if r["metric"] == "state_bytes"}
    # softmax KV: 2 * layers 2 * kv_heads 2 * head_dim 16 * L * 2 bytes = 256 L
    assert st[(BASE["point_id"], 131072)] == 256 * 131072
    # linear: layers 2 * kv_heads 2 * (16*16 + 16) * 4 bytes, constant
    assert st[(LIN["point_id"], 128)] == st[(LIN["point_id"], 131072)] == 4352
    dec = {(r["point_id"], r["context_len"], r["metric"]): r["value"] for r in mod}
    assert dec[(BASE["point_id"], 1024, "decode_tok_s")] == pytest.approx(
        1 / dec[(BASE["point_id"], 1024, "decode_s")])
    # modelled peak memory: weights + state (a lower bound, activations not modelled)
    assert dec[(LIN["point_id"], 1024, "peak_mem_bytes")] == (
        dec[(LIN["point_id"], 1024, "weight_bytes")] + dec[(LIN["point_id"], 1024, "state_bytes")])


def test_frontier_table(collected):
    _, out, _ = collected
    rows = pq.read_table(out / "frontier.parquet").to_pylist()

    def group(metric, L, q, source="measured"):
        return {r["point_id"]: r for r in rows if r["cost_metric"] == metric and r["context_len"] == L
                and r["quality_metric"] == q and r["source"] == source}

    def front(metric, L, q, source="measured"):
        return sorted(pid for pid, r in group(metric, L, q, source).items() if r["on_front"])

    # weight bytes: int8 (cheap, 10.2) and baseline (10.0); linear and combined dominated
    assert front("weight_bytes", None, "ppl") == sorted([QNT["point_id"], BASE["point_id"]])
    # state bytes at 512: linear (4352 B, 10.5) and baseline (10.0); quant ties baseline's
    # state but is worse; combined is dominated by linear
    assert front("state_bytes", 512, "ppl") == sorted([LIN["point_id"], BASE["point_id"]])
    # decode tok/s higher is better: linear (500) and baseline (400, best ppl)
    assert front("decode_tok_s", 128, "ppl") == sorted([LIN["point_id"], BASE["point_id"]])
    # recall at the matching L only
    assert front("state_bytes", 128, "recall_acc@128")
    assert not front("state_bytes", 512, "recall_acc@128")
    assert not front("state_bytes", 128, "recall_acc@256")
    # modelled frontiers per hardware
    assert front("state_bytes", 131072, "ppl", "modelled")
    # every point is kept with the reason it is off the front; labelled with its family
    g = group("state_bytes", 512, "ppl")
    assert set(g) == {m["point_id"] for m in (BASE, QNT, LIN, COMB, FAIL)}
    assert g[COMB["point_id"]]["reason"] == f"dominated by {LIN['point_id']}"
    assert g[QNT["point_id"]]["reason"] == f"dominated by {BASE['point_id']}"
    assert g[FAIL["point_id"]]["reason"] == "failed: RuntimeError: OOM" and g[FAIL["point_id"]]["cost"] is None
    assert g[BASE["point_id"]]["reason"] is None and g[BASE["point_id"]]["family"] == "baseline"
    assert g[FAIL["point_id"]]["family"] == "quantization"
    assert all((r["reason"] is None) == r["on_front"] for r in rows)
    # every cost metric, measured and modelled, has a frontier
    assert {(r["source"], r["cost_metric"]) for r in rows} == {
        ("measured", m) for m in ("weight_bytes", "prefill_ms", "decode_tok_s", "peak_mem_bytes", "state_bytes")
    } | {("modelled", m) for m in ("prefill_s", "decode_tok_s", "peak_mem_bytes", "state_bytes")}
    txt = terminal.frontier_table(out)
    assert "state_bytes" in txt and BASE["point_id"] in txt


def test_crossover_table(collected):
    _, out, _ = collected
    rows = pq.read_table(out / "crossover.parquet").to_pylist()
    fam = [r for r in rows if r["level"] == "family" and r["source"] == "measured"]
    pre = [r for r in fam if r["metric"] == "prefill_ms" and {r["family_a"], r["family_b"]} == {"attention", "baseline"}]
    assert len(pre) == 1
    # linear attention overtakes softmax at L* ≈ 323.6 (exact quadratic data)
    assert pre[0]["point_a"] == LIN["point_id"] and pre[0]["point_b"] == BASE["point_id"]
    assert pre[0]["l_star"] == pytest.approx(L_STAR_PREFILL, rel=1e-6)
    assert pre[0]["quality_gap"] == pytest.approx(10.5 / 10.0 - 1)
    # state bytes: linear already smaller at L=128 -> softmax never overtakes in range
    st = [r for r in fam if r["metric"] == "state_bytes" and {r["family_a"], r["family_b"]} == {"attention", "baseline"}]
    assert st[0]["point_a"] == BASE["point_id"] and st[0]["l_star"] is None
    # point level: only matched pairs (combined at ppl 12 is >10% off every other point)
    pts = [r for r in rows if r["level"] == "point"]
    assert pts and all(r["matched"] for r in pts)
    assert all(COMB["point_id"] not in (r["point_a"], r["point_b"]) for r in pts)
    assert all(FAIL["point_id"] not in (r["point_a"], r["point_b"]) for r in rows)
    # modelled rows exist for the point's hardware
    mod = [r for r in rows if r["source"] == "modelled"]
    assert {r["hardware"] for r in mod} == {"cpu"}
    assert {r["metric"] for r in mod} == {"prefill_s", "decode_s", "state_bytes", "peak_mem_bytes"}
    # modelled state bytes: softmax overtakes nothing; linear vs softmax crossover is below 128
    txt = terminal.crossover_table(out)
    assert "L*" in txt and "prefill_ms" in txt


def test_merge_keeps_rows(collected):
    tmp_path, out, _ = collected
    qnt2 = {**QNT, "quality": {**QNT["quality"], "ppl": 10.1}}
    new = metrics("int4_g32", "linear_elu", 10.9, (0.5, 0.2), 70_000, linear_prefill, lambda L: 4352)
    new["point_id"] = "tiny/int4_g32/linear_elu/none/default"
    paths = write(tmp_path / "second", [qnt2, LIN, COMB, FAIL, new])  # BASE's file is gone
    h100 = {"name": "h100", "peak_flops": 9.89e14, "mem_bw": 3.35e12, "mem_bytes": 8.0e10}
    summary = collect.run("demo", paths, out, hardware_cfgs=[h100], modelled_context_lens=[])
    assert summary["points"] == 6 and summary["kept"] == 1 and summary["new_or_updated"] == 5
    rows = by_id(pq.read_table(out / "runs.parquet").to_pylist())
    assert set(rows) == {m["point_id"] for m in (BASE, QNT, LIN, COMB, FAIL, new)}
    assert rows[BASE["point_id"]]["ppl"] == 10.0  # kept
    assert rows[QNT["point_id"]]["ppl"] == 10.1  # replaced
    assert rows[new["point_id"]]["family"] == "combined"
    costs = pq.read_table(out / "costs.parquet").to_pylist()
    meas = [c for c in costs if c["source"] == "measured"]
    assert len([c for c in meas if c["point_id"] == BASE["point_id"]]) == 12  # kept point's costs
    assert len(meas) == 5 * 12
    # modelled costs recomputed for all ok points (kept included) on the new hardware only
    mod = [c for c in costs if c["source"] == "modelled"]
    assert {c["hardware"] for c in mod} == {"h100"}
    assert {c["context_len"] for c in mod} == set(LS)
    assert BASE["point_id"] in {c["point_id"] for c in mod}
    # no duplicated rows
    keys = [(c["point_id"], c["context_len"], c["metric"], c["source"], c["hardware"]) for c in costs]
    assert len(keys) == len(set(keys))


# plots, report.html and the W&B report spec: tests/test_report.py


def test_report_robust_without_recall_or_costs(tmp_path):
    m = {k: v for k, v in BASE.items() if k != "costs"}
    m["quality"] = {"ppl": 10.0}
    out = tmp_path / "r"
    broken = tmp_path / "broken" / "metrics.json"
    broken.parent.mkdir()
    broken.write_text("{not json")
    summary = collect.run("x", write(tmp_path, [m, FAIL]) + [broken], out, modelled_context_lens=[])
    assert summary["points"] == 2 and any("broken" in w for w in summary["warnings"])
    pngs = {p.name for p in plots.plot_all(out)}
    # the Snakemake rule declares these four: always written (placeholders without data)
    assert {f"{n}.png" for n in plots.REQUIRED_PLOTS} == pngs
    assert all((out / n).stat().st_size > 0 for n in pngs)
    assert (out / "report.html").exists() is False
    assert html.write_html(out).exists()
    assert pq.read_table(out / "crossover.parquet").num_rows == 0


def test_run_row_carries_hybrid_layer_choice_and_diagnostics():
    import json as _json

    from frontier.results.runs import run_row

    diag = {"entropy": [0.6, 0.7], "sink_mass": [0.1, 0.05], "massive": [5.0, 9.0], "score": [0.3, 0.6],
            "keep_softmax": [1]}
    m = {"point_id": "tiny/none/hybrid/none/default", "choices": {"attention": "hybrid"}, "config": {},
         "attention_layers": {"keep_softmax": [1], "diagnostics": diag}, "quality": {"ppl": 50.0}}
    row = run_row(m, "s")
    assert _json.loads(row["attn.keep_softmax"]) == [1]
    assert _json.loads(row["attn.entropy"]) == [0.6, 0.7] and _json.loads(row["attn.score"]) == [0.3, 0.6]
    assert "attn.entropy" not in run_row({**m, "attention_layers": {"keep_softmax": [], "diagnostics": None}}, "s") or \
        run_row({**m, "attention_layers": {"keep_softmax": [], "diagnostics": None}}, "s")["attn.entropy"] is None
    assert not any(k.startswith("attn.") for k in run_row({**m, "attention_layers": None}, "s"))


def test_merge_survives_snakemake_deleting_the_outputs(collected):
    """Snakemake removes a rule's outputs before it reruns it: collect still merges, from the
    metrics files listed in its ledger (not an output), dropping points whose file is gone."""
    tmp_path, out, _ = collected
    for f in out.glob("*.parquet"):
        f.unlink()
    new = metrics("int4_g32", "linear_elu", 10.9, (0.5, 0.2), 70_000, linear_prefill, lambda L: 4352)
    new["point_id"] = "tiny/int4_g32/linear_elu/none/default"
    gone = write(tmp_path, [FAIL])[0]
    gone.unlink()
    summary = collect.run("demo", write(tmp_path / "second", [new]), out, modelled_context_lens=[])
    rows = by_id(pq.read_table(out / "runs.parquet").to_pylist())
    assert set(rows) == {m["point_id"] for m in (BASE, QNT, LIN, COMB, new)}
    assert summary["kept"] == 4 and summary["new_or_updated"] == 1
    meas = [c for c in pq.read_table(out / "costs.parquet").to_pylist() if c["source"] == "measured"]
    assert {c["point_id"] for c in meas} == {m["point_id"] for m in (BASE, QNT, LIN, COMB, new)}


def kv_point(bits: int, ppl: float) -> dict:
    """A softmax point of BASE's model with a `bits`-bit KV cache (family kv_quant): its state
    shrinks by ~16/bits, its prefill is BASE's."""
    m = metrics("none", "softmax", ppl, (1.0, 0.8), 200_000, softmax_prefill, lambda L: 256 * L * bits // 16,
                overrides={"quant.kv_bits": bits})
    m["config"]["quant"] = {**QUANT["none"], "kv_bits": bits, "kv_group": 32, "kv_residual": 32}
    return m


def test_crossover_against_kv_bits(tmp_path):
    """Level kv_bits: the best linear / hybrid point against the best kv_quant point of each bit
    width, matched or not (the family level keeps only the best kv_quant point)."""
    kv2, kv4 = kv_point(2, 11.4), kv_point(4, 10.1)
    hyb = metrics("none", "linear_elu", 10.3, (0.9, 0.7), 201_000, lambda L: 3.0 + 0.01 * L + 2e-5 * L * L,
                  lambda L: 4352 + 64 * L, overrides={"attention.keep_softmax": "[0]"})
    hyb["attention_layers"] = {"keep_softmax": [0]}
    hyb["config"]["attention"] = {**ATTN["linear_elu"], "keep_softmax": [0]}
    out = tmp_path / "results" / "kv"
    collect.run("kv", write(tmp_path, [BASE, LIN, kv2, kv4, hyb]), out, modelled_context_lens=[])
    rows = pq.read_table(out / "crossover.parquet").to_pylist()
    kv = [r for r in rows if r["level"] == "kv_bits" and r["source"] == "measured" and r["metric"] == "prefill_ms"]
    pairs = {(frozenset((r["point_a"], r["point_b"])), r["kv_bits"]) for r in kv}
    assert pairs == {(frozenset((a["point_id"], k["point_id"])), b)
                     for a in (LIN, hyb) for k, b in ((kv2, 2), (kv4, 4))}
    lin2 = next(r for r in kv if r["kv_bits"] == 2 and LIN["point_id"] in (r["point_a"], r["point_b"]))
    # the linear point overtakes the softmax 2-bit cache's quadratic prefill at the same L* as BASE's
    assert lin2["point_a"] == LIN["point_id"] and lin2["l_star"] == pytest.approx(L_STAR_PREFILL, rel=1e-6)
    assert lin2["matched"] is True and lin2["family_b"] == "kv_quant"
    lin4 = next(r for r in kv if r["kv_bits"] == 4 and LIN["point_id"] in (r["point_a"], r["point_b"]))
    assert lin4["matched"] is True
    hyb2 = next(r for r in kv if r["kv_bits"] == 2 and hyb["point_id"] in (r["point_a"], r["point_b"]))
    assert hyb2["matched"] is False and hyb2["quality_gap"] is not None  # 11.4 / 10.3: 10.7 % apart
    assert all(r["kv_bits"] is None for r in rows if r["level"] != "kv_bits")
    # the 2-bit state is 1/8 of BASE's: 32 L bytes, below the linear state's 4352 until L = 136
    st = next(r for r in rows if r["level"] == "kv_bits" and r["source"] == "measured" and r["metric"] == "state_bytes"
              and r["kv_bits"] == 2 and LIN["point_id"] in (r["point_a"], r["point_b"]))
    assert st["point_a"] == LIN["point_id"] and 128 < st["l_star"] < 256
    txt = terminal.show_text(out)
    assert "crossover level kv_bits" in txt
    assert "linear (" in txt and "hybrid (" in txt and "vs 2-bit KV" in txt and "vs 4-bit KV" in txt
    assert "[NOT matched, ppl gap -9.6%]" in txt and "[matched, ppl gap -7.9%]" in txt
