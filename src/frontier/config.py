"""Configuration: dataclass schemas for every Hydra group, validation, composition.

Every group (`conf/<group>/*.yaml`) is checked against a schema here, so a typo or a
bad value fails at plan time with a message naming the key and what is allowed —
before any job is submitted. Schemas are dataclasses; field metadata carries the
allowed values (`choices`) and numeric bounds (`ge`, `gt`, `le`).
"""
from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Optional

from .families import FAMILIES, refusal as family_refusal

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
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


# ---------------------------------------------------------------- validation
def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is typing.Union:
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp in (list, dict):
        return isinstance(value, tp)
    return True


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


@functools.lru_cache(maxsize=None)
def _hints(schema: type) -> dict:
    return typing.get_type_hints(schema)


def validate_section(value: Any, schema: type, path: str) -> None:
    """Check a plain dict against a dataclass schema; raise ConfigError naming the key."""
    if not isinstance(value, dict):
        raise ConfigError(path, f"expected a mapping with keys {sorted(f.name for f in dataclasses.fields(schema))}, got {value!r}")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in value:
        if key not in fields:
            raise ConfigError(f"{path}.{key}", f"unknown key; allowed keys: {', '.join(sorted(fields))}")
    hints = _hints(schema)
    for name, f in fields.items():
        key = f"{path}.{name}"
        if name not in value:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(key, "missing required key")
            continue
        v, tp = value[name], hints[name]
        inner = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is typing.Union else [tp]
        nested = [a for a in inner if dataclasses.is_dataclass(a)]
        if nested:
            if v is None and type(None) in typing.get_args(tp):
                continue
            validate_section(v, nested[0], key)
            continue
        if not _type_ok(v, tp):
            raise ConfigError(key, f"expected {_type_name(tp)}, got {v!r} ({type(v).__name__})")
        meta = f.metadata
        if meta.get("choices") is not None and v not in meta["choices"]:
            raise ConfigError(key, f"{v!r} is not allowed; allowed values: {', '.join(map(str, meta['choices']))}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            for bound, ok, word in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                                    ("le", lambda a, b: a <= b, "<=")):
                b = meta.get(bound)
                if b is not None and not ok(v, b):
                    raise ConfigError(key, f"must be {word} {b}, got {v!r}")


def schema_for(group: str, section: dict) -> type:
    if group in POLYMORPHIC:
        disc, table = POLYMORPHIC[group]
        kind = section.get(disc) if isinstance(section, dict) else None
        if kind not in table:
            raise ConfigError(f"{group}.{disc}", f"{kind!r} is not allowed; allowed values: {', '.join(table)}")
        return table[kind]
    return SCHEMAS[group]


def validate_point(cfg: dict, *, cuda_available: Optional[bool] = None) -> None:
    """Validate a resolved point config (a plain dict): every group, then cross-field rules."""
    for key in cfg:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(key, f"unknown top-level key; allowed: {', '.join(sorted(TOP_LEVEL_KEYS))}")
    for group in (*GROUPS, "data", "resources"):
        if group not in cfg:
            raise ConfigError(group, "missing")
        validate_section(cfg[group], schema_for(group, cfg[group]), group)
    m, q, a, ft, ev = cfg["model"], cfg["quant"], cfg["attention"], cfg["finetune"], cfg["eval"]
    if m["heads"] % m["kv_heads"]:
        raise ConfigError("model.kv_heads", f"must divide model.heads={m['heads']}, got {m['kv_heads']}")
    if m["source"] == "embedded" and m["family"] not in EMBEDDED_FAMILIES:
        raise ConfigError("model.family", f"the embedded model is built as {', '.join(EMBEDDED_FAMILIES)}, got "
                          f"{m['family']!r}; use source: hf for other families")
    if m["source"] == "embedded" and m["train"] is None:
        raise ConfigError("model.train", "the embedded model needs a train section")
    if m["source"] == "hf" and not m["hf_id"]:
        raise ConfigError("model.hf_id", "a hub id or local path is required when source=hf")
    if m["source"] == "gguf":
        from . import gguf_file

        gguf_file.check_model_cfg(m)  # file found, readable, an architecture transformers loads, shapes agree
    if m["source"] == "embedded" and m["heads"] * m["head_dim"] != m["hidden"]:
        raise ConfigError("model.head_dim", f"heads*head_dim must equal hidden ({m['hidden']})")
    if q["method"] == "none" and q["bits"] != 16:
        raise ConfigError("quant.bits", "method none keeps 16-bit weights; set bits: 16")
    when = q.get("when", "pre")
    if when == "post" and q["method"] == "none":
        raise ConfigError("quant.when", f"when: post quantizes the fine-tuned model, but quant option {q['name']!r} "
                          "(method none) quantizes nothing; use when: pre (the default) with it, or in a sweep "
                          "that crosses quant.when with quant=none add the rule `exclude: [{quant: none, "
                          "quant.when: post}]`")
    quantized_base = q["method"] != "none" and when == "pre"   # the surgery/fine-tuning see quantized weights
    # Quant methods and what each accepts (bits, group sizes, symmetric codes, a needed package).
    quant_rules = {
        "rtn": {"bits": (2, 3, 4, 5, 6, 7, 8)},
        "hqq": {"bits": (2, 3, 4, 5, 6, 7, 8), "group": True, "asymmetric_only": True},
        "gptq": {"bits": (2, 3, 4, 5, 6, 7, 8)},
        "awq": {"bits": (2, 3, 4, 5, 6, 7, 8)},
        "nf4": {"bits": (4,), "group": True, "groups": (64, 128, 256), "package": "bitsandbytes"},
        "w8a8": {"bits": (8,), "no_group": True},
        "fp8": {"bits": (8,), "no_group": True},
    }
    rule = quant_rules.get(q["method"])
    if rule is not None:
        opt = f"quant option {q['name']!r} (method {q['method']})"
        if q["bits"] not in rule["bits"]:
            raise ConfigError("quant.bits", f"{opt} stores {'/'.join(map(str, rule['bits']))}-bit weights, got {q['bits']}")
        g = q.get("group_size")
        if rule.get("no_group") and g is not None:
            raise ConfigError("quant.group_size", f"{opt} uses one scale per output row; set group_size: null")
        if rule.get("group") and g is None:
            raise ConfigError("quant.group_size", f"{opt} needs a group size (e.g. 32, 64, 128)")
        if rule.get("groups") and g not in rule["groups"]:
            raise ConfigError("quant.group_size", f"{opt} supports block sizes {', '.join(map(str, rule['groups']))}, got {g}")
        if rule.get("asymmetric_only") and q.get("symmetric"):
            raise ConfigError("quant.symmetric", f"{opt} has no symmetric variant; set symmetric: false")
        if g is not None:
            for dim_key, dim in (("hidden", m["hidden"]), ("intermediate", m["intermediate"]),
                                 ("heads*head_dim", m["heads"] * m["head_dim"])):
                if dim % g:
                    ok = [x for x in (32, 64, 128, 256) if not (m["hidden"] % x or m["intermediate"] % x
                                                               or (m["heads"] * m["head_dim"]) % x)]
                    raise ConfigError("quant.group_size", f"{opt}: group_size {g} must divide "
                                      f"model.{dim_key}={dim} of model {m['name']!r}; group sizes this model "
                                      f"allows: {', '.join(map(str, ok)) or 'none of 32/64/128/256'} (e.g. "
                                      "quant=int4_g64,gptq4_g64,awq4_g64, or quant.group_size=64)")
        if rule.get("package"):
            import importlib.util
            if importlib.util.find_spec(rule["package"]) is None:
                raise ConfigError("quant.method", f"{opt} needs the {rule['package']} package, which is not installed "
                                                  f"here (pip install {rule['package']})")
    if q["method"] in CUDA_ONLY_QUANT:
        if cuda_available is None:
            import torch
            cuda_available = torch.cuda.is_available()
        if not cuda_available:
            raise ConfigError("quant.method", f"quant option {q['name']!r} (method {q['method']}) cannot run on this "
                                              f"machine: {CUDA_ONLY_QUANT[q['method']]}; no CUDA device is available. "
                                              f"Run the sweep where CUDA is, or drop it from the grid")
    _validate_kv(q, m)
    longest = max([*ev["recall"]["context_lens"], *ev["cost"]["context_lens"], ev["ppl"]["seq_len"]])
    if longest > m["max_position"]:
        raise ConfigError("eval", f"context length {longest} (eval option {ev['name']!r}) exceeds "
                                  f"model.max_position={m['max_position']} of model {m['name']!r}")
    _validate_attention(a, m, ev)
    for lk in ("recall", "cost"):
        lens = ev[lk]["context_lens"]
        if not lens or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 16 for x in lens):
            raise ConfigError(f"eval.{lk}.context_lens", f"must be a non-empty list of integers >= 16, got {lens!r}")
    if ev["ppl"]["stride"] > ev["ppl"]["seq_len"]:
        raise ConfigError("eval.ppl.stride", "must not exceed eval.ppl.seq_len")
    _validate_eval_tasks(ev)
    if ft["method"] != "none":
        method, phases = ft["method"], FINETUNE_PHASES[ft["method"]]
        opt = f"finetune option {ft['name']!r} (method {method})"
        for phase in phases:
            if ft[phase]["seq_len"] > m["max_position"]:
                raise ConfigError(f"finetune.{phase}.seq_len", f"exceeds model.max_position={m['max_position']}")
        if ft["precision"] == "bf16" and quantized_base and m["dtype"] == "float32":
            raise ConfigError("finetune.precision", "bf16 training over a quantized float32 base is not supported "
                              "by the int kernels; use precision: fp32 or a bfloat16 model")
        # only variants with new parameters (learned feature maps, gates) can do attention transfer
        transferable = attention_has_params(a)
        if method == "transfer" and not transferable:
            raise ConfigError("finetune.method", f"{opt} trains only the new attention parameters, and attention "
                              f"{a['name']!r} (kind {a['kind']}) has none, so it would train nothing; use lora or "
                              "full, or an attention with learned parameters (linear with a learned map, hedgehog, "
                              "taylor, lolcats)")
        if method == "lolcats" and not transferable and ft["lora"]["steps"] == 0:
            raise ConfigError("finetune.lora.steps", f"attention {a['name']} has no transfer parameters, so "
                              "lolcats with lora.steps=0 would train nothing")
        if all(ft[phase]["steps"] == 0 for phase in phases):
            raise ConfigError(f"finetune.{phases[-1]}.steps", f"{opt} with 0 steps in every phase "
                              f"({', '.join(phases)}) would train nothing (use finetune=none)")
        if method == "full" and quantized_base:
            raise ConfigError("finetune.method", f"{opt} trains every weight, but quant option {q['name']!r} "
                              f"(method {q['method']}) stores the linear weights as frozen quantized tensors that "
                              "cannot be trained; use lora or lolcats on a quantized base, or full with quant=none")
        if ft["offload_optimizer"] and ft["zero_stage"] == 0:
            raise ConfigError("finetune.offload_optimizer", "optimizer offload is a ZeRO feature; set zero_stage "
                              "to 1, 2 or 3, or offload_optimizer: false")
        if ft["zero_stage"] == 3 and quantized_base:
            raise ConfigError("finetune.zero_stage", "ZeRO-3 partitions the frozen quantized base, which torchao tensors do not support; use 0, 1 or 2")


