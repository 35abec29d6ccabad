"""Resume bookkeeping of the finetune worker (:mod:`frontier.finetune.worker`, whose docstring
describes the protocol): the files of ``<out_dir>.work`` (``state.json``, ``train_log.jsonl``, the
DeepSpeed checkpoints per phase and transfer block, finished phases' and blocks' tensors), the
``FRONTIER_FT_STOP_AFTER`` drill and the phase/block transitions. :class:`ResumeMixin` is a part of
:class:`~frontier.finetune.worker.Worker` and uses its attributes (``torch``, ``checkpoint``,
``work``, ``state``, ``rank``, ``is_main``, ``barrier``, ``bcast``, ...).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Optional


STATE = "state.json"
LOG = "train_log.jsonl"
TOKENS = "tokens.safetensors"
SPEC = "spec.json"
STOP_ENV = "FRONTIER_FT_STOP_AFTER"
STOP_EXIT = 3


def fingerprint(spec: dict, world: int) -> str:
    key = {"cfg": spec["cfg"], "parent": str(Path(spec["parent"]).resolve()), "world": world,
           "ds_overrides": spec.get("ds_overrides") or {}}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def final_name(phase: str) -> str:
    return f"{phase}_final.safetensors"


def block_name(j: int) -> str:
    return f"transfer_b{j}.safetensors"


class StopRequested(SystemExit):
    pass


class ResumeMixin:
    """State file, train log, DeepSpeed checkpoints and phase/block transitions of a Worker."""

    # ---------------------------------------------------------------- state file and log
    def save_state(self):
        if self.is_main:
            self.checkpoint.atomic_write_json(self.work / STATE, self.state)

    def append_log(self, rec: dict):
        if not self.is_main:
            return
        with open(self.work / LOG, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
        if self.run is not None:
            flat = {f"{rec['phase']}/{k}": v for k, v in rec.items()
                    if isinstance(v, (int, float)) and k not in ("global_step",)}
            for i, v in enumerate(rec.get("mse", []) or []):
                flat[f"transfer/mse_layer{i}"] = v
            self.run.log(flat, step=rec["global_step"])

    # ---------------------------------------------------------------- checkpoints
    def ckpt_dir(self, phase: str, block: Optional[int]) -> Path:
        return self.work / phase / f"b{block}" if block is not None else self.work / phase

    def save_ckpt(self, engine, phase: str, step: int, block: Optional[int] = None):
        torch = self.torch
        d = self.ckpt_dir(phase, block)
        tag = f"step{step}"
        engine.save_checkpoint(str(d), tag=tag, client_state={"phase": phase, "step": step,
                                                              "global_step": self.global_step},
                               exclude_frozen_parameters=True)
        (d / tag).mkdir(parents=True, exist_ok=True)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, d / tag / f"rng_rank{self.rank}.pt")
        self.barrier()
        if self.is_main:
            self.state.update(phase=phase, step=step, global_step=self.global_step, tag=tag,
                              block=block if block is not None else 0)
            self.save_state()
            for old in d.iterdir():
                if old.is_dir() and old.name.startswith("step") and old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
        self.barrier()
        self.maybe_stop()

    def maybe_stop(self):
        if self.stop_after is not None and self.global_step == self.stop_after:
            print(f"[finetune] rank {self.rank}: stopping after global step {self.global_step} "
                  f"({STOP_ENV})", file=sys.stderr, flush=True)
            raise StopRequested(STOP_EXIT)

    def restore(self, engine, phase: str, block: Optional[int] = None) -> int:
        torch = self.torch
        if self.state["phase"] != phase or not self.state.get("tag"):
            return 0
        if block is not None and int(self.state.get("block", 0)) != block:
            return 0
        d = self.ckpt_dir(phase, block)
        load_path, _ = engine.load_checkpoint(str(d), tag=self.state["tag"], load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"could not load the DeepSpeed checkpoint {d}/{self.state['tag']}")
        rng = d / self.state["tag"] / f"rng_rank{self.rank}.pt"
        if rng.exists():
            saved = torch.load(rng, weights_only=True)
            torch.set_rng_state(saved["cpu"])
            if "cuda" in saved and torch.cuda.is_available():
                torch.cuda.set_rng_state(saved["cuda"])
        return int(self.state["step"])

    def finish_phase(self, phase: str, tensors: dict, stats: dict):
        if self.is_main:
            self.checkpoint.save_tensors(tensors, self.work / final_name(phase))
            self.state["phases"][phase] = stats
            self.state["done"].append(phase)
            self.state.update(phase=self.next_phase(phase), step=0, tag=None, block=0, global_step=self.global_step)
            self.save_state()
            shutil.rmtree(self.work / phase, ignore_errors=True)
            if phase == "transfer":
                for j in range(len(self.blocks)):
                    (self.work / block_name(j)).unlink(missing_ok=True)
        self.state = self.bcast(self.state if self.is_main else None)
        self.maybe_stop()

    def finish_block(self, j: int, tensors: dict, stats: dict):
        """Transfer block j done: its tensors to `transfer_b<j>.safetensors`, the next block starts at step 0.

        The last block's position is not persisted: `finish_phase` (right after) records the phase
        as done; a kill in between resumes that block from its last checkpoint."""
        last = j + 1 == len(self.blocks)
        if self.is_main:
            self.checkpoint.save_tensors(tensors, self.work / block_name(j))
            self.state["blocks"] = [b for b in self.state.get("blocks", []) if b["block"] != j] + [stats]
            if not last:
                self.state.update(step=0, tag=None, block=j + 1, global_step=self.global_step)
                self.save_state()
                shutil.rmtree(self.ckpt_dir("transfer", j), ignore_errors=True)
        if not last:
            self.state = self.bcast(self.state if self.is_main else None)
            self.maybe_stop()

    def skip_phase(self, phase: str, reason: str):
        if self.bar is not None:
            self.bar.total -= self.phase_steps[phase]
            self.bar.refresh()
        if self.is_main:
            print(f"[finetune] phase {phase} skipped: {reason}", file=sys.stderr)
            self.state["phases"][phase] = {"skipped": reason, "steps": 0}
            self.state["done"].append(phase)
            self.state.update(phase=self.next_phase(phase), step=0, tag=None, block=0)
            self.save_state()
        self.state = self.bcast(self.state if self.is_main else None)

    # ---------------------------------------------------------------- records of the log
    def _records(self, phase: str, block: Optional[int] = None) -> list:
        """Log records of a phase (of one transfer block), from the log file, so resumed runs are whole."""
        if not self.is_main or not (self.work / LOG).exists():
            return []
        recs = [json.loads(ln) for ln in (self.work / LOG).read_text().splitlines() if ln.strip()]
        return [r for r in recs if r["phase"] == phase and (block is None or r.get("block", 0) == block)]

    def _history(self, phase: str, block: Optional[int] = None) -> tuple[Optional[dict], Optional[dict]]:
        """First and last log records of a phase (of one transfer block)."""
        recs = self._records(phase, block)
        return (recs[0], recs[-1]) if recs else (None, None)

    def _tok_s(self, phase: str, block: Optional[int] = None) -> Optional[float]:
        recs, seen, timed = self._records(phase, block), set(), []
        for r in recs:  # the first step of each engine (block): warm-up
            b = r.get("block", 0)
            if b in seen:
                timed.append(r)
            seen.add(b)
        t = sum(r["step_s"] for r in timed)
        return round(sum(r["tokens"] for r in timed) / t, 2) if t > 0 else None

    # ---------------------------------------------------------------- tensors of finished phases/blocks
    def _load_finished(self, model, files: list) -> None:
        """Copy tensors saved by finished phases/blocks (safetensors files in .work) into the model."""
        params = dict(model.named_parameters())
        for f in files:
            if not f.exists():
                continue
            fm = self.checkpoint.load_tensors(f)
            missing = [k for k in fm if k not in params]
            if missing:
                raise RuntimeError(f"trained parameters from {f.name} not in the model: {missing[:3]}")
            with self.torch.no_grad():
                for k, t in fm.items():
                    params[k].copy_(t.to(params[k].dtype))
