"""Benchmark planning: how long a sweep of 100, 1,000 and 10,000 points takes to plan.

    python bench/plan.py [--out bench/results/plan.json] [--timeout 600] [--sizes 100,1000,10000]

Sweeps are command-line overrides on sweep=demo (no sweep files written): sliding-window
attention with `attention.window=range(...)` x `quant=none,int8` x `eval.cost.decode_tokens`
values, `finetune=none`. For each size:

* `total_s`: wall time of `snakemake -n --quiet` (parse, grid expansion, resources, cost table,
  DAG), in a fresh process and an empty working directory — what a user waits for.
* `ours_s`: wall time of `frontier.grid.plan` (Hydra init + expansion + composition +
  validation) in a fresh process; `estimate_s`: `frontier.resources.estimate_plan` on that plan.

A snakemake run that exceeds --timeout is recorded with `"timed_out": true`. Target: a
1,000-point sweep plans in under 10 s end to end.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_1000_S = 10.0

# size → overrides on sweep=demo (points = 2 quant x windows x decode_tokens values)
SWEEPS = {
    100: ["quant=none,int8", "attention=sliding_window", "attention.window=range(1,51)", "finetune=none"],
    1000: ["quant=none,int8", "attention=sliding_window", "attention.window=range(1,251)", "finetune=none",
           "eval.cost.decode_tokens=4,8"],
    10000: ["quant=none,int8", "attention=sliding_window", "attention.window=range(1,251)", "finetune=none",
            "eval.cost.decode_tokens=range(1,21)"],
}

_OURS = r"""
import json, sys, time
t0 = time.perf_counter()
from frontier import grid, resources
p = grid.plan(json.loads(sys.argv[1]))
t1 = time.perf_counter()
resources.estimate_plan(p)
t2 = time.perf_counter()
print(json.dumps({"ours_s": t1 - t0, "estimate_s": t2 - t1, "n_points": len(p.points), "jobs": p.job_counts()}))
"""


def time_ours(overrides: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", _OURS, json.dumps(["sweep=demo", *overrides])],
                         capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_snakemake(overrides: list[str], timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="frontier-plan-bench-") as wd:
        cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", wd,
               "-n", "--quiet", "--config", "sweep=demo", f"overrides={' '.join(overrides)}"]
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"total_s": None, "timed_out": True, "timeout_s": timeout}
        dt = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"snakemake -n failed ({r.returncode}):\n{r.stderr[-3000:]}")
        return {"total_s": dt, "timed_out": False}


def machine() -> dict:
    import snakemake

    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "snakemake": getattr(snakemake, "__version__", "?")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "plan.json"))
    ap.add_argument("--timeout", type=float, default=600.0, help="cap on one snakemake -n run (s)")
    ap.add_argument("--sizes", default="100,1000,10000")
    args = ap.parse_args(argv)
    points: dict = {}
    for size in (int(s) for s in args.sizes.split(",")):
        ours = time_ours(SWEEPS[size])
        assert ours["n_points"] == size, (size, ours["n_points"])
        smk = time_snakemake(SWEEPS[size], args.timeout)
        points[str(size)] = {**smk, "ours_s": round(ours["ours_s"], 3), "estimate_s": round(ours["estimate_s"], 3),
                             "jobs": ours["jobs"], "overrides": SWEEPS[size]}
        if smk["total_s"] is not None:
            points[str(size)]["total_s"] = round(smk["total_s"], 3)
        print(f"{size:>6} points: snakemake -n {points[str(size)]['total_s']} s"
              f"{' (timed out)' if smk['timed_out'] else ''}, grid.plan {ours['ours_s']:.2f} s, "
              f"estimate {ours['estimate_s']:.2f} s", file=sys.stderr)
    t1000 = points.get("1000", {}).get("total_s")
    result = {"machine": machine(), "points": points,
              "targets": {"1000_points_total_s_max": TARGET_1000_S,
                          "met": bool(t1000 is not None and t1000 <= TARGET_1000_S)}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["targets"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
