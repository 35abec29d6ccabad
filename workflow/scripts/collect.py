"""Snakemake adapter: rule collect → frontier.results.collect.run, then the plots and report.html."""
import sys
from pathlib import Path

sm = snakemake  # noqa: F821 - injected by Snakemake
sys.path.insert(0, str(Path(sm.scriptdir).parents[1] / "src"))  # when frontier is not pip-installed
from frontier import runtime  # noqa: E402

with runtime.stage_logging(sm.log[0], "collect", sm.params.out_dir, threads=sm.threads):
    from frontier.results import collect, html, plots

    out = Path(sm.params.out_dir)
    collect.run(sm.params.sweep, list(sm.input), out, hardware_cfgs=[sm.config["_hardware"]],
                tracking=sm.config["_tracking"], work_dir=sm.config["_work_dir"])
    plots.plot_all(out)
    html.write_html(out)
