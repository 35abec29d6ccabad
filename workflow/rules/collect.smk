rule collect:
    """Parquet tables (runs, costs, frontier, crossover) and the plots of a sweep."""
    input:
        [p.metrics_path(WORK) for p in PLAN.points],
    output:
        runs=f"{RESULTS}/runs.parquet",
        costs=f"{RESULTS}/costs.parquet",
        frontier=f"{RESULTS}/frontier.parquet",
        crossover=f"{RESULTS}/crossover.parquet",
        html=f"{RESULTS}/report.html",
        plots=[
            report(f"{RESULTS}/{name}.png", caption=f"../report/{name}.rst", category="Frontier")
            for name in ("frontier_weight_bytes", "frontier_state_bytes", "cost_vs_L", "recall_heatmap")
        ],
    params:
        sweep=PLAN.sweep,
        out_dir=lambda w, output: os.path.dirname(output.runs),
    log:
        f"{WORK}/logs/collect/{PLAN.sweep}.log",
    threads: 1
    resources:
        **rule_resources("collect"),
    conda:
        "../envs/frontier.yaml"
    script:
        "../scripts/collect.py"
