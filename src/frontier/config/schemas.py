"""Configuration schemas: one dataclass per Hydra group (`conf/<group>/*.yaml`) and its
options; field metadata carries the allowed values (`choices`) and bounds (`ge`, `gt`, `le`)."""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import field
from pathlib import Path
from typing import Any, Optional

from ..families import FAMILIES

CONF_DIR = Path(__file__).resolve().parents[3] / "conf"
EMBEDDED_FAMILIES = ("llama", "qwen2", "mistral")  # the families base.llama_config builds
GROUPS = ("model", "quant", "attention", "finetune", "eval", "hardware", "tracking")
# Which pipeline stage (and so which path component) each top-level key belongs to.
dataclass = functools.partial(dataclasses.dataclass, kw_only=True)
STAGE_OF_KEY = {
    "model": "model", "data": "model",
    "quant": "quant", "attention": "attention", "finetune": "finetune", "eval": "eval",
}
# quant keys that only the evaluate stage reads (the KV cache): an override of one goes into the
# eval path component, so points that differ only there share their quantize/surgery/finetune jobs.
EVAL_ONLY_KEYS = ("quant.kv_bits", "quant.kv_group", "quant.kv_residual")


def stage_of_key(key: str) -> Optional[str]:
    """The stage whose path component a dotted override key belongs to."""
    return "eval" if key in EVAL_ONLY_KEYS else STAGE_OF_KEY.get(key.split(".", 1)[0])


