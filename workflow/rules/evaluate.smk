rule evaluate:
    """Quality (perplexity, recall) and measured cost at a ladder of context lengths."""
    input:
        parent_manifest("evaluate"),
    output:
        f"{WORK}/{{model}}/{{quant}}/{{attention}}/{{finetune}}/{{eval}}/metrics.json",
    params:
        cfg=stage_cfg("evaluate"),
        point_id=point_param("point_id"),
        choices=point_param("choices"),
        overrides=point_param("overrides"),
        sweep=PLAN.sweep,
    log:
        f"{WORK}/logs/evaluate/{{model}}/{{quant}}/{{attention}}/{{finetune}}/{{eval}}.log",
    threads: 1
    resources:
        **rule_resources("evaluate"),
    conda:
        "../envs/frontier.yaml"
    script:
        "../scripts/evaluate.py"
