rule surgery:
    """Swap attention modules (reusing q/k/v/o); stores the new attention parameters."""
    input:
        parent_manifest("surgery"),
    output:
        f"{WORK}/{{model}}/{{quant}}/{{attention}}/_ckpt/manifest.json",
    params:
        cfg=stage_cfg("surgery"),
        sweep=PLAN.sweep,
    log:
        f"{WORK}/logs/surgery/{{model}}/{{quant}}/{{attention}}.log",
    threads: 1
    resources:
        **rule_resources("surgery"),
    conda:
        "../envs/frontier.yaml"
    script:
        "../scripts/surgery.py"
