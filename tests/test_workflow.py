"""The real Snakemake DAG on sweep=ci, end to end through collect."""
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import snakemake


@pytest.mark.slow
def test_dry_run_lists_the_dag(tmp_path):
    r = snakemake(tmp_path, "-n", "--config", "sweep=ci")
    out = r.stdout + r.stderr
    for rule in ("base", "quantize", "surgery", "finetune", "evaluate", "collect"):
        assert f"rule {rule}:" in out or f"\n{rule} " in out, rule
    assert not (tmp_path / "work").exists()  # planning writes nothing


@pytest.mark.slow
def test_lint_is_clean(tmp_path):
    r = snakemake(tmp_path, "--lint", "--config", "sweep=ci", check=False)
    assert "Congratulations, your workflow is in a good condition" in r.stdout + r.stderr, r.stdout[-3000:]


@pytest.mark.slow
def test_bad_override_fails_before_any_job(tmp_path):
    r = snakemake(tmp_path, "--cores", "1", "--config", "sweep=ci", "overrides=attention.windw=3", check=False)
    assert r.returncode != 0
    assert "attention.windw" in r.stderr
    assert not (tmp_path / "work").exists() and not (tmp_path / "results").exists()


@pytest.mark.slow
def test_ci_sweep_end_to_end(ci_sweep):
    wd = ci_sweep
    res = wd / "results" / "ci"
    runs = pq.read_table(res / "runs.parquet").to_pylist()
    assert len(runs) == 5
    by = {(r["quant"], r["attention"], r["finetune"]): r for r in runs}
    assert all(r["status"] == "ok" for r in runs), [(r["point_id"], r["reason"]) for r in runs]
    for r in runs:
        assert r["ppl"] > 1 and r["weight_bytes"] > 0
    # physics: int8 weights are smaller than unquantized ones
    assert by[("int8", "softmax", "none")]["weight_bytes"] < by[("none", "softmax", "none")]["weight_bytes"]
    assert {r["family"] for r in runs} == {"baseline", "quantization", "attention", "combined"}
    costs = pq.read_table(res / "costs.parquet").to_pylist()
    state = {}
    for c in costs:
        if c["metric"] == "state_bytes" and c["source"] == "measured":
            state.setdefault(c["point_id"], {})[c["context_len"]] = c["value"]
    soft = state[by[("none", "softmax", "none")]["point_id"]]
    lin = state[by[("none", "linear_elu", "none")]["point_id"]]
    assert soft[256] > soft[128] > soft[64]          # KV cache grows with L
    assert lin[256] == lin[128] == lin[64]           # recurrent state does not
    assert {"measured", "modelled"} <= {c["source"] for c in costs}
    front = pq.read_table(res / "frontier.parquet")
    assert front.num_rows > 0 and {"cost_metric", "context_len", "quality_metric", "point_id"} <= set(front.column_names)
    assert (res / "report.html").exists() and (res / "frontier_weight_bytes.png").stat().st_size > 1000
    ft = json.loads(next((wd / "work").rglob("lolcats*/_ckpt/manifest.json")).read_text())
    assert ft["stage"] == "finetune"
    assert list((wd / "work" / "wandb").glob("offline-run-*")), "stages log offline W&B runs"
    # each point links its own evaluate run (offline: the run folder that `wandb sync` uploads)
    links = [r["wandb_url"] for r in runs]
    assert all(u and u.startswith("file://") and Path(u[7:]).name.startswith("offline-run-") for u in links), links
    assert len(set(links)) == len(links) and all(Path(u[7:]).is_dir() for u in links)


@pytest.mark.slow
def test_rerun_does_no_work(ci_sweep):
    wd = ci_sweep
    r = snakemake(wd, "-n", "--config", "sweep=ci")
    assert "Nothing to be done" in r.stdout + r.stderr
