"""Checkpoints as chains of deltas, written atomically, verified on load.

A stage directory (`.../_ckpt/`) holds the stage's own files and a `manifest.json`:
resolved stage config, the parent checkpoint (relative path), sha256 of every file,
library versions, wall time. `base` is a full HF checkpoint; `quantize` stores quantized
linear weights; `surgery` the new attention parameters; `finetune` what it trained.
`load_point(dir)` walks the chain to the base and applies each delta in order.

Only safetensors and `torch.load(weights_only=True)` are ever read.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

MANIFEST = "manifest.json"
# stage name → module whose `apply_delta(model, dir, manifest)` (or `load` for base) rebuilds it
STAGE_MODULES = {"base": "frontier.base", "quantize": "frontier.quantize",
                 "surgery": "frontier.surgery", "finetune": "frontier.finetune"}


class IntegrityError(RuntimeError):
    """A checkpoint file is missing or its sha256 differs from the manifest."""


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("frontier", "torch", "transformers", "torchao", "peft", "deepspeed", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers see the old content or the new, never a half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp dir beside `final`; on success it replaces `final` in one rename.

    A killed or failed writer leaves only a `.<name>.tmp-*` directory, which nothing
    mistakes for a finished checkpoint (and which the next successful run removes).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    trash = None
    if final.exists():
        trash = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, trash)
    os.rename(tmp, final)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def write_manifest(directory: Path, *, stage: str, config: dict, parent: Optional[Path],
                   wall_s: float, extra: Optional[dict] = None) -> dict:
    """Hash every file in `directory` and write its manifest (call inside `atomic_dir`)."""
    directory = Path(directory)
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[str(p.relative_to(directory))] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest = {
        "stage": stage,
        "config": config,
        # stored relative to the final location (the tmp dir is a sibling of it)
        "parent": None if parent is None else os.path.relpath(Path(parent).resolve(), directory.resolve().parent / "_ckpt"),
        "files": files,
        "versions": library_versions(),
        "wall_s": round(wall_s, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    atomic_write_json(directory / MANIFEST, manifest)
    return manifest


def save_stage(final_dir: Path, *, stage: str, config: dict, parent: Optional[Path],
               write: Callable[[Path], Optional[dict]], started: float) -> dict:
    """Run `write(tmp_dir)` (which may return extra manifest fields) and commit atomically."""
    final_dir = Path(final_dir)
    if final_dir.name != "_ckpt":
        raise ValueError(f"checkpoint dirs are named _ckpt, got {final_dir}")
    with atomic_dir(final_dir) as tmp:
        extra = write(tmp) or {}
        return write_manifest(tmp, stage=stage, config=config, parent=parent,
                              wall_s=time.time() - started, extra=extra)


class StageFailed(RuntimeError):
    """A stage of the chain recorded `status: failed`; its children fail with the same reason."""


def save_failed(final_dir: Path, *, stage: str, config: dict, parent: Optional[Path], reason: str,
                started: float) -> dict:
    """Record a failed stage (NaN loss, out of memory, unsupported combination) as a manifest
    with `status: failed` and the reason, so the point is collected as failed, not lost.
    Delete the folder (or `snakemake --forcerun`) to try again."""
    def write(tmp: Path) -> dict:
        return {"status": "failed", "reason": reason}

    return save_stage(final_dir, stage=stage, config=config, parent=parent, write=write, started=started)


def read_manifest(directory: Path, verify: bool = True) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.exists():
        raise IntegrityError(f"{directory}: no {MANIFEST} (incomplete or not a checkpoint)")
    manifest = json.loads(path.read_text())
    if verify:
        for name, meta in manifest.get("files", {}).items():
            p = directory / name
            if not p.exists():
                raise IntegrityError(f"{p}: listed in the manifest but missing")
            digest = sha256_file(p)
            if digest != meta["sha256"]:
                raise IntegrityError(f"{p}: sha256 {digest[:12]}… does not match the manifest's {meta['sha256'][:12]}…; refusing to load")
    return manifest


def chain(directory: Path, verify: bool = True) -> list[tuple[Path, dict]]:
    """[(dir, manifest)] from the base to `directory`."""
    out = []
    cur: Optional[Path] = Path(directory)
    while cur is not None:
        m = read_manifest(cur, verify=verify)
        out.append((cur, m))
        cur = (cur / m["parent"]).resolve() if m.get("parent") else None
        if len(out) > 16:
            raise IntegrityError(f"{directory}: checkpoint chain too long (a cycle?)")
    return list(reversed(out))


@dataclass
class LoadedPoint:
    model: Any
    tokenizer: Any
    manifests: list = field(default_factory=list)

    def stage_config(self, stage: str) -> Optional[dict]:
        for m in self.manifests:
            if m["stage"] == stage:
                return m["config"]
        return None


def load_point(directory: Path, *, verify: bool = True, device: str = "cpu") -> LoadedPoint:
    """Rebuild the model of a checkpoint chain: load the base, apply each delta in order."""
    links = chain(directory, verify=verify)
    for d, m in links:
        if m.get("status") == "failed":
            raise StageFailed(f"{m['stage']} stage failed: {m.get('reason') or 'no reason recorded'}")
    base_dir, base_manifest = links[0]
    if base_manifest["stage"] != "base":
        raise IntegrityError(f"{base_dir}: chain does not start at a base checkpoint")
    model, tokenizer = importlib.import_module(STAGE_MODULES["base"]).load(base_dir, base_manifest, device=device)
    for d, m in links[1:]:
        mod = importlib.import_module(STAGE_MODULES[m["stage"]])
        model = mod.apply_delta(model, d, m)
    model.eval()
    return LoadedPoint(model=model, tokenizer=tokenizer, manifests=[m for _, m in links])


def load_tensors(path: Path) -> dict:
    """Load a tensor file safely: safetensors, or torch.load(weights_only=True)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def save_tensors(tensors: dict, path: Path) -> None:
    """safetensors for plain tensors (contiguous, shared storage broken)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(path))


def tensor_bytes(t) -> int:
    """Bytes a tensor really stores, looking inside tensor subclasses (torchao quantized
    weights keep int data, scales and zero points as inner tensors) and at the quant state
    bitsandbytes keeps outside its 4-bit parameter (absmax, nested absmax, code table)."""
    import torch

    qs = getattr(t, "quant_state", None)
    if qs is not None and type(t).__name__ == "Params4bit":
        return t.data.numel() * t.data.element_size() + sum(
            v.numel() * v.element_size() for k, v in qs.as_dict(packed=True).items()
            if isinstance(v, torch.Tensor) and not k.startswith("quant_state."))
    if type(t) in (torch.Tensor, torch.nn.Parameter):
        return t.numel() * t.element_size()
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def model_weight_bytes(model) -> int:
    """Bytes of all parameters and buffers (shared/tied tensors counted once)."""
    seen, total = set(), 0
    for _, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        key = id(t)
        if key in seen:
            continue
        seen.add(key)
        total += tensor_bytes(t)
    return total
