"""Validation of a composed point against the schemas: a wrong key, option or value fails here,
at plan time, with a message naming the key and what is allowed."""
from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, Optional

from ..families import refusal as family_refusal
from .schemas import *  # noqa: F401,F403
from .schemas import _f  # noqa: F401


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
        from .. import gguf_file

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
        from ..attention.featuremaps import FEATURE_MAP_KEYS, validate_feature_map_cfg

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


