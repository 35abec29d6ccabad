# frontier — one DAG per sweep: base → quantize → surgery → finetune → evaluate → collect.
#
#   snakemake --cores 2 --config sweep=demo
#   snakemake --cores 2 --config sweep=demo overrides="quant=int8 attention.window=128"
#   snakemake -n --config sweep=demo            # plan only
#   snakemake --profile profiles/slurm --config sweep=demo
#
# The grid is expanded and validated by `frontier.grid` at parse time: a bad key or
# value fails here, before any job runs. Rules are thin; the work is in src/frontier.
from snakemake.utils import min_version

min_version("9.0")


include: "workflow/rules/common.smk"


wildcard_constraints:
    model=r"[^/]+",
    quant=r"[^/]+",
    attention=r"[^/]+",
    finetune=r"[^/]+",
    eval=r"[^/]+",


include: "workflow/rules/base.smk"
include: "workflow/rules/quantize.smk"
include: "workflow/rules/surgery.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/collect.smk"


rule all:
    input:
        collect_outputs(),
    default_target: True
