"""frontier.resources: Snakemake resources per rule, the sbatch lines they become, the plan estimate.

The slurm plugin's own `get_submit_command` builds the sbatch line from our resources, so these
tests check what would really be submitted (no --ntasks-per-gpu on GPU jobs, one task per node).
"""
from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from frontier import config as C
from frontier import grid
from frontier import resources as R

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo():
    return grid.plan(["sweep=tiny"])


def _point(plan, stage):
    return next(iter(plan.jobs()[stage].values())).cfg


def _gpu_point(plan, nodes: int, nproc: int, hardware: str = "h100") -> dict:
    cfg = copy.deepcopy(_point(plan, "finetune"))
    cfg["hardware"] = C.compose((("hardware", hardware),))["hardware"]
    cfg["finetune"]["nodes"], cfg["finetune"]["nproc"] = nodes, nproc
    return cfg


class _Res(dict):
    """snakemake's job.resources: mapping + attribute access."""

    def __getattr__(self, k):
        try:
            return self[k]
        except KeyError:
            raise AttributeError(k) from None


def plugin_sbatch(res: dict, threads: int = 1) -> str:
    """The sbatch line snakemake-executor-plugin-slurm 2.8 builds for these resources."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string
    from snakemake_executor_plugin_slurm.validation import validate_slurm_extra

    job = SimpleNamespace(resources=_Res(res), threads=threads, name="finetune")
    validate_slurm_extra(job)   # our slurm_extra must not use flags the plugin manages
    params = {"run_uuid": "uuid", "slurm_logfile": "log", "comment_str": "rule_finetune",
              "account": f" -A {res['slurm_account']}" if res.get("slurm_account") else "",
              "partition": f" -p {res['slurm_partition']}" if res.get("slurm_partition") else "",
              "workdir": "/wd"}
    return get_submit_command(job, params, settings=SimpleNamespace(requeue=True, no_requeue=False, qos=None,
                                                                     reservation=None)) + set_gres_string(job)


def flags(line: str) -> dict:
    out = {}
    for tok in shlex.split(line):
        if tok.startswith("-"):
            k, _, v = tok.partition("=")
            out[k] = v
    return out


# ------------------------------------------------------------------------------ (a) CPU stage
def test_cpu_stage_resources_and_lines(demo, monkeypatch):
    monkeypatch.delenv(R.ENV_PARTITION, raising=False)
    monkeypatch.delenv(R.ENV_ACCOUNT, raising=False)
    res = R.rule_resources("quantize", _point(demo, "quantize"), demo.globals["resources"])
    sc = demo.globals["resources"]["stages"]["quantize"]
    assert res["mem_mb"] >= sc["mem_mb"] and res["runtime"] >= sc["runtime"]
    assert res["cpus_per_task"] == sc["cpus"] and res["nodes"] == 1 and res["tasks"] == 1
    assert res["gpus_per_node"] == 0 and res["slurm_extra"] == ""
    assert set(res) == set(R.resource_keys(demo.globals["resources"]))
    line = plugin_sbatch(res)
    f = flags(line)
    assert f["--mem"] == "" and f"--mem {res['mem_mb']}" in line and f"-t {res['runtime']}" in line
    assert f["--ntasks"] == "1" and f["--nodes"] == "1" and f["--cpus-per-task"] == str(sc["cpus"])
    assert "gpu" not in line
    generic = R.sbatch_line(res, "smk-quantize")
    g = flags(generic)
    assert g["--parsable"] == "" and g["--job-name"] == "smk-quantize" and g["--requeue"] == ""
    assert g["--mem"] == str(res["mem_mb"]) and g["--time"] == str(res["runtime"]) and "gpu" not in generic
    assert "--partition" not in generic and "--account" not in generic


def test_memory_scales_with_the_model(demo):
    small = R.rule_resources("evaluate", _point(demo, "evaluate"), demo.globals["resources"])
    big_cfg = copy.deepcopy(_point(demo, "evaluate"))
    big_cfg["model"] = C.compose((("model", "llama3_8b"),))["model"]
    big = R.rule_resources("evaluate", big_cfg, demo.globals["resources"])
    weights = R.full_weight_bytes(big_cfg["model"])
    assert big["mem_mb"] * R.MIB >= 2.5 * weights
    assert big["mem_mb"] > small["mem_mb"] and big["runtime"] > small["runtime"]


def test_partition_and_account_from_config_or_env(demo, monkeypatch):
    rcfg = copy.deepcopy(demo.globals["resources"])
    monkeypatch.setenv(R.ENV_PARTITION, "gpu-long")
    monkeypatch.setenv(R.ENV_ACCOUNT, "proj42")
    res = R.rule_resources("surgery", _point(demo, "surgery"), rcfg)
    assert res["slurm_partition"] == "gpu-long" and res["slurm_account"] == "proj42"
    line = plugin_sbatch(res)
    assert " -p gpu-long" in line and " -A proj42" in line
    assert "--partition=gpu-long --account=proj42" in R.sbatch_line(res, "x")
    rcfg["partition"], rcfg["account"] = "debug", "cfgacct"     # config wins over the environment
    res = R.rule_resources("surgery", _point(demo, "surgery"), rcfg)
    assert res["slurm_partition"] == "debug" and res["slurm_account"] == "cfgacct"
    assert set(res) == set(R.resource_keys(rcfg))


# ------------------------------------------------------------------------------ (b) 1 node x 8 GPUs
def test_finetune_one_node_eight_gpus(demo):
    cfg = _gpu_point(demo, nodes=1, nproc=8)
    res = R.rule_resources("finetune", cfg, demo.globals["resources"])
    assert res["nodes"] == 1 and res["tasks"] == 1 and res["gpus_per_node"] == 8
    assert res["cpus_per_task"] >= 8          # one task holds the CPUs of all 8 ranks
    assert "gpu" not in res and "gpus" not in res and "gres" not in res
    line = plugin_sbatch(res, threads=8)
    f = flags(line)
    assert f["--nodes"] == "1" and f["--ntasks"] == "1" and f["--ntasks-per-node"] == "1"
    assert f["--gpus-per-node"] == "8"
    assert "--ntasks-per-gpu" not in line and "--gpus=" not in line and "--gres" not in line
    g = flags(R.sbatch_line(res, "smk-finetune"))
    assert g["--gpus-per-node"] == "8" and g["--ntasks-per-node"] == "1" and g["--nodes"] == "1"
    assert "--ntasks-per-gpu" not in R.sbatch_line(res, "smk-finetune")


# ------------------------------------------------------------------------------ (c) 4 nodes x 8 GPUs
def test_finetune_four_nodes_eight_gpus(demo):
    cfg = _gpu_point(demo, nodes=4, nproc=8)
    res = R.rule_resources("finetune", cfg, demo.globals["resources"])
    assert res["nodes"] == 4 and res["tasks"] == 4 and res["gpus_per_node"] == 8
    line = plugin_sbatch(res, threads=8)
    f = flags(line)
    assert f["--nodes"] == "4" and f["--ntasks"] == "4" and f["--ntasks-per-node"] == "1"
    assert f["--gpus-per-node"] == "8"
    assert "--ntasks-per-gpu" not in line and "--gpus=" not in line and "--gres" not in line
    g = R.sbatch_line(res, "smk-finetune")
    gf = flags(g)
    assert gf["--nodes"] == "4" and gf["--ntasks"] == "4" and gf["--ntasks-per-node"] == "1"
    assert gf["--gpus-per-node"] == "8" and "--ntasks-per-gpu" not in g
    # memory is per node: every rank of the node loads the model on the host
    assert res["mem_mb"] * R.MIB >= 2.5 * R.full_weight_bytes(cfg["model"]) * 8


def test_gpu_evaluate_asks_one_gpu_per_job(demo):
    cfg = copy.deepcopy(_point(demo, "evaluate"))
    cfg["hardware"] = C.compose((("hardware", "h100"),))["hardware"]
    res = R.rule_resources("evaluate", cfg, demo.globals["resources"])
    line = plugin_sbatch(res)
    assert flags(line)["--gpus-per-node"] == "1" and "--ntasks-per-gpu" not in line
    # on the cpu hardware nothing asks for a GPU unless resources.stages.<stage>.gpus says so
    assert R.rule_resources("evaluate", _point(demo, "evaluate"), demo.globals["resources"])["gpus_per_node"] == 0
    rcfg = copy.deepcopy(demo.globals["resources"])
    rcfg["stages"]["finetune"]["gpus"] = 1
    ft = R.rule_resources("finetune", _point(demo, "finetune"), rcfg)
    assert ft["gpus_per_node"] == _point(demo, "finetune")["finetune"]["nproc"]


# ------------------------------------------------------------------------------ (d) retries
def test_retry_attempt_asks_for_more(demo):
    rcfg = demo.globals["resources"]
    for stage in ("base", "quantize", "surgery", "finetune", "evaluate", "collect"):
        cfg = _point(demo, stage) if stage != "collect" else demo.points[0].cfg
        one = R.rule_resources(stage, cfg, rcfg, attempt=1)
        two = R.rule_resources(stage, cfg, rcfg, attempt=2)
        three = R.rule_resources(stage, cfg, rcfg, attempt=3)
        assert two["mem_mb"] > one["mem_mb"] and two["runtime"] > one["runtime"], stage
        assert three["mem_mb"] > two["mem_mb"] and three["runtime"] > two["runtime"], stage
        assert two["mem_mb"] == pytest.approx(one["mem_mb"] * rcfg["retry_factor"], abs=2)
        assert f"--mem={two['mem_mb']}" in R.sbatch_line(two, "x")
        assert f"--time={two['runtime']}" in R.sbatch_line(two, "x")


# ------------------------------------------------------------------------------ the generic profile
def test_generic_profile_submits_sbatch_line(demo):
    prof = yaml.safe_load((ROOT / "profiles" / "slurm-generic" / "config.yaml").read_text())
    res = R.rule_resources("finetune", _gpu_point(demo, 2, 4), demo.globals["resources"])
    cmd = prof["cluster-generic-submit-cmd"].format(rule="finetune", resources=SimpleNamespace(**res))
    submit = cmd.split("&&")[-1].strip()
    assert submit == R.sbatch_line(res, "smk-finetune", output=".snakemake/slurm-generic-logs/finetune-%j.log") \
        .replace("--output=", "--comment=rule_finetune --output=")
    assert (ROOT / "profiles" / "slurm-generic" / prof["cluster-generic-status-cmd"]).stat().st_mode & 0o111
    assert prof["cluster-generic-cancel-cmd"] == "scancel"
    slurm = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    assert slurm["executor"] == "slurm" and slurm["retries"] == 2 and slurm["rerun-incomplete"] is True


# ------------------------------------------------------------------------------ plan estimate
def test_estimate_plan_demo(demo):
    est = R.estimate_plan(demo)
    counts = demo.job_counts()
    assert set(est["stages"]) == set(R.STAGES)
    for stage, row in est["stages"].items():
        assert row["jobs"] == counts[stage]
        if row["jobs"]:
            assert row["gpu_hours"] > 0, stage
            assert row["peak_gpu_mem_bytes"] > 0 and row["disk_bytes"] > 0, stage
    tot = est["total"]
    assert tot["gpu_hours"] == pytest.approx(sum(r["gpu_hours"] for r in est["stages"].values()))
    assert tot["jobs"] == sum(r["jobs"] for r in est["stages"].values())
    assert tot["disk_bytes"] == pytest.approx(sum(r["disk_bytes"] for r in est["stages"].values()))
    assert tot["peak_gpu_mem_bytes"] == max(r["peak_gpu_mem_bytes"] for r in est["stages"].values())
    table = R.format_estimate(est)
    assert "total" in table and "GPU-h" in table and "cpu" in table


def test_estimate_plan_physics():
    """Bigger model → more GPU-hours; quantized linears write fewer bytes than the base; more GPUs per
    finetune job → same per-rank work on more devices."""
    small = R.estimate_plan(grid.plan(["sweep=tiny", "hardware=h100"]))
    big = R.estimate_plan(grid.plan(["sweep=tiny", "hardware=h100", "model=llama3_8b", "eval=default"]))
    assert big["total"]["gpu_hours"] > small["total"]["gpu_hours"]
    assert big["stages"]["base"]["disk_bytes"] > big["stages"]["quantize"]["disk_bytes"] / 2
    assert big["stages"]["evaluate"]["peak_gpu_mem_bytes"] > 15e9      # 8B bf16 weights alone are ~15 GiB
    wide = R.estimate_plan(grid.plan(["sweep=tiny", "hardware=h100", "finetune.nproc=8"]))
    assert wide["stages"]["finetune"]["gpu_hours"] == pytest.approx(small["stages"]["finetune"]["gpu_hours"] * 4)


def test_estimate_never_measures(demo, monkeypatch):
    from frontier import costmodel

    monkeypatch.setattr(costmodel, "measure_cpu", lambda *a, **k: pytest.fail("planner measured the CPU"))
    assert R.estimate_plan(demo)["hardware"] == "cpu"
    R.rule_resources("evaluate", _point(demo, "evaluate"), demo.globals["resources"])


def test_cli_plan_prints_cost_table(capsys):
    from frontier import cli

    assert cli.main(["plan", "sweep=ci", "--max-rows", "0"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any(re.match(r"\s+total\s+\d+", ln) for ln in lines), out
    for stage in R.STAGES:
        assert any(ln.split()[:1] == [stage] for ln in lines), stage
