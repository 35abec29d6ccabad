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


rule evaluate_post:
    """Like evaluate, for a quant.when: post point: the post-quantized fine-tuned model."""
    input:
        parent_manifest("evaluate_post"),
    output:
        f"{WORK}/{{model}}/{{quant}}/{{attention}}/{{finetune}}/{{post_quant}}/{{eval}}/metrics.json",
    wildcard_constraints:
        post_quant=r"[^/]+",
    params:
        cfg=stage_cfg("evaluate_post"),
        point_id=point_param("point_id", "evaluate_post"),
        choices=point_param("choices", "evaluate_post"),
        overrides=point_param("overrides", "evaluate_post"),
        sweep=PLAN.sweep,
    log:
        f"{WORK}/logs/evaluate/{{model}}/{{quant}}/{{attention}}/{{finetune}}/{{post_quant}}/{{eval}}.log",
    threads: 1
    resources:
        **rule_resources("evaluate_post"),
    conda:
        "../envs/frontier.yaml"
    script:
        "../scripts/evaluate.py"
