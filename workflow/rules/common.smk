# Grid → wildcards, paths and per-rule configs. Everything comes from frontier.grid.
import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from frontier import grid  # noqa: E402

SWEEP = str(config.get("sweep", "demo"))
OVERRIDES = shlex.split(str(config.get("overrides", "")))
PLAN = grid.plan([f"sweep={SWEEP}", *OVERRIDES])
WORK = PLAN.globals["work_dir"]
RESULTS = f"{PLAN.globals['results_dir']}/{PLAN.sweep}"
JOBS = PLAN.jobs()  # pipeline stage → {stage dir: representative point}
# Read by the scripts (not params): switching W&B online/offline re-runs nothing.
config["_tracking"] = PLAN.globals["tracking"]
config["_hardware"] = PLAN.globals["hardware"]
config["_work_dir"] = WORK

print(grid.format_plan(PLAN, max_rows=0), file=sys.stderr)


# Wildcards of each stage's path. quantize_post / evaluate_post serve the points with
# `quant.when: post` (base → surgery → finetune → quantize → evaluate), whose post-quantize
# dir follows the finetune dir: work/<model>/none/<attention>/<finetune>/<quant>~when=post/<eval>.
STAGE_KEYS = {"base": ("model",), "quantize": ("model", "quant"),
              "surgery": ("model", "quant", "attention"),
              "finetune": ("model", "quant", "attention", "finetune"),
              "quantize_post": ("model", "quant", "attention", "finetune", "post_quant"),
              "evaluate": ("model", "quant", "attention", "finetune", "eval"),
              "evaluate_post": ("model", "quant", "attention", "finetune", "post_quant", "eval")}
GRID_STAGE = {"base": "model", "quantize": "quant", "surgery": "attention", "finetune": "finetune",
              "quantize_post": "post_quant", "evaluate": "eval", "evaluate_post": "eval"}
PIPELINE_STAGE = {"quantize_post": "quantize", "evaluate_post": "evaluate"}  # JOBS / resources stage of a rule


def point_of(stage, wildcards):
    key = "/".join([WORK, *(wildcards[k] for k in STAGE_KEYS[stage])])
    try:
        return JOBS[PIPELINE_STAGE.get(stage, stage)][key]
    except KeyError:
        raise ValueError(f"{key} is not a {stage} job of sweep {PLAN.sweep}") from None


def stage_cfg(stage):
    """Rule param: the resolved config the stage's result depends on (a change re-runs it)."""
    return lambda w: grid.stage_config(point_of(stage, w), GRID_STAGE[stage])


def parent_manifest(stage):
    """Input: manifest of the nearest non-trivial parent checkpoint."""
    upstream = {"quantize": "model", "surgery": "quant", "finetune": "attention", "quantize_post": "finetune",
                "evaluate": "finetune", "evaluate_post": "post_quant"}[stage]
    return lambda w: os.path.join(point_of(stage, w).ckpt_dir(upstream, WORK), "manifest.json")


def point_param(field, stage="evaluate"):
    return lambda w: getattr(point_of(stage, w), field)


def collect_outputs():
    return [f"{RESULTS}/runs.parquet", f"{RESULTS}/report.html"]


# ---------------------------------------------------------------- cluster resources
# `resources: **rule_resources("<stage>")` in every rule: mem_mb, runtime, cpus_per_task, nodes,
# tasks, gpus_per_node, slurm_extra, sbatch_args (+ slurm_partition/slurm_account when set), each a
# function of (wildcards, attempt) computed by frontier.resources from the job's point config and
# the sweep's `resources:` section; memory and runtime grow by retry_factor per attempt.
from frontier import resources as frontier_resources  # noqa: E402

_RESOURCE_CACHE = {}


def _job_resources(stage, wildcards, attempt):
    point = PLAN.points[0] if stage == "collect" else point_of(stage, wildcards)
    key = (stage, point.point_id if stage != "collect" else "", attempt)
    if key not in _RESOURCE_CACHE:
        _RESOURCE_CACHE[key] = frontier_resources.rule_resources(PIPELINE_STAGE.get(stage, stage), point.cfg,
                                                                 PLAN.globals["resources"], attempt)
    return _RESOURCE_CACHE[key]


def rule_resources(stage):
    def value(name):
        return lambda wildcards, attempt: _job_resources(stage, wildcards, attempt)[name]

    return {name: value(name) for name in frontier_resources.resource_keys(PLAN.globals["resources"])}


# The same cost table as `frontier plan`, once, from the main process (not from every cluster job).
if workflow.is_main_process:
    print(frontier_resources.format_estimate(frontier_resources.estimate_plan(PLAN)), file=sys.stderr)
