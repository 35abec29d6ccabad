"""Snakemake adapter: rule collect → frontier.collect.run + frontier.report."""
from pathlib import Path

from frontier import runtime

sm = snakemake  # noqa: F821 - injected by Snakemake
with runtime.stage_logging(sm.log[0], "collect", sm.params.out_dir):
    from frontier import collect, report

    out = Path(sm.params.out_dir)
    collect.run(sm.params.sweep, list(sm.input), out, hardware_cfgs=[sm.config["_hardware"]],
                tracking=sm.config["_tracking"], work_dir=sm.config["_work_dir"])
    report.plot_all(out)
    report.write_html(out)
