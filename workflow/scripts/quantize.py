"""Snakemake adapter: rule quantize → frontier.quantize.run."""
from pathlib import Path

from frontier import runtime

sm = snakemake  # noqa: F821 - injected by Snakemake
with runtime.stage_logging(sm.log[0], "quantize", sm.output[0]):
    from frontier import quantize

    quantize.run(sm.params.cfg, Path(sm.input[0]).parent, Path(sm.output[0]).parent,
                 tracking_cfg=sm.config["_tracking"], sweep=sm.params.sweep,
                 name=str(Path(sm.output[0]).parent.parent), work_dir=sm.config["_work_dir"])
