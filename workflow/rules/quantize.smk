rule quantize:
    """Quantize the decoder's linear layers (torchao); stores only the quantized weights."""
    input:
        f"{WORK}/{{model}}/_ckpt/manifest.json",
    output:
        f"{WORK}/{{model}}/{{quant}}/_ckpt/manifest.json",
    params:
        cfg=stage_cfg("quantize"),
        sweep=PLAN.sweep,
    log:
        f"{WORK}/logs/quantize/{{model}}/{{quant}}.log",
    threads: 1
    resources:
        **rule_resources("quantize"),
    conda:
        "../envs/frontier.yaml"
    script:
        "../scripts/quantize.py"


rule quantize_post:
    """quant.when: post — quantize the fine-tuned model (after surgery and fine-tuning; LoRA
    adapters merged first); stores only the quantized weights, its parent is the finetune checkpoint."""
    input:
        parent_manifest("quantize_post"),
    output:
        f"{WORK}/{{model}}/{{quant}}/{{attention}}/{{finetune}}/{{post_quant}}/_ckpt/manifest.json",
    wildcard_constraints:
        post_quant=r"[^/]+",
    params:
        cfg=stage_cfg("quantize_post"),
        sweep=PLAN.sweep,
    log:
        f"{WORK}/logs/quantize_post/{{model}}/{{quant}}/{{attention}}/{{finetune}}/{{post_quant}}.log",
    threads: 1
    resources:
        **rule_resources("quantize_post"),
    conda:
        "../envs/frontier.yaml"
    script:
        "../scripts/quantize.py"