def _validate_kv(q: dict, m: dict) -> None:
    """KIVI (quant.kv_bits 4/2): groups that tile the head and the residual window."""
    bits = q.get("kv_bits", 16)
    if bits not in (4, 2):
        return
    g, r, per = q.get("kv_group", 32), q.get("kv_residual", 128), 8 // bits
    if m["head_dim"] % g:
        raise ConfigError("quant.kv_group", f"{g} must divide model.head_dim={m['head_dim']} (KIVI groups values "
                          f"along channels); allowed values: {', '.join(str(x) for x in range(per, m['head_dim'] + 1, per) if m['head_dim'] % x == 0)}")
    if g % per:
        raise ConfigError("quant.kv_group", f"{g} must be a multiple of {per} ({per} {bits}-bit codes per byte)")
    if r % g:
        raise ConfigError("quant.kv_residual", f"{r} must be a multiple of quant.kv_group={g} (0, {g}, {2 * g}, ...)")


def attention_has_params(a: dict) -> bool:
    """Whether the attention variant adds trainable parameters (what attention transfer trains)."""
    if a["kind"] == "lolcats":
        return True
    if a["kind"] == "linear":
        return a.get("feature_map", "elu") in ("hedgehog", "taylor") or bool(a.get("learned_map", True))
    return False