class ConfigError(ValueError):
    """A configuration problem, found before anything runs. `key` is the dotted path."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config error at '{key}': {message}")


def _f(default=dataclasses.MISSING, *, choices=None, ge=None, gt=None, le=None, doc=""):
    meta = {"choices": choices, "ge": ge, "gt": gt, "le": le, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------- schemas
@dataclass
class TrainCfg:
    steps: int = _f(ge=1)
    seq_len: int = _f(ge=8)
    batch: int = _f(ge=1)
    lr: float = _f(gt=0)
    warmup: int = _f(0, ge=0)
    seed: int = _f(0)


@dataclass
class ModelCfg:
    name: str = _f()
    family: str = _f(choices=tuple(FAMILIES), doc="decoder family (frontier.families); source=embedded builds "
                                                  "llama, qwen2 or mistral")
    source: str = _f(choices=("embedded", "hf", "gguf"))
    hf_id: Optional[str] = _f(None)
    gguf_file: Optional[str] = _f(None, doc="source=gguf: the GGUF file, a path (absolute or relative to the "
                                  "working directory) or, with gguf_package, a file name inside that package")
    gguf_package: Optional[str] = _f(None, doc="source=gguf: an installed Python package that ships gguf_file "
                                     "(found with importlib, so no machine path is in a config)")
    pip_hint: Optional[str] = _f(None, doc="what to run when gguf_package is not installed (shown in the error)")
    trust_remote_code: bool = _f(False)
    dtype: str = _f("float32", choices=("float32", "bfloat16", "float16"))
    layers: int = _f(ge=1)
    hidden: int = _f(ge=8)
    heads: int = _f(ge=1)
    kv_heads: int = _f(ge=1)
    head_dim: int = _f(ge=4)
    intermediate: int = _f(ge=8)
    vocab: int = _f(ge=64)
    max_position: int = _f(ge=64)
    rope_theta: float = _f(10000.0, gt=0)
    tie_embeddings: bool = _f(False)
    train: Optional[TrainCfg] = _f(None)


@dataclass
class DataCfg:
    corpus: str = _f("embedded", doc="embedded | path to a text file/folder | HF dataset id[:config]")
    max_mb: float = _f(3.0, gt=0)
    recall_fraction: float = _f(0.3, ge=0, le=1)
    repeat_fraction: float = _f(0.0, ge=0, le=1, doc="share of training rows that repeat a random corpus window "
                                                    "(a copying signal for in-context recall)")
    heldout_fraction: float = _f(0.05, gt=0, le=0.5)
    seed: int = _f(0)


@dataclass
class QuantCfg:
    name: str = _f()
    method: str = _f(choices=("none", "rtn", "hqq", "gptq", "awq", "nf4", "w8a8", "fp8"))
    bits: int = _f(choices=(2, 3, 4, 5, 6, 7, 8, 16))
    group_size: Optional[int] = _f(None, ge=8, doc="input columns per scale; null = one scale per output row")
    symmetric: bool = _f(False, doc="symmetric codes (no zero point); rtn and gptq/awq only")
    kv_bits: int = _f(16, choices=(16, 8, 4, 2), doc="KV-cache bits of softmax attention at evaluation: 16 = the "
                      "model dtype, 8 = int8 per token, 4/2 = KIVI (frontier.kivi)")
    kv_group: int = _f(32, ge=1, doc="kv_bits 4/2: tokens per key scale (per channel), channels per value scale "
                       "(per token); must divide model.head_dim")
    kv_residual: int = _f(128, ge=0, doc="kv_bits 4/2: most recent tokens kept in full precision (a multiple of "
                          "kv_group; keys are quantized kv_residual tokens at a time)")
    calib_samples: int = _f(32, ge=1, doc="gptq/awq: calibration windows from the sweep's training split")
    calib_seq_len: int = _f(256, ge=8, doc="gptq/awq: tokens per calibration window")
    damp: float = _f(0.01, gt=0, doc="gptq: Hessian damping (fraction of its mean diagonal)")
    awq_grid: int = _f(20, ge=2, doc="awq: points of the scale-exponent grid search")
    awq_clip: bool = _f(True, doc="awq: search a per-group weight clipping range after the scales (AWQ's auto_clip)")
    when: str = _f("pre", choices=("pre", "post"),
                   doc="pre: quantize the base, then surgery and fine-tuning run on the frozen quantized "
                       "weights (QLoRA-style); post: quantize the fine-tuned model (after surgery and "
                       "fine-tuning; LoRA adapters are merged into the weights first)")


ATTENTION_KINDS = ("softmax", "sliding_window", "sink_window", "block_sparse", "topk", "linear", "lolcats")
FEATURE_MAPS = ("elu", "relu", "hedgehog", "taylor", "performer", "cosformer")


@dataclass
class SoftmaxAttnCfg:
    name: str = _f()
    kind: str = _f(choices=ATTENTION_KINDS)


@dataclass
class SwappedAttnCfg(SoftmaxAttnCfg):
    """Fields every non-softmax variant has: the hybrid choice of layers kept softmax."""
    keep_softmax: Any = _f(None, doc="null: swap every layer; a list of layer indices kept softmax; or 'auto': "
                           "choose n_softmax layers from calibration diagnostics")
    n_softmax: int = _f(1, ge=1, doc="keep_softmax=auto: how many layers keep softmax")
    softmax_fraction: Optional[float] = _f(None, gt=0, le=0.5, doc="keep_softmax=auto: keep this share of the "
                                          "model's layers softmax (at least 1, rounded down) instead of n_softmax, "
                                          "so one option fits models of any depth")
    keep_by: str = _f("combined", choices=("combined", "entropy", "sink", "massive"),
                      doc="keep_softmax=auto: the per-layer score that ranks layers")
    calib_samples: int = _f(8, ge=1, doc="keep_softmax=auto: calibration windows from the sweep's training split")
    calib_seq_len: int = _f(128, ge=16, doc="keep_softmax=auto: tokens per calibration window")
    sink_tokens: int = _f(4, ge=1, doc="keep_softmax=auto: leading tokens counted as attention sinks")


@dataclass
class SlidingWindowAttnCfg(SwappedAttnCfg):
    window: int = _f(ge=1)
    block_size: int = _f(128, ge=1, doc="query block of the blockwise prefill")


@dataclass
class SinkWindowAttnCfg(SlidingWindowAttnCfg):
    sinks: int = _f(4, ge=1, doc="first tokens every query also sees (StreamingLLM attention sinks)")


@dataclass
class BlockSparseAttnCfg(SwappedAttnCfg):
    block_size: int = _f(32, ge=1)
    local_blocks: int = _f(2, ge=1, doc="a query sees its own block and the local_blocks-1 before it")
    global_blocks: int = _f(1, ge=0, doc="plus the first global_blocks blocks")


@dataclass
class TopKAttnCfg(SwappedAttnCfg):
    k: int = _f(32, ge=1, doc="keys per query (by score, among the causal keys)")
    block_size: int = _f(256, ge=1, doc="query block of the prefill")


@dataclass
class LinearAttnCfg(SwappedAttnCfg):
    feature_map: str = _f("elu", choices=FEATURE_MAPS)
    learned_map: bool = _f(True, doc="a learnable per-head map before the feature function (identity init); "
                           "hedgehog and taylor always learn theirs")
    feature_dim: Optional[int] = _f(None, ge=1, doc="hedgehog: projection width (null = head_dim); taylor: "
                                    "projected dim d' (null = 16); performer: random features (null = 64)")
    seed: int = _f(0, doc="performer: seed of the random features")
    redraw_interval: int = _f(0, ge=0, doc="performer: redraw the random features every N training forwards (0: never)")
    stabilize: bool = _f(True, doc="performer: subtract the per-query-row max (cancels in the normalisation)")
    max_len: int = _f(8192, ge=2, doc="cosformer: M of the cos(pi (i-j) / 2M) re-weighting; positions must stay below")
    chunk_size: int = _f(64, ge=1)
    eps: float = _f(1e-6, gt=0)


@dataclass
class LolcatsAttnCfg(LinearAttnCfg):
    window: int = _f(64, ge=1)
    mix: str = _f("published", choices=("published", "affine"),
                  doc="window term weighted g = sigmoid(gate), linear term 1 (published: the released LoLCATs "
                      "configs) or 1 - g (affine)")
    gate_init: Optional[float] = _f(None, doc="initial gate logit; null: the convention's (published -2.197, "
                                    "i.e. g = 0.1; affine 0.0, g = 0.5)")
    block_size: int = _f(128, ge=1, doc="query block of the window part")


@dataclass
class PhaseCfg:
    steps: int = _f(ge=0)
    lr: float = _f(gt=0)
    seq_len: int = _f(ge=8)
    micro_batch: int = _f(ge=1)
    grad_accum: int = _f(1, ge=1)


@dataclass
class LoraPhaseCfg(PhaseCfg):
    r: int = _f(8, ge=1)
    alpha: float = _f(16.0, gt=0)
    dropout: float = _f(0.0, ge=0, le=1)
    targets: list = _f(["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class TransferPhaseCfg(PhaseCfg):
    block_size: Optional[int] = _f(None, ge=1, doc="null: every layer's new attention parameters train at once; "
                                   "k: layers [0,k), then [k,2k), ..., each block for `steps` steps")


# Fine-tuning methods (conf/finetune/<name>.yaml `method:`) and the phases each runs, in order.
# transfer = attention transfer (MSE vs the softmax teacher; only the new attention parameters
# train); lora = peft LoRA, next-token loss; full = every weight trains, next-token loss.
FINETUNE_PHASES = {"none": (), "transfer": ("transfer",), "lolcats": ("transfer", "lora"),
                   "lora": ("lora",), "full": ("full",)}


@dataclass
class FinetuneNoneCfg:
    name: str = _f()
    method: str = _f(choices=tuple(FINETUNE_PHASES))


@dataclass
class FinetuneTrainCfg(FinetuneNoneCfg):
    """What every training method shares: the DeepSpeed engine and its launch."""
    nproc: int = _f(2, ge=1)
    nodes: int = _f(1, ge=1)
    zero_stage: int = _f(2, choices=(0, 1, 2, 3))
    precision: str = _f("fp32", choices=("fp32", "bf16"))
    grad_clip: float = _f(1.0, ge=0)
    seed: int = _f(0)
    checkpoint_every: int = _f(50, ge=1)
    offload_optimizer: bool = _f(False, doc="ZeRO-Offload: optimizer states and step on the CPU (zero_stage >= 1)")


@dataclass
class TransferCfg(FinetuneTrainCfg):
    transfer: TransferPhaseCfg = _f()


@dataclass
class LolcatsCfg(FinetuneTrainCfg):
    transfer: TransferPhaseCfg = _f()
    lora: LoraPhaseCfg = _f()


@dataclass
class LoraCfg(FinetuneTrainCfg):
    lora: LoraPhaseCfg = _f()


@dataclass
class FullCfg(FinetuneTrainCfg):
    full: PhaseCfg = _f()


@dataclass
class PplCfg:
    seq_len: int = _f(ge=8)
    stride: int = _f(ge=1)
    max_tokens: int = _f(ge=16)


# Synthetic long-context tasks of `eval.recall.tasks` (frontier.evaluate.recall); each gives
# `<task>_acc@L` in metrics.json quality (kv: `recall_acc@L`).
RECALL_TASKS = ("kv", "kv_text", "passkey", "needle_single", "needle_multikey", "needle_multivalue", "mqar", "copy")


@dataclass
class NeedleCfg:
    keys: int = _f(4, ge=2, le=64, doc="needle_multikey: needles with distinct keys (one queried, the rest distractors)")
    values: int = _f(4, ge=2, doc="needle_multivalue: values of the one queried key (all must be recalled)")


@dataclass
class MqarCfg:
    pairs: Optional[int] = _f(16, ge=1, doc="key-value pairs per prompt; filler pads the prompt to L between the "
                              "pairs and the queries. null: fill the context with pairs instead")
    queries: int = _f(4, ge=1, doc="queries per prompt (distinct keys), scored teacher-forced")


@dataclass
class RecallCfg:
    context_lens: list = _f()
    samples: int = _f(ge=1, doc="prompts per task per context length")
    seed: int = _f(0)
    tasks: list = _f(["kv", "passkey"], doc=f"any of {', '.join(RECALL_TASKS)}")
    depths: Optional[list] = _f(None, doc="depths in [0, 1] of the queried item, cycled over the samples; "
                                "null: spread evenly over [0.1, 0.9]")
    needle: NeedleCfg = _f({})
    mqar: MqarCfg = _f({})
    task_max_len: dict = _f({}, doc="{task: L}: run that task only at the context_lens <= L (a long ladder "
                            "for some tasks, a short one for the rest); tasks not named use every L")


@dataclass
class CostCfg:
    context_lens: list = _f()
    decode_tokens: int = _f(ge=1)
    warmup: int = _f(1, ge=0)
    repeats: int = _f(2, ge=1)
    batch: int = _f(1, ge=1)


@dataclass
class HarnessCfg:
    """lm-evaluation-harness tasks, run in-process on the point's loaded model (frontier.evaluate.harness)."""
    tasks: list = _f([], doc="lm-eval task (or group) names; empty: no harness run")
    include_path: Optional[str] = _f(None, doc="folder of extra task YAMLs (e.g. tasks on local files)")
    num_fewshot: Optional[int] = _f(None, ge=0)
    limit: Optional[float] = _f(None, gt=0, doc="examples per task (>= 1) or a fraction (< 1); null: all")
    batch_size: int = _f(8, ge=1)
    on_error: str = _f("fail", choices=("fail", "warn"), doc="warn: a harness failure (e.g. its data unreachable) "
                       "is recorded in metrics.json warnings and the point's other metrics are kept")


