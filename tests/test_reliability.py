"""Nothing lost under kills; no secrets in any output."""
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import FAKE_WANDB_KEY, ROOT, SNAKEMAKE, snakemake
from frontier import checkpoint

DETERMINISTIC = ("point_id", "status", "weight_bytes", "params", "effective_bits", "family")


def _rows(wd: Path) -> dict:
    rows = pq.read_table(wd / "results" / "ci" / "runs.parquet").to_pylist()
    return {r["point_id"]: r for r in rows}


def _assert_nothing_half_written(wd: Path) -> None:
    work = wd / "work"
    if not work.exists():
        return
    for ckpt in work.rglob("_ckpt"):
        if any(ckpt.iterdir()):  # Snakemake may pre-create the empty output folder
            checkpoint.read_manifest(ckpt)  # complete and verified, or empty — never half
    for m in work.rglob("metrics.json"):
        assert json.loads(m.read_text())["status"] in ("ok", "failed")


@pytest.mark.slow
def test_secrets_never_written(ci_sweep):
    offline_runs = list((ci_sweep / "work" / "wandb").glob("offline-run-*"))
    assert offline_runs, "the sweep must have produced W&B runs for the scan to mean anything"
    needle = FAKE_WANDB_KEY.encode()
    scanned = 0
    for p in ci_sweep.rglob("*"):
        if p.is_file():
            scanned += 1
            assert needle not in p.read_bytes(), f"secret found in {p}"
    assert scanned > 50


@pytest.mark.slow
def test_killed_sweep_reruns_to_the_same_results(ci_sweep, tmp_path):
    rng = random.Random(7)
    env = {**os.environ, "WANDB_MODE": "offline", "FRONTIER_NO_WANDB": "1"}
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen([*SNAKEMAKE, "--directory", str(tmp_path), "--cores", "2", "--config", "sweep=ci",
                                 "--rerun-incomplete"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        delay = rng.uniform(4, 40)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole job tree, like a lost node
            proc.wait()
            kills += 1
        time.sleep(0.5)
        _assert_nothing_half_written(tmp_path)
        snakemake(tmp_path, "--unlock", "--config", "sweep=ci")
    assert kills >= 1
    snakemake(tmp_path, "--cores", "2", "--config", "sweep=ci", "--rerun-incomplete")
    killed, clean = _rows(tmp_path), _rows(ci_sweep)
    assert set(killed) == set(clean)
    for pid, row in clean.items():
        for col in DETERMINISTIC:
            assert killed[pid][col] == row[col], (pid, col)
        assert killed[pid]["ppl"] == pytest.approx(row["ppl"], rel=1e-5), pid


def test_failed_stage_is_recorded_and_propagates(micro_base, tmp_path):
    """A stage that raises (here: surgery with an unsupported option) writes a failed manifest;
    children refuse to load it and evaluation records the point as failed with the reason."""
    from frontier import config, evaluate, runtime, surgery

    out = tmp_path / "bad" / "_ckpt"
    bad = {"attention": {"name": "nope", "kind": "mystery"}}
    with runtime.failure_recorded("surgery", out, bad, micro_base):
        surgery.run(bad, micro_base, out)
    m = checkpoint.read_manifest(out)
    assert m["status"] == "failed" and ("mystery" in m["reason"] or "kind" in m["reason"])
    with pytest.raises(checkpoint.StageFailed, match="surgery stage failed"):
        checkpoint.load_point(out)
    cfg = config.compose((("model", "micro"), ("eval", "quick")))
    cfg.pop("sweep")
    metrics = tmp_path / "m.json"
    evaluate.run(out, cfg, point_id="micro/none/nope/none/quick", sweep="t", choices={}, overrides={},
                 out_path=metrics, progress=False)
    rec = json.loads(metrics.read_text())
    assert rec["status"] == "failed" and "surgery stage failed" in rec["reason"]


def test_interrupts_are_not_recorded_as_failures(tmp_path):
    from frontier import runtime

    out = tmp_path / "k" / "_ckpt"
    with pytest.raises(KeyboardInterrupt):
        with runtime.failure_recorded("base", out, {}, None):
            raise KeyboardInterrupt
    assert not out.exists()
