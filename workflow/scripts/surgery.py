"""Snakemake adapter: rule surgery → frontier.surgery.run."""
from pathlib import Path

from frontier import runtime

sm = snakemake  # noqa: F821 - injected by Snakemake
with runtime.stage_logging(sm.log[0], "surgery", sm.output[0]):
    from frontier import surgery

    surgery.run(sm.params.cfg, Path(sm.input[0]).parent, Path(sm.output[0]).parent,
                tracking_cfg=sm.config["_tracking"], sweep=sm.params.sweep,
                name=str(Path(sm.output[0]).parent.parent), work_dir=sm.config["_work_dir"])
