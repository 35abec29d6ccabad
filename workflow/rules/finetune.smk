rule finetune:
    """Recovery fine-tuning on a DeepSpeed engine: attention transfer, LoRA, both (lolcats) or full.

    One rule = one launcher call (torchrun with `nproc` processes per node)."""
    input:
        parent_manifest("finetune"),
    output:
        f"{WORK}/{{model}}/{{quant}}/{{attention}}/{{finetune}}/_ckpt/manifest.json",
    params:
        cfg=stage_cfg("finetune"),
        sweep=PLAN.sweep,
    log:
        f"{WORK}/logs/finetune/{{model}}/{{quant}}/{{attention}}/{{finetune}}.log",
    threads: lambda w: point_of("finetune", w).cfg["finetune"]["nproc"]
    resources:
        **rule_resources("finetune"),
    conda:
        "../envs/frontier.yaml"
    script:
        "../scripts/finetune.py"