@dataclass
class EvalCfg:
    name: str = _f()
    ppl: PplCfg = _f()
    recall: RecallCfg = _f()
    cost: CostCfg = _f()
    harness: HarnessCfg = _f({})
    kv_chunk: int = _f(32, ge=1, doc="quant.kv_bits < 16: perplexity, MQAR and recall prompts stream through the "
                       "quantized cache in chunks of this many tokens (each attends to the cache the earlier ones wrote)")
    quality_weights: str = _f("auto", choices=("auto", "kernel", "dequantized"),
                              doc="deprecated, ignored (kept so old configs validate): quality and cost now run "
                                  "the same quantized layers, which dequantize on the fly at prefill shapes "
                                  "(frontier.quantize.fastpath); no dense copies are made")


@dataclass
class HardwareCfg:
    name: str = _f()
    peak_flops: float = _f(gt=0)
    mem_bw: float = _f(gt=0)
    mem_bytes: float = _f(gt=0)
    measure: bool = _f(False)


@dataclass
class TrackingCfg:
    name: str = _f()
    backend: str = _f("wandb", choices=("wandb",))
    mode: str = _f("offline", choices=("offline", "online", "disabled"))
    project: str = _f("frontier")
    entity: Optional[str] = _f(None)


@dataclass
class StageResourcesCfg:
    cpus: int = _f(1, ge=1)
    gpus: int = _f(0, ge=0)
    mem_mb: int = _f(4000, ge=100)
    runtime: int = _f(60, ge=1, doc="minutes")


