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
