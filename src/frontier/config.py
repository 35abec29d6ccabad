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

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
GROUPS = ("model", "quant", "attention", "finetune", "eval", "hardware", "tracking")
# Which pipeline stage (and so which path component) each top-level key belongs to.
dataclass = functools.partial(dataclasses.dataclass, kw_only=True)
STAGE_OF_KEY = {
    "model": "model", "data": "model",
    "quant": "quant", "attention": "attention", "finetune": "finetune", "eval": "eval",
}


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
    family: str = _f(choices=("llama", "qwen2", "mistral"))
    source: str = _f(choices=("embedded", "hf"))
    hf_id: Optional[str] = _f(None)
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
    heldout_fraction: float = _f(0.05, gt=0, le=0.5)
    seed: int = _f(0)


@dataclass
class QuantCfg:
    name: str = _f()
    method: str = _f(choices=("none", "int8_weight_only", "int4_weight_only"))
    bits: int = _f(choices=(4, 8, 16))
    group_size: Optional[int] = _f(None, ge=8)


@dataclass
class SoftmaxAttnCfg:
    name: str = _f()
    kind: str = _f(choices=("softmax", "sliding_window", "linear"))


@dataclass
class SlidingWindowAttnCfg(SoftmaxAttnCfg):
    window: int = _f(ge=1)


@dataclass
class LinearAttnCfg(SoftmaxAttnCfg):
    feature_map: str = _f("elu", choices=("elu",))
    learned_map: bool = _f(True)
    chunk_size: int = _f(64, ge=1)
    eps: float = _f(1e-6, gt=0)


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
class FinetuneNoneCfg:
    name: str = _f()
    method: str = _f(choices=("none", "lolcats"))


@dataclass
class LolcatsCfg(FinetuneNoneCfg):
    nproc: int = _f(2, ge=1)
    nodes: int = _f(1, ge=1)
    zero_stage: int = _f(2, choices=(0, 1, 2, 3))
    precision: str = _f("fp32", choices=("fp32", "bf16"))
    grad_clip: float = _f(1.0, ge=0)
    seed: int = _f(0)
    checkpoint_every: int = _f(50, ge=1)
    transfer: PhaseCfg = _f()
    lora: LoraPhaseCfg = _f()


@dataclass
class PplCfg:
    seq_len: int = _f(ge=8)
    stride: int = _f(ge=1)
    max_tokens: int = _f(ge=16)


@dataclass
class RecallCfg:
    context_lens: list = _f()
    samples: int = _f(ge=1)
    seed: int = _f(0)


@dataclass
class CostCfg:
    context_lens: list = _f()
    decode_tokens: int = _f(ge=1)
    warmup: int = _f(1, ge=0)
    repeats: int = _f(2, ge=1)
    batch: int = _f(1, ge=1)


@dataclass
class EvalCfg:
    name: str = _f()
    ppl: PplCfg = _f()
    recall: RecallCfg = _f()
    cost: CostCfg = _f()


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
                           "linear": LinearAttnCfg}),
    "finetune": ("method", {"none": FinetuneNoneCfg, "lolcats": LolcatsCfg}),
}
SCHEMAS = {"model": ModelCfg, "data": DataCfg, "quant": QuantCfg, "eval": EvalCfg,
           "hardware": HardwareCfg, "tracking": TrackingCfg, "resources": ResourcesCfg}
TOP_LEVEL_KEYS = set(GROUPS) | {"data", "sweep", "work_dir", "results_dir", "resources"}
# Methods that need CUDA kernels; rejected at plan time on a CPU-only machine.
CUDA_ONLY_QUANT: frozenset = frozenset()


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
    if m["source"] == "embedded" and m["train"] is None:
        raise ConfigError("model.train", "the embedded model needs a train section")
    if m["source"] == "hf" and not m["hf_id"]:
        raise ConfigError("model.hf_id", "a hub id or local path is required when source=hf")
    if m["source"] == "embedded" and m["heads"] * m["head_dim"] != m["hidden"]:
        raise ConfigError("model.head_dim", f"heads*head_dim must equal hidden ({m['hidden']})")
    if q["method"] == "none" and q["bits"] != 16:
        raise ConfigError("quant.bits", "method none keeps 16-bit weights; set bits: 16")
    if q["method"] == "int8_weight_only" and q["bits"] != 8:
        raise ConfigError("quant.bits", f"int8_weight_only stores 8-bit weights, got {q['bits']}")
    if q["method"] == "int4_weight_only":
        if q["bits"] != 4:
            raise ConfigError("quant.bits", f"int4_weight_only stores 4-bit weights, got {q['bits']}")
        g = q["group_size"]
        if g is None:
            raise ConfigError("quant.group_size", "int4_weight_only needs a group size (32, 64, 128, ...)")
        for dim_key in ("hidden", "intermediate"):
            if m[dim_key] % g:
                raise ConfigError("quant.group_size", f"{g} must divide model.{dim_key}={m[dim_key]}")
    if q["method"] in CUDA_ONLY_QUANT:
        if cuda_available is None:
            import torch
            cuda_available = torch.cuda.is_available()
        if not cuda_available:
            raise ConfigError("quant.method", f"{q['method']} needs CUDA and this machine has none")
    longest = max([*ev["recall"]["context_lens"], *ev["cost"]["context_lens"], ev["ppl"]["seq_len"]])
    if longest > m["max_position"]:
        raise ConfigError("eval", f"context length {longest} exceeds model.max_position={m['max_position']}")
    if a["kind"] == "sliding_window" and a["window"] >= ev["ppl"]["seq_len"]:
        raise ConfigError("attention.window", f"window {a['window']} must be below eval.ppl.seq_len={ev['ppl']['seq_len']} or it equals softmax")
    for lk in ("recall", "cost"):
        lens = ev[lk]["context_lens"]
        if not lens or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 16 for x in lens):
            raise ConfigError(f"eval.{lk}.context_lens", f"must be a non-empty list of integers >= 16, got {lens!r}")
    if ev["ppl"]["stride"] > ev["ppl"]["seq_len"]:
        raise ConfigError("eval.ppl.stride", "must not exceed eval.ppl.seq_len")
    if ft["method"] != "none":
        for phase in ("transfer", "lora"):
            if ft[phase]["seq_len"] > m["max_position"]:
                raise ConfigError(f"finetune.{phase}.seq_len", f"exceeds model.max_position={m['max_position']}")
        if ft["zero_stage"] == 3 and q["method"] != "none":
            raise ConfigError("finetune.zero_stage", "ZeRO-3 partitions the frozen quantized base, which torchao tensors do not support; use 0, 1 or 2")


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