@dataclass
class StagesResourcesCfg:
    base: StageResourcesCfg = _f()
    quantize: StageResourcesCfg = _f()
    surgery: StageResourcesCfg = _f()
    finetune: StageResourcesCfg = _f()
    evaluate: StageResourcesCfg = _f()
    collect: StageResourcesCfg = _f()


@dataclass
class ResourcesCfg:
    partition: Optional[str] = _f(None)
    account: Optional[str] = _f(None)
    retry_factor: float = _f(1.5, ge=1)
    stages: StagesResourcesCfg = _f()


@dataclass
class SweepCfg:
    name: str = _f()
    grid: dict = _f({})
    exclude: list = _f([])
    set: dict = _f({})


# Schema chosen by a discriminating key inside the group config.
POLYMORPHIC = {
    "attention": ("kind", {"softmax": SoftmaxAttnCfg, "sliding_window": SlidingWindowAttnCfg,
                           "sink_window": SinkWindowAttnCfg, "block_sparse": BlockSparseAttnCfg,
                           "topk": TopKAttnCfg, "linear": LinearAttnCfg, "lolcats": LolcatsAttnCfg}),
    "finetune": ("method", {"none": FinetuneNoneCfg, "transfer": TransferCfg, "lolcats": LolcatsCfg,
                            "lora": LoraCfg, "full": FullCfg}),
}
SCHEMAS = {"model": ModelCfg, "data": DataCfg, "quant": QuantCfg, "eval": EvalCfg,
           "hardware": HardwareCfg, "tracking": TrackingCfg, "resources": ResourcesCfg}
TOP_LEVEL_KEYS = set(GROUPS) | {"data", "sweep", "work_dir", "results_dir", "resources"}
# Methods that need CUDA kernels; rejected at plan time on a CPU-only machine.
CUDA_ONLY_QUANT: dict = {
    "fp8": "float8 (e4m3) weights and activations need CUDA tensor cores with fp8 support (sm89+: L4, H100, H200); "
           "torchao's Float8Tensor has no CPU kernel",
}