def _validate_attention(a: dict, m: dict, ev: dict) -> None:
    """Cross-field rules of the attention group: windows and patterns shorter than the evaluation,
    feature-map limits, the hybrid layer choice, what the model family supports."""
    seq = ev["ppl"]["seq_len"]
    kind = a["kind"]
    refused = family_refusal(m["family"], a)
    if refused:
        key, why = refused
        raise ConfigError(key, f"{why} (model option {m['name']!r}, attention option {a['name']!r})")
    if kind in ("sliding_window", "sink_window", "lolcats") and a["window"] >= seq:
        raise ConfigError("attention.window", f"window {a['window']} must be below eval.ppl.seq_len={seq} or it equals softmax")
    if kind == "block_sparse" and a["block_size"] * (a["local_blocks"] + a["global_blocks"]) >= seq:
        raise ConfigError("attention.block_size", f"block_size*(local_blocks+global_blocks) = "
                          f"{a['block_size'] * (a['local_blocks'] + a['global_blocks'])} must be below "
                          f"eval.ppl.seq_len={seq} or the pattern covers every key")
    if kind == "topk" and a["k"] >= seq:
        raise ConfigError("attention.k", f"k {a['k']} must be below eval.ppl.seq_len={seq} or it equals softmax")
    if kind in ("linear", "lolcats"):
        fm = a.get("feature_map", "elu")
        from .attention.featuremaps import FEATURE_MAP_KEYS, validate_feature_map_cfg

        try:  # keys a map does not use (seed with elu, ...), learned_map false for hedgehog, ...
            validate_feature_map_cfg({**a, "feature_map": fm})
        except ValueError as e:
            import re

            hit = re.search(r"cfg '(\w+)'", str(e))
            bad = hit.group(1) if hit else "feature_map"
            raise ConfigError(f"attention.{bad}", f"{e} (keys per feature map: "
                              f"{ {k: sorted(v) for k, v in FEATURE_MAP_KEYS.items()} })") from None
        if fm == "cosformer":
            longest = max([*ev["recall"]["context_lens"], *ev["cost"]["context_lens"], seq])
            if a["max_len"] <= longest:
                raise ConfigError("attention.max_len", f"cosformer max_len {a['max_len']} (attention option "
                                  f"{a['name']!r}) must exceed the longest evaluated context ({longest}, eval option "
                                  f"{ev['name']!r}); set attention.max_len above it")
    keep = a.get("keep_softmax")
    if keep is None or kind == "softmax":
        return
    layers = m["layers"]
    if keep == "auto":
        if a.get("softmax_fraction") is None and a["n_softmax"] >= layers:
            raise ConfigError("attention.n_softmax", f"{a['n_softmax']} (attention option {a['name']!r}) must be below "
                              f"model.layers={layers} of model {m['name']!r} (all layers softmax is attention=softmax); "
                              "or set attention.softmax_fraction")
        return
    if not isinstance(keep, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in keep):
        raise ConfigError("attention.keep_softmax", f"must be null, 'auto' or a list of layer indices, got {keep!r}")
    bad = [i for i in keep if not 0 <= i < layers]
    if bad:
        raise ConfigError("attention.keep_softmax", f"layers {bad} are outside 0..{layers - 1} (model.layers={layers})")
    if len(set(keep)) >= layers:
        raise ConfigError("attention.keep_softmax", f"keeps every one of the {layers} layers softmax; use attention=softmax")


