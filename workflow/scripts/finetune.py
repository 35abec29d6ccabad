"""Snakemake adapter: rule finetune → frontier.finetune.run (one launcher call)."""
from pathlib import Path

from frontier import runtime

sm = snakemake  # noqa: F821 - injected by Snakemake
with runtime.stage_logging(sm.log[0], "finetune", sm.output[0]):
    from frontier import finetune

    finetune.run(sm.params.cfg, Path(sm.input[0]).parent, Path(sm.output[0]).parent,
                 tracking=sm.config["_tracking"], sweep=sm.params.sweep,
                 name=str(Path(sm.output[0]).parent.parent), work_dir=sm.config["_work_dir"])
