"""Stage `finetune`: recovery of a surgered (and maybe quantized) model, on DeepSpeed.

Methods (`finetune.method`, see `config.FINETUNE_PHASES`): `transfer` (attention transfer:
only the new attention parameters train, MSE vs the softmax teacher; all layers at once or
block by block), `lolcats` (transfer, then LoRA), `lora` (LoRA only, next-token loss),
`full` (every weight, next-token loss; not on a quantized base). All run the same DeepSpeed
engine path (ZeRO 0-3, optional optimizer offload).

`run(cfg, parent, out_dir)` writes a spec, launches ONE `torchrun` of
`frontier.finetune.worker` (local processes, or one torchrun per node under Slurm), streams
its output, and returns the manifest the worker's rank 0 wrote. The checkpoint holds only
what was trained (`delta.safetensors`: feature maps, LoRA A/B, or every weight for `full`;
`lora.json`: the LoraConfig when LoRA ran);
`apply_delta` re-applies it to the parent chain's model.

Files next to the final `_ckpt` while running: `_ckpt.work/` (spec, token cache, DeepSpeed
resume checkpoints, the step log), removed after success; a rerun after a kill resumes there.
The corpus' token ids are also kept beside the chain's base checkpoint (`<base _ckpt>.tokens/`,
keyed by tokenizer, data config and corpus; `data.cached_token_splits`), so the fine-tunes of a
sweep tokenize it once.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Optional

from .. import checkpoint
from .lora import DELTA_FILE, LORA_FILE, apply_delta

__all__ = ["run", "apply_delta", "prepare", "resume_dir", "FinetuneError", "FinetuneInterrupted",
           "DELTA_FILE", "LORA_FILE"]


class FinetuneError(RuntimeError):
    """The worker processes failed; the message ends with their output's tail."""


class FinetuneInterrupted(FinetuneError):
    """The worker stopped on request (FRONTIER_FT_STOP_AFTER) after writing a resume checkpoint."""


def resume_dir(out_dir: Path) -> Path:
    """`<out_dir>.work`: DeepSpeed resume checkpoints etc., beside (not inside) the final `_ckpt`."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".work")


def prepare(cfg: dict, parent: Path, out_dir: Path, *, tracking_cfg: Optional[dict] = None, sweep: str = "",
            name: str = "", work_dir: str = "work", ds_overrides: Optional[dict] = None,
            debug_dir: Optional[Path] = None) -> Path:
    """Write the worker's spec.json into `<out_dir>.work/` and return its path.

    Used by `run`; a hand-written multi-node sbatch script can call it and then run the
    srun line of `launch.slurm_lines(..., module_args=["--spec", path])`.
    """
    from .worker import method_phases

    ft = cfg["finetune"]
    method_phases(ft)  # 'none' (the pipeline skips it) or an unknown method: ValueError
    parent, out_dir = Path(parent).resolve(), Path(out_dir).resolve()
    checkpoint.read_manifest(parent, verify=False)  # fail here, not in N processes
    work = resume_dir(out_dir)
    work.mkdir(parents=True, exist_ok=True)
    spec = {"cfg": cfg, "parent": str(parent), "out_dir": str(out_dir), "resume_dir": str(work),
            "tracking": tracking_cfg, "sweep": sweep, "name": name or f"finetune/{ft.get('name', ft['method'])}",
            "wandb_dir": str(Path(work_dir).resolve()), "started": time.time(),
            "ds_overrides": ds_overrides or {}, "debug_dir": str(debug_dir) if debug_dir else None}
    path = work / "spec.json"
    checkpoint.atomic_write_json(path, spec)
    return path


def _stream(proc: subprocess.Popen, tail_bytes: int = 64 * 1024, echo: bool = True) -> bytes:
    """Copy the child's output to our stderr as it comes (tqdm's \\r updates included); keep a tail."""
    tail: deque = deque()
    size = 0
    fd = proc.stdout.fileno()
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        if echo:
            try:
                sys.stderr.write(chunk.decode("utf-8", errors="replace"))
                sys.stderr.flush()
            except Exception:  # noqa: BLE001 - a closed stderr must not kill the run
                pass
        tail.append(chunk)
        size += len(chunk)
        while size > tail_bytes and len(tail) > 1:
            size -= len(tail.popleft())
    return b"".join(tail)


def run(cfg: dict, parent: Path, out_dir: Path, *, tracking_cfg: Optional[dict] = None,
        tracking: Optional[dict] = None, sweep: str = "", name: str = "", work_dir: str = "work",
        ds_overrides: Optional[dict] = None, debug_dir: Optional[Path] = None, echo: bool = True) -> dict:
    """Fine-tune the parent chain's model into `out_dir` (a `_ckpt` dir); returns its manifest.

    `cfg` = {"finetune": <a training method's config>, "data": <data config>}. `tracking_cfg` (alias
    `tracking`) is the W&B section; rank 0 logs there. `ds_overrides` is merged into each
    phase's DeepSpeed config; `debug_dir` makes rank 0 save the trained model's logits on a
    fixed batch there (tests). Raises FinetuneError with the workers' output tail on failure.
    """
    import torch

    from . import launch

    tracking_cfg = tracking_cfg if tracking_cfg is not None else tracking
    out_dir = Path(out_dir)
    if out_dir.name != "_ckpt":
        raise ValueError(f"checkpoint dirs are named _ckpt, got {out_dir}")
    spec_path = prepare(cfg, parent, out_dir, tracking_cfg=tracking_cfg, sweep=sweep, name=name, work_dir=work_dir,
                        ds_overrides=ds_overrides, debug_dir=debug_dir)
    ft = cfg["finetune"]
    cuda = torch.cuda.is_available()
    cmd = launch.command(ft, spec_path, cuda=cuda)
    env = launch.worker_env(cuda=cuda, nproc=int(ft["nproc"]))
    if echo:
        print(f"[finetune] {' '.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        tail = _stream(proc, echo=echo)
        rc = proc.wait()
    except BaseException:
        # our own child's process group (torchrun and its workers), nothing else
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except Exception:  # noqa: BLE001
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except Exception:  # noqa: BLE001
                pass
        raise
    if rc != 0:

        text = tail.decode("utf-8", errors="replace").replace("\r", "\n")
        lines = [ln for ln in text.splitlines() if ln.strip()][-60:]
        stopped = "stopping after global step" in text
        cls = FinetuneInterrupted if stopped else FinetuneError
        raise cls(f"finetune workers failed (torchrun exit status {rc}); resume state kept in "
                  f"{resume_dir(out_dir)}. Last output:\n" + "\n".join(lines))
    manifest = checkpoint.read_manifest(out_dir, verify=False)
    shutil.rmtree(resume_dir(out_dir), ignore_errors=True)
    return manifest