def _validate_eval_tasks(ev: dict) -> None:
    """eval.recall.tasks / depths and eval.harness.tasks."""
    rc = ev["recall"]
    tasks = rc.get("tasks", ["kv", "passkey"])
    for i, t in enumerate(tasks):
        if t not in RECALL_TASKS:
            raise ConfigError(f"eval.recall.tasks[{i}]", f"unknown task {t!r}; allowed: {', '.join(RECALL_TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise ConfigError("eval.recall.tasks", f"lists a task twice: {tasks}")
    for t, L in (rc.get("task_max_len") or {}).items():
        if t not in tasks:
            raise ConfigError(f"eval.recall.task_max_len.{t}", f"names a task not in eval.recall.tasks; "
                                                               f"allowed: {', '.join(tasks)}")
        if not isinstance(L, int) or isinstance(L, bool) or L < min(rc["context_lens"]):
            raise ConfigError(f"eval.recall.task_max_len.{t}", f"must be an integer >= the smallest context "
                                                               f"length {min(rc['context_lens'])}, got {L!r}")
    depths = rc.get("depths")
    if depths is not None and (not depths or not all(isinstance(d, (int, float)) and not isinstance(d, bool)
                                                      and 0 <= d <= 1 for d in depths)):
        raise ConfigError("eval.recall.depths", f"must be null or a non-empty list of numbers in [0, 1], got {depths!r}")
    h = ev.get("harness") or {}
    htasks = h.get("tasks") or []
    if not all(isinstance(t, str) and t for t in htasks):
        raise ConfigError("eval.harness.tasks", f"must be a list of lm-eval task names, got {htasks!r}")
    if h.get("limit") is not None and h["limit"] > 1 and h["limit"] != int(h["limit"]):
        raise ConfigError("eval.harness.limit", f"a count (integer >= 1) or a fraction (< 1), got {h['limit']!r}")
    if htasks:
        import importlib.util
        if importlib.util.find_spec("lm_eval") is None:
            raise ConfigError("eval.harness.tasks", "lm-evaluation-harness tasks need the lm_eval package, which is "
                              "not installed here (pip install lm-eval==0.4.13), or set eval.harness.tasks: []")


# ---------------------------------------------------------------- composition
@functools.lru_cache(maxsize=1)
def _hydra():
    """Initialise Hydra once per process on the project's conf/ directory."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if not GlobalHydra.instance().is_initialized():
        initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="frontier")
    return GlobalHydra.instance()


def group_options(group: str) -> list[str]:
    from hydra.core.object_type import ObjectType

    return sorted(_hydra().config_loader().get_group_options(group, results_filter=ObjectType.CONFIG))


@functools.lru_cache(maxsize=None)
def _option_file(group: str, name: str) -> dict:
    from omegaconf import OmegaConf

    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        opts = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        raise ConfigError(group, f"unknown option {name!r}; available: {', '.join(opts)}")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if "defaults" in cfg:
        raise ConfigError(group, f"{path} uses a defaults list; option_config reads plain option files only")
    return cfg


def option_config(group: str, name: str) -> dict:
    """The plain contents of ``conf/<group>/<name>.yaml`` (a fresh dict; no Hydra initialisation),
    for code that needs an option's values outside a composed point (benchmarks, tests)."""
    import copy

    return copy.deepcopy(_option_file(group, name))


def option_names(group: str) -> list[str]:
    """Option names of a group, from the files in ``conf/<group>/`` (no Hydra initialisation)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose(group_choices: tuple[tuple[str, str], ...]) -> dict:
    """Compose config.yaml with group choices (e.g. (("quant", "int8"),)); returns a plain dict.

    An unknown option fails here with the list of available ones for that group.
    """
    from hydra import compose as hydra_compose
    from hydra.errors import MissingConfigException
    from omegaconf import OmegaConf

    _hydra()
    for group, choice in group_choices:
        if group in GROUPS or group == "sweep":
            opts = group_options(group)
            if choice not in opts:
                raise ConfigError(group, f"unknown option {choice!r}; available: {', '.join(opts)}")
    try:
        cfg = hydra_compose(config_name="config", overrides=[f"{g}={c}" for g, c in group_choices])
    except MissingConfigException as e:  # pragma: no cover - guarded above
        raise ConfigError(group_choices[0][0] if group_choices else "config", str(e)) from e
    return OmegaConf.to_container(cfg, resolve=True)


def softmax_layer_count(attention_cfg: dict, layers: int) -> int:
    """How many layers a `keep_softmax: auto` hybrid keeps softmax: `softmax_fraction` of the
    model's layers (rounded down, at least 1) when set, else `n_softmax`."""
    frac = attention_cfg.get("softmax_fraction")
    if frac is not None:
        return max(1, int(float(frac) * int(layers)))
    return int(attention_cfg.get("n_softmax", 1))
