"""`frontier` command line: plan, run, cost, show, report.

    frontier plan sweep=demo quant=int8          # validate + list points and unique jobs
    frontier run sweep=ci --cores 2              # the Snakemake DAG (extra args after --)
    frontier cost model=llama3_8b hardware=h100 context_len=32768 batch=1 attention=linear_elu
    frontier cost model=llama3_8b hardware=h100 context_len=131072 quant.kv_bits=2   # KIVI 2-bit cache
    frontier show results/demo                   # frontier and crossover tables
    frontier report results/demo                 # plots + report.html
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from . import config as C
from . import runtime

ROOT = Path(__file__).resolve().parents[2]


def _plan(args) -> int:
    from . import grid, resources

    p = grid.plan(args.overrides)
    print(grid.format_plan(p, max_rows=args.max_rows))
    print()
    # jobs, GPU-hours, peak GPU memory and disk per stage, modelled on the sweep's hardware
    print(resources.format_estimate(resources.estimate_plan(p)))
    return 0


def _run(args) -> int:
    from . import grid

    overrides = [o for o in args.overrides if not o.startswith("sweep=")]
    sweep = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("sweep=")), "demo")
    grid.plan(args.overrides)  # fail fast, before Snakemake starts
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(Path.cwd()),
           "--cores", str(args.cores), "--config", f"sweep={sweep}"]
    if overrides:
        cmd.append(f"overrides={' '.join(overrides)}")
    if args.dry_run:
        cmd.append("-n")
    if args.profile:
        cmd += ["--profile", args.profile]
    cmd += args.snakemake_args
    print("+", shlex.join(cmd), file=sys.stderr)
    return subprocess.call(cmd)


def _cost(args) -> int:
    from . import costmodel

    from . import grid

    for o in args.overrides:
        if "=" not in o:
            raise C.ConfigError(o, "arguments look like key=value (e.g. model=tiny or quant.kv_bits=2)")
    kv = dict(o.split("=", 1) for o in args.overrides)
    if "kv_bits" in kv:  # shorthand for quant.kv_bits
        kv.setdefault("quant.kv_bits", kv.pop("kv_bits"))
    groups = ("model", "hardware", "quant", "attention")
    allowed = {*groups, "context_len", "batch", "kv_bits"}
    for k in kv:
        if k not in allowed and k.split(".", 1)[0] not in groups:
            raise C.ConfigError(k, f"unknown argument; allowed: {', '.join(sorted(allowed))} and "
                                f"<group>.<key>=<value> for the groups {', '.join(groups)}")
    choices = tuple((g, kv[g]) for g in groups if g in kv)
    cfg = C.compose(choices)
    for k, v in kv.items():
        if "." in k:
            grid._set_dotted(cfg, k, grid._typed(v))  # unknown keys fail naming the allowed ones
    for g in groups:
        C.validate_section(cfg[g], C.schema_for(g, cfg[g]), g)
    C._validate_kv(cfg["quant"], cfg["model"])
    try:
        L, B = int(kv.get("context_len", 4096)), int(kv.get("batch", 1))
    except ValueError as e:
        raise C.ConfigError("context_len", f"context_len and batch are integers ({e})") from e
    if L < 1 or B < 1:
        raise C.ConfigError("context_len", "context_len and batch must be >= 1")
    est = costmodel.estimate(cfg["model"], cfg["quant"], cfg["attention"], cfg["hardware"], L, B)
    print(json.dumps(est, indent=2))
    return 0


def _show(args) -> int:
    out = Path(args.results)
    if not (out / "runs.parquet").exists():
        print(f"no results in {out} (run the sweep first)", file=sys.stderr)
        return 2
    from .results import terminal

    print(terminal.show_text(out))
    return 0


def _report(args) -> int:
    import os

    from .results import html as html_report
    from .results import plots, wandb_report

    out = Path(args.results)
    if not (out / "runs.parquet").exists():
        print(f"no results in {out} (run the sweep first)", file=sys.stderr)
        return 2
    paths = plots.plot_all(out)
    page = html_report.write_html(out)
    print("\n".join(str(p) for p in [*paths, page]))
    if args.wandb:
        # online (WANDB_MODE=online + API key): saved to the server; else the spec + how to upload
        res = wandb_report.wandb_report(out)
        print(res["path"])
        print(res["message"])
        if not res["saved"] and os.environ.get("WANDB_MODE") == "online":
            return 1
    return 0


def main(argv=None) -> int:
    runtime.quiet_libraries()
    ap = argparse.ArgumentParser(prog="frontier", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plan", help="validate a sweep and list its points and unique jobs")
    p.add_argument("overrides", nargs="*", help="sweep=<name> and Hydra-style overrides")
    p.add_argument("--max-rows", type=int, default=50)
    p.set_defaults(fn=_plan)
    p = sub.add_parser("run", help="run the sweep's Snakemake DAG")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--profile", default=None)
    p.add_argument("-n", "--dry-run", action="store_true")
    p.add_argument("snakemake_args", nargs=argparse.REMAINDER, default=[])
    p.set_defaults(fn=_run)
    p = sub.add_parser("cost", help="roofline cost of one configuration (JSON)")
    p.add_argument("overrides", nargs="*", help="model= hardware= context_len= batch= [quant=] [attention=] "
                   "[quant.kv_bits=16|8|4|2 (or kv_bits=)] [<group>.<key>=<value>]")
    p.set_defaults(fn=_cost)
    p = sub.add_parser("show", help="print the frontier and crossover tables of a sweep")
    p.add_argument("results", help="results/<sweep>")
    p.set_defaults(fn=_show)
    p = sub.add_parser("report", help="regenerate plots and report.html")
    p.add_argument("results")
    p.add_argument("--wandb", action="store_true", help="also build the W&B report (spec offline)")
    p.set_defaults(fn=_report)
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except C.ConfigError as e:
        print(f"frontier: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
