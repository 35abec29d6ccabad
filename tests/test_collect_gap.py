"""runs.parquet `gap_closed`: the fraction of the perplexity gap to softmax that fine-tuning closed,
from hand-made metrics.json files (no model runs)."""
import json
import math
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from frontier.results import collect, parquet_io, runs as results_runs

QUANT = {"none": {"name": "none", "method": "none", "bits": 16, "group_size": None},
         "int8": {"name": "int8", "method": "rtn", "bits": 8, "group_size": None},
         "int4_g32": {"name": "int4_g32", "method": "rtn", "bits": 4, "group_size": 32}}
ATTN = {"softmax": {"name": "softmax", "kind": "softmax"},
        "linear_elu": {"name": "linear_elu", "kind": "linear", "learned_map": True},
        "sliding_window": {"name": "sliding_window", "kind": "sliding_window", "window": 128}}
FT_METHOD = {"none": "none", "lolcats": "lolcats", "lora": "lora", "transfer": "transfer", "full": "full"}


def point(quant: str, attention: str, finetune: str, ppl, *, eval_: str = "default", status: str = "ok",
          attn_slug: str = "") -> dict:
    pid = f"tiny/{quant}/{attention}{attn_slug}/{finetune}/{eval_}"
    m = {"point_id": pid, "sweep": "gap", "status": status,
         "reason": None if status == "ok" else "RuntimeError: boom",
         "choices": {"model": "tiny", "quant": quant, "attention": attention, "finetune": finetune, "eval": eval_},
         "config": {"quant": QUANT[quant], "attention": ATTN[attention],
                    "finetune": {"name": finetune, "method": FT_METHOD[finetune]}, "eval": {"name": eval_}},
         "device": "cpu", "wall_s": 1.0}
    if status == "ok":
        m["quality"] = {"ppl": ppl, "recall_acc@128": 0.5}
    return m


def collect_rows(tmp_path: Path, ms: list[dict], out: Path | None = None) -> dict:
    paths = []
    for m in ms:
        p = tmp_path / "work" / uuid.uuid4().hex / "metrics.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(m))
        paths.append(p)
    out = out or tmp_path / "results"
    collect.run("gap", paths, out, modelled_context_lens=[])
    t = pq.read_table(out / "runs.parquet")
    assert str(t.schema.field("gap_closed").type) == "double"
    return {r["point_id"]: r for r in t.to_pylist()}


SOFTMAX = point("none", "softmax", "none", 10.0)
LINEAR = point("none", "linear_elu", "none", 14.0)


def test_gap_closed_fractions(tmp_path):
    ms = [
        SOFTMAX, LINEAR,
        point("none", "linear_elu", "lolcats", 11.0),      # (14 - 11) / (14 - 10) = 0.75
        point("none", "linear_elu", "transfer", 13.0),     # 0.25
        point("none", "linear_elu", "full", 9.0),          # better than softmax: 1.25
        point("int8", "softmax", "none", 10.5),
        point("int8", "linear_elu", "none", 15.5),
        point("int8", "linear_elu", "lora", 16.5),         # worse than untuned: -0.2
        point("int8", "linear_elu", "lolcats", 15.5),      # nothing recovered: 0
        # sliding window with a value override: matched on the whole attention component
        point("none", "sliding_window", "none", 12.0, attn_slug="~window=128"),
        point("none", "sliding_window", "lora", 11.0, attn_slug="~window=128"),   # 0.5
    ]
    rows = collect_rows(tmp_path, ms)
    g = {pid: r["gap_closed"] for pid, r in rows.items()}
    assert g["tiny/none/linear_elu/lolcats/default"] == pytest.approx(0.75)
    assert g["tiny/none/linear_elu/transfer/default"] == pytest.approx(0.25)
    assert g["tiny/none/linear_elu/full/default"] == pytest.approx(1.25)
    assert g["tiny/int8/linear_elu/lora/default"] == pytest.approx(-0.2)
    assert g["tiny/int8/linear_elu/lolcats/default"] == pytest.approx(0.0)
    assert g["tiny/none/sliding_window~window=128/lora/default"] == pytest.approx(0.5)
    # points that are not fine-tuned have no gap_closed
    for pid in (SOFTMAX["point_id"], LINEAR["point_id"], "tiny/int8/softmax/none/default",
                "tiny/none/sliding_window~window=128/none/default"):
        assert g[pid] is None, pid
    # it is not a quality metric: no frontier is built on it
    meta = parquet_io.read_metadata(tmp_path / "results" / "runs.parquet")
    assert "gap_closed" not in meta["quality_columns"] and "ppl" in meta["quality_columns"]
    fr = pq.read_table(tmp_path / "results" / "frontier.parquet").to_pylist()
    assert all(r["quality_metric"] != "gap_closed" for r in fr)


