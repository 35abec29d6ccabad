"""Snakemake adapter: rule evaluate → frontier.evaluate.run (writes metrics.json, ok or failed)."""
import sys
from pathlib import Path

sm = snakemake  # noqa: F821 - injected by Snakemake
sys.path.insert(0, str(Path(sm.scriptdir).parents[1] / "src"))  # when frontier is not pip-installed
from frontier import runtime  # noqa: E402

with runtime.stage_logging(sm.log[0], "evaluate", sm.output[0], threads=sm.threads):
    from frontier import evaluate

    evaluate.run(Path(sm.input[0]).parent, sm.params.cfg, point_id=sm.params.point_id, sweep=sm.params.sweep,
                 choices=sm.params.choices, overrides=sm.params.overrides, out_path=Path(sm.output[0]),
                 tracking=sm.config["_tracking"], work_dir=sm.config["_work_dir"])
