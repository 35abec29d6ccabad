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


STAGE_KEYS = {"base": ("model",), "quantize": ("model", "quant"),
              "surgery": ("model", "quant", "attention"),
              "finetune": ("model", "quant", "attention", "finetune"),
              "evaluate": ("model", "quant", "attention", "finetune", "eval")}
GRID_STAGE = {"base": "model", "quantize": "quant", "surgery": "attention", "finetune": "finetune",
              "evaluate": "eval"}


def point_of(stage, wildcards):
    key = "/".join([WORK, *(wildcards[k] for k in STAGE_KEYS[stage])])
    try:
        return JOBS[stage][key]
    except KeyError:
        raise ValueError(f"{key} is not a {stage} job of sweep {PLAN.sweep}") from None


def stage_cfg(stage):
    """Rule param: the resolved config the stage's result depends on (a change re-runs it)."""
    return lambda w: grid.stage_config(point_of(stage, w), GRID_STAGE[stage])


def parent_manifest(stage):
    """Input: manifest of the nearest non-trivial parent checkpoint."""
    upstream = {"quantize": "model", "surgery": "quant", "finetune": "attention", "evaluate": "finetune"}[stage]
    return lambda w: os.path.join(point_of(stage, w).ckpt_dir(upstream, WORK), "manifest.json")


def point_param(field):
    return lambda w: getattr(point_of("evaluate", w), field)


def collect_outputs():
    return [f"{RESULTS}/runs.parquet", f"{RESULTS}/report.html"]