def test_gap_closed_null_without_references_or_gap(tmp_path):
    ms = [
        SOFTMAX, LINEAR,
        point("none", "softmax", "lora", 9.5),                 # gap softmax - softmax = 0
        point("none", "linear_elu", "lolcats", 12.0, eval_="quick"),  # references only for eval=default
        point("int4_g32", "linear_elu", "none", 20.0),         # no int4 softmax reference
        point("int4_g32", "linear_elu", "lolcats", 18.0),
        point("int8", "softmax", "none", 10.0),
        point("int8", "linear_elu", "none", None, status="failed"),   # failed untuned reference
        point("int8", "linear_elu", "lolcats", 11.0),
        point("none", "linear_elu", "lora", None, status="failed"),   # the tuned point failed
        point("none", "sliding_window", "none", 10.000001),   # gap ~0 (below GAP_REL_EPS)
        point("none", "sliding_window", "lolcats", 10.0),
    ]
    rows = collect_rows(tmp_path, ms)
    for pid in ("tiny/none/softmax/lora/default", "tiny/none/linear_elu/lolcats/quick",
                "tiny/int4_g32/linear_elu/lolcats/default", "tiny/int8/linear_elu/lolcats/default",
                "tiny/none/linear_elu/lora/default", "tiny/none/sliding_window/lolcats/default"):
        assert rows[pid]["gap_closed"] is None, pid
    assert rows["tiny/none/linear_elu/lora/default"]["status"] == "failed"


def test_gap_closed_recomputed_when_a_reference_arrives_later(tmp_path):
    out = tmp_path / "results"
    rows = collect_rows(tmp_path, [LINEAR, point("none", "linear_elu", "lolcats", 12.0)], out)
    assert rows["tiny/none/linear_elu/lolcats/default"]["gap_closed"] is None  # no softmax point yet
    rows = collect_rows(tmp_path, [SOFTMAX], out)  # merged with what runs.parquet holds
    assert rows["tiny/none/linear_elu/lolcats/default"]["gap_closed"] == pytest.approx(0.5)


def test_gap_closed_function_directly():
    runs = [
        {"point_id": "m/q/softmax/none/e", "status": "ok", "ppl": 8.0},
        {"point_id": "m/q/lin/none/e", "status": "ok", "ppl": 10.0},
        {"point_id": "m/q/lin/lolcats/e", "status": "ok", "ppl": 9.0},
        {"point_id": "odd-id", "status": "ok", "ppl": 9.0},
    ]
    g = results_runs.gap_closed(runs)
    assert g == {"m/q/softmax/none/e": None, "m/q/lin/none/e": None, "m/q/lin/lolcats/e": pytest.approx(0.5),
                 "odd-id": None}
    # a finetune option named otherwise but with method none (from the flattened config) is untuned
    runs[1] = {**runs[1], "point_id": "m/q/lin/plain/e", "cfg.finetune.method": "none"}
    assert results_runs.gap_closed(runs)["m/q/lin/lolcats/e"] == pytest.approx(0.5)


def test_gap_closed_of_quant_post_points_uses_post_references():
    """quant.when=post ids (<model>/none/<attention>/<finetune>/<quant>~when=post/<eval>): the
    references are the post-quantized untuned and softmax points, not the pre ones."""
    runs = [
        {"point_id": "m/none/softmax/none/q~when=post/e", "status": "ok", "ppl": 8.0},
        {"point_id": "m/none/lin/none/q~when=post/e", "status": "ok", "ppl": 12.0},
        {"point_id": "m/none/lin/lolcats/q~when=post/e", "status": "ok", "ppl": 9.0},
        {"point_id": "m/q/lin/none/e", "status": "ok", "ppl": 10.0},  # pre: not a reference of post
    ]
    assert results_runs.point_parts(runs[2]["point_id"]) == ("m", "q~when=post", "lin", "lolcats", "e")
    assert results_runs.gap_closed(runs)["m/none/lin/lolcats/q~when=post/e"] == pytest.approx(0.75)


def test_gap_closed_matches_the_perplexity_protocol_and_reports_nats(tmp_path):
    """A fine-tuned point evaluated under another eval option (a different recall ladder) with the
    same eval.ppl and KV cache takes the references of that protocol; another ppl protocol does
    not. gap_closed_nats is the same fraction in log-perplexity."""
    ppl = {"seq_len": 1024, "stride": 512, "max_tokens": 8192}

    def pt(attention, finetune, value, eval_, ppl_cfg=ppl, kv_bits=16):
        m = point("none", attention, finetune, value, eval_=eval_ + ("" if kv_bits == 16 else f"~kv_bits={kv_bits}"))
        m["config"]["eval"] = {"name": eval_, "ppl": ppl_cfg}
        m["config"]["quant"] = {**QUANT["none"], "kv_bits": kv_bits}
        return m

    ms = [pt("softmax", "none", 6.0, "long"), pt("linear_elu", "none", 240.0, "short"),
          pt("linear_elu", "lolcats", 24.0, "long"),                      # softmax: long, untuned: short
          pt("linear_elu", "lolcats", 20.0, "longer", {**ppl, "max_tokens": 4096}),   # no reference
          pt("linear_elu", "lolcats", 20.0, "long", kv_bits=2)]           # a 2-bit cache: no reference
    rows = collect_rows(tmp_path, ms)
    r = rows["tiny/none/linear_elu/lolcats/long"]
    assert r["gap_closed"] == pytest.approx((240 - 24) / (240 - 6))                  # 0.923
    assert r["gap_closed_nats"] == pytest.approx(math.log(240 / 24) / math.log(240 / 6))   # 0.624
    assert rows["tiny/none/linear_elu/lolcats/longer"]["gap_closed"] is None
    assert rows["tiny/none/linear_elu/lolcats/long~kv_bits=2"]["gap_closed_nats"] is None
