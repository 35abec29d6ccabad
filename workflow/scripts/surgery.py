"""Snakemake adapter: rule surgery → frontier.surgery.run."""
import sys
from pathlib import Path

sm = snakemake  # noqa: F821 - injected by Snakemake
sys.path.insert(0, str(Path(sm.scriptdir).parents[1] / "src"))  # when frontier is not pip-installed
from frontier import runtime  # noqa: E402

with runtime.stage_logging(sm.log[0], "surgery", sm.output[0], threads=sm.threads):
    from frontier import surgery

    with runtime.failure_recorded("surgery", Path(sm.output[0]).parent, sm.params.cfg, Path(sm.input[0]).parent):
        surgery.run(sm.params.cfg, Path(sm.input[0]).parent, Path(sm.output[0]).parent,
                    tracking_cfg=sm.config["_tracking"], sweep=sm.params.sweep,
                    name=str(Path(sm.output[0]).parent.parent), work_dir=sm.config["_work_dir"])
