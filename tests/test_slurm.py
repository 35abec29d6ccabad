"""The ci sweep through Slurm: the native slurm executor profile and the cluster-generic profile.

Needs a Slurm cluster with accounting (sacct): CI starts a one-node one with two fake GPUs
(`tests/slurm/local-cluster.sh start`, called by .ci/run). Skipped only when `sinfo` is not
installed; a cluster that is installed but not answering is a failure, not a skip.

Each profile runs the whole ci sweep (11 jobs) in its own temporary directory; the finetune job
of the slurm-profile run asks for GPUs (`resources.stages.finetune.gpus=1` → `--gpus-per-node=2`
on the fake GPUs), so a wrong GPU request (e.g. an unsatisfiable `--ntasks-per-gpu`) would show.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
# the ci sweep's jobs per rule (11 Slurm jobs; a retried job adds a failed record, see `retries:`)
EXPECTED = {"base": 1, "quantize": 1, "surgery": 2, "finetune": 1, "evaluate": 5, "collect": 1}
N_JOBS = sum(EXPECTED.values())
RUN_TIMEOUT_S = 600     # one profile's sweep: ~3 min on 2 idle cores, ~6.5 min on a busy machine

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("sinfo") is None,
                       reason="Slurm is not installed (no sinfo); CI starts a local cluster with "
                              "tests/slurm/local-cluster.sh start"),
]


@pytest.fixture(scope="module")
def cluster():
    r = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=30)
    states = r.stdout.split()
    if r.returncode != 0 or not any(s in ("idle", "mixed", "allocated") for s in states):
        pytest.fail(f"sinfo is installed but no node is up (rc={r.returncode}, states={states}, {r.stderr.strip()}); "
                    "start the test cluster: tests/slurm/local-cluster.sh start")
    r = subprocess.run(["sacct", "-n", "-X", "-S", "now-1minutes"], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.fail(f"sacct does not answer (no slurmdbd?): {r.stderr.strip()}")


def _scancel(ids):
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30)


def run_profile(workdir: Path, profile: str, *extra: str, overrides: str = "") -> tuple[subprocess.CompletedProcess, list[str], float]:
    """Run the ci sweep with a profile; return (result, Slurm job ids, wall seconds)."""
    config = ["sweep=ci", *([f"overrides={overrides}"] if overrides else [])]
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
           "--profile", str(ROOT / "profiles" / profile), *extra, "--config", *config]
    env = {**os.environ, "WANDB_MODE": "offline", "FRONTIER_NO_WANDB": "1"}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)      # a hung Snakemake ignores SIGTERM; SIGINT cancels its jobs
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        ids = slurm_ids(out)
        _scancel(ids)
        pytest.fail(f"snakemake --profile {profile} did not finish in {RUN_TIMEOUT_S} s:\n{out[-6000:]}")
    wall = time.monotonic() - t0
    r = subprocess.CompletedProcess(cmd, proc.returncode, out, "")
    return r, slurm_ids(out), wall


def slurm_ids(log: str) -> list[str]:
    """Slurm job ids from Snakemake's log (slurm: 'submitted with SLURM jobid N'; generic: "external jobid 'N'")."""
    ids = re.findall(r"SLURM jobid (\d+)", log) + re.findall(r"external jobid '(\d+)'", log)
    return list(dict.fromkeys(ids))


def sacct_rows(ids: list[str], timeout_s: float = 60.0) -> list[dict]:
    """sacct records (allocation only) for the ids, once all of them are in a final state."""
    fields = ["JobID", "JobName", "Comment", "State", "AllocTRES", "NNodes"]
    deadline = time.monotonic() + timeout_s
    while True:
        r = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(ids), "-o", ",".join(fields)],
                           capture_output=True, text=True, timeout=30)
        rows = [dict(zip(fields, ln.split("|"))) for ln in r.stdout.splitlines() if ln.strip()]
        done = {row["JobID"] for row in rows if row["State"] not in ("PENDING", "RUNNING", "COMPLETING")}
        if r.returncode == 0 and set(ids) <= done or time.monotonic() > deadline:
            return rows
        time.sleep(2)


def check_results(workdir: Path):
    runs = pq.read_table(workdir / "results" / "ci" / "runs.parquet").to_pylist()
    assert len(runs) == 5
    assert all(r["status"] == "ok" for r in runs), [(r["point_id"], r.get("reason")) for r in runs]


def rule_of(row: dict, pattern: str) -> str:
    m = re.search(pattern, row["Comment"] or "") or re.search(pattern, row["JobName"] or "")
    return m.group(1) if m else "?"


