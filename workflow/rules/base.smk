rule base:
    """Train the embedded model or import an HF checkpoint: the root of every chain."""
    output:
        f"{WORK}/{{model}}/_ckpt/manifest.json",
    params:
        cfg=stage_cfg("base"),
        sweep=PLAN.sweep,
    log:
        f"{WORK}/logs/base/{{model}}.log",
    threads: PLAN.globals["resources"]["stages"]["base"]["cpus"]
    resources:
        **rule_resources("base"),
    conda:
        "../envs/frontier.yaml"
    script:
        "../scripts/base.py"
