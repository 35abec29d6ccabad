"""Saving and loading quantized linear weights: safetensors where the tensor type allows.

`save(weights, dir)` writes `quantized.safetensors` holding every tensor it can flatten:

* torchao types on torchao's allow-list (Int8Tensor, Float8Tensor, Int4Tensor,
  Int4TilePackedTo4dTensor, IntxUnpackedToInt8Tensor, ...): torchao's
  `flatten_tensor_state_dict` (its metadata JSON is kept per tensor);
* frontier's allow-list — `PackedIntxTensor`, `Int8RowTensor` and torchao's CPU
  `Int4OpaqueTensor` (not on torchao's list): inner tensors via `__tensor_flatten__`,
  attributes (ints, lists, shapes) as JSON;
* bitsandbytes `Params4bit`: the packed codes plus its quant state's plain tensors;
* plain tensors as they are.

Anything else goes to `quantized.pt` (`torch.save`, read back with `weights_only=True`).
Loading reconstructs only allow-listed classes; no pickle is ever executed.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

SAFE = "quantized.safetensors"
PT = "quantized.pt"
META_KEY = "frontier.quantized"


def _frontier_types() -> dict:
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor

    from .tensors import Int8RowTensor, PackedIntxTensor

    return {"PackedIntxTensor": PackedIntxTensor, "Int8RowTensor": Int8RowTensor, "Int4OpaqueTensor": Int4OpaqueTensor}


def _torchao_allowed() -> list:
    from torchao.prototype.safetensors.safetensors_utils import ALLOWED_TENSORS_SUBCLASSES

    return list(ALLOWED_TENSORS_SUBCLASSES)


def _encode(v):
    if isinstance(v, torch.Size):
        return {"_size": list(v)}
    if isinstance(v, torch.dtype):
        return {"_dtype": str(v).split(".")[-1]}
    if isinstance(v, (list, tuple)):
        return [_encode(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"cannot store attribute {v!r} ({type(v).__name__}) in safetensors metadata")


def _decode(v):
    if isinstance(v, dict) and "_size" in v:
        return torch.Size(v["_size"])
    if isinstance(v, dict) and "_dtype" in v:
        return getattr(torch, v["_dtype"])
    if isinstance(v, list):
        return [_decode(x) for x in v]
    return v


def _prefix(name: str) -> str:
    mod, leaf = name.rsplit(".", 1)
    return f"{mod}._{leaf}_"


def _is_params4bit(t) -> bool:
    return type(t).__name__ == "Params4bit" and hasattr(t, "quant_state")


def flatten(weights: dict):
    """(plain tensors, per-name metadata entries, leftovers that safetensors cannot hold)."""
    tensors, entries, rest = {}, {}, {}
    fr, ao = _frontier_types(), _torchao_allowed()
    for name, t in weights.items():
        cls = type(t).__name__
        if type(t) in (torch.Tensor, torch.nn.Parameter):
            tensors[name] = t.detach().contiguous().clone()
            entries[name] = {"_type": "torch.Tensor"}
        elif _is_params4bit(t):
            from .rtn import nf4_state

            tensors[name] = t.data.detach().contiguous().clone()
            state = nf4_state(t)
            for k, v in state.items():
                tensors[f"{name}.{k}"] = v.detach().contiguous().clone()
            entries[name] = {"_type": "bitsandbytes.Params4bit", "_state": sorted(state)}
        elif cls in fr:
            names, attrs = t.__tensor_flatten__()
            for n in names:
                tensors[_prefix(name) + n] = getattr(t, n).detach().contiguous().clone()
            entries[name] = {"_type": f"frontier.{cls}", "_tensor_data_names": list(names),
                             "_data": {k: _encode(v) for k, v in attrs.items()}}
        elif cls in ao:
            from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

            data, meta = flatten_tensor_state_dict({name: t})
            tensors.update({k: v.detach().contiguous() for k, v in data.items()})
            entries[name] = {"_type": f"torchao.{cls}", "_torchao": meta[name]}
        else:
            rest[name] = t
    return tensors, entries, rest


def unflatten(tensors: dict, entries: dict) -> dict:
    fr = _frontier_types()
    out = {}
    for name, e in entries.items():
        typ = e["_type"]
        if typ == "torch.Tensor":
            out[name] = tensors[name]
        elif typ == "bitsandbytes.Params4bit":
            out[name] = ("bnb4", tensors[name], {k: tensors[f"{name}.{k}"] for k in e["_state"]})
        elif typ.startswith("frontier.") and typ[len("frontier."):] in fr:
            cls = fr[typ[len("frontier."):]]
            inner = {n: tensors[_prefix(name) + n] for n in e["_tensor_data_names"]}
            attrs = {k: _decode(v) for k, v in e["_data"].items()}
            out[name] = cls.__tensor_unflatten__(inner, attrs, None, None)
        elif typ.startswith("torchao.") and typ[len("torchao."):] in _torchao_allowed():
            from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

            p = _prefix(name)
            data = {k: v for k, v in tensors.items() if k.startswith(p)}
            res, _ = unflatten_tensor_state_dict(data, {"tensor_names": json.dumps([name]), name: e["_torchao"]})
            out[name] = res[name]
        else:
            raise ValueError(f"{name}: stored tensor type {typ!r} is not on the allow-list")
    return out


def save(weights: dict, directory: Path) -> dict:
    """Write the weights into `directory`; returns {"format": ..., "files": [...]}."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors, entries, rest = flatten(weights)
    files = []
    if entries:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(tensors, str(directory / SAFE), metadata={META_KEY: json.dumps(entries, sort_keys=True)})
        files.append(SAFE)
    if rest:
        torch.save({k: v.to("cpu") for k, v in rest.items()}, directory / PT)
        files.append(PT)
    if rest and entries:
        fmt = "safetensors + torch.save (weights_only)"
    elif rest:
        fmt = "torch.save (load with weights_only=True)"
    else:
        fmt = "safetensors (torchao flatten_tensor_state_dict / frontier allow-list)"
    return {"format": fmt, "files": files, "torch_save_types": sorted({type(t).__name__ for t in rest.values()})}


def load(directory: Path) -> dict:
    """Weights written by `save` (safetensors and/or weights_only torch.load)."""
    from safetensors import safe_open

    from . import tensors as _t  # noqa: F401  (registers frontier tensor types as safe globals)
    import torchao.prototype.quantization.int4  # noqa: F401  (registers Int4OpaqueTensor)

    directory = Path(directory)
    out = {}
    if (directory / SAFE).exists():
        with safe_open(str(directory / SAFE), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            # fresh, owned (aligned) storage: CPU kernels such as _weight_int8pack_mm read it with wide loads
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
        out.update(unflatten(tensors, json.loads(meta[META_KEY])))
    if (directory / PT).exists():
        out.update(torch.load(directory / PT, map_location="cpu", weights_only=True))
    return out