# ------------------------------------------------------------------------------ executor: slurm
@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory):
    wd = tmp_path_factory.mktemp("slurm_profile")
    r, ids, wall = run_profile(wd, "slurm", "--slurm-init-seconds-before-status-checks", "5",
                               overrides="resources.stages.finetune.gpus=1")
    print(f"slurm profile: ci sweep in {wall:.0f} s, {len(ids)} Slurm jobs")
    return wd, r, ids


def test_slurm_profile_runs_the_sweep(slurm_run):
    wd, r, ids = slurm_run
    assert r.returncode == 0, r.stdout[-8000:]
    check_results(wd)
    assert len(ids) >= N_JOBS, (ids, r.stdout[-8000:])


def test_slurm_profile_jobs_in_sacct(slurm_run):
    wd, r, ids = slurm_run
    rows = sacct_rows(ids)
    assert {row["JobID"] for row in rows} == set(ids), rows
    by_rule: dict = {}
    for row in rows:
        if row["State"] == "COMPLETED":
            by_rule.setdefault(rule_of(row, r"rule_([a-z]+)"), []).append(row)
    assert {k: len(v) for k, v in by_rule.items()} == EXPECTED, (rows, r.stdout[-6000:])
    # the finetune job got the fake GPUs of one node, one task; nothing else asked for GPUs
    (ft,) = by_rule["finetune"]
    assert "gres/gpu=2" in ft["AllocTRES"] and ft["NNodes"] == "1", ft
    assert all("gpu" not in row["AllocTRES"] for rule, rs in by_rule.items() if rule != "finetune" for row in rs)


# ------------------------------------------------------------------------------ executor: cluster-generic
@pytest.fixture(scope="module")
def generic_run(cluster, tmp_path_factory):
    wd = tmp_path_factory.mktemp("slurm_generic_profile")
    r, ids, wall = run_profile(wd, "slurm-generic", "--seconds-between-status-checks", "3")
    print(f"slurm-generic profile: ci sweep in {wall:.0f} s, {len(ids)} Slurm jobs")
    return wd, r, ids


def test_generic_profile_runs_the_sweep(generic_run):
    wd, r, ids = generic_run
    assert r.returncode == 0, r.stdout[-8000:]
    check_results(wd)
    assert len(ids) >= N_JOBS, (ids, r.stdout[-8000:])
    logs = list((wd / ".snakemake" / "slurm-generic-logs").glob("*.log"))
    assert len(logs) == len(ids)


def test_generic_profile_jobs_in_sacct(generic_run):
    wd, r, ids = generic_run
    rows = sacct_rows(ids)
    assert {row["JobID"] for row in rows} == set(ids), rows
    completed: dict = {}
    for row in rows:
        if row["State"] == "COMPLETED":
            rule = rule_of(row, r"smk-([a-z]+)")
            completed[rule] = completed.get(rule, 0) + 1
    assert completed == EXPECTED, (rows, r.stdout[-6000:])


def test_status_script_reports_states(cluster, tmp_path):
    script = ROOT / "profiles" / "slurm-generic" / "status.sh"
    ok = subprocess.run(["sbatch", "--parsable", "--wait", "-t", "1", "--mem=100", "-o", str(tmp_path / "ok.log"),
                         "--wrap", "true"], capture_output=True, text=True, timeout=120)
    bad = subprocess.run(["sbatch", "--parsable", "--wait", "-t", "1", "--mem=100", "-o", str(tmp_path / "bad.log"),
                          "--wrap", "exit 3"], capture_output=True, text=True, timeout=120)
    ok_id, bad_id = ok.stdout.strip().split(";")[0], bad.stdout.strip().split(";")[0]
    assert ok_id.isdigit() and bad_id.isdigit(), (ok, bad)

    def status(jid):
        return subprocess.run([str(script), jid], capture_output=True, text=True, timeout=60).stdout.strip()

    deadline = time.monotonic() + 60
    while (status(ok_id), status(bad_id)) != ("success", "failed") and time.monotonic() < deadline:
        time.sleep(2)
    assert status(ok_id) == "success"
    assert status(bad_id) == "failed"
    held = subprocess.run(["sbatch", "--parsable", "--hold", "-t", "1", "--mem=100", "-o", "/dev/null",
                           "--wrap", "true"], capture_output=True, text=True, timeout=60).stdout.strip()
    try:
        assert status(held) == "running"        # pending counts as running
    finally:
        _scancel([held])
