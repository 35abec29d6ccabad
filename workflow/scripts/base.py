"""Snakemake adapter: rule base → frontier.base.run."""
from pathlib import Path

from frontier import runtime

sm = snakemake  # noqa: F821 - injected by Snakemake
with runtime.stage_logging(sm.log[0], "base", sm.output[0]):
    from frontier import base

    base.run(sm.params.cfg, Path(sm.output[0]).parent, tracking_cfg=sm.config["_tracking"],
             sweep=sm.params.sweep, work_dir=sm.config["_work_dir"])
