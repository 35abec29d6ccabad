"""The per-process training entry point: `python -m frontier.finetune.worker --spec spec.json`.

Started by torchrun (one process per GPU, or per CPU "slot" with gloo), never by hand.
Every rank loads the parent chain, draws its own batches (rank/world), and runs the phases
of its method (`config.FINETUNE_PHASES`: transfer → [transfer]; lolcats → [transfer, lora];
lora → [lora]; full → [full]), each phase (each transfer block) its own DeepSpeed engine:

* transfer — attention transfer: only the new attention parameters (feature maps) train;
  the loss is the mean over the trained layers of MSE(student, softmax teacher) with
  transfer mode on (every layer passes the teacher's output on, so a layer's MSE depends on
  its own parameters only). `transfer.block_size: k` trains layers [0,k), then [k,2k), ...,
  each block for `transfer.steps` steps with its own optimizer (only that block's parameters
  trainable); null trains every layer at once (one block). Per-block probe MSEs go into the
  manifest. Skipped, and recorded as such, when the surgery added no parameters (sliding
  window, softmax: lolcats then runs LoRA only) or `transfer.steps` is 0.
* lora — transfer mode off, feature maps frozen, peft LoRA on `lora.targets`, next-token
  cross-entropy.
* full — transfer mode off, every parameter trains (not on a quantized base), next-token
  cross-entropy; the delta is every parameter, in the dtype it was loaded in.

Resume: every `checkpoint_every` optimizer steps the engine saves a DeepSpeed checkpoint
(trainable state only: `exclude_frozen_parameters`) into `<out_dir>.work/<phase>/step<N>`
(`transfer/b<j>/step<N>` for transfer block j; a finished block leaves its tensors in
`transfer_b<j>.safetensors`),
each rank its RNG state beside it, and rank 0 records the position in `state.json`. A new
start with the same spec (fingerprint: configs, parent, world size) continues from there:
same phase, same step, the data streams fast-forwarded to the same position, so the loss
trajectory is the one of an uninterrupted run. A finished phase leaves its trained tensors
in `<phase>_final.safetensors`. `FRONTIER_FT_STOP_AFTER=<global step>` makes every rank exit
with status 3 right after the checkpoint of that step is written (tests, drills).

CPU specifics: frozen quantized linears train through the quantized layers themselves
(`frontier.quantize.fastpath`: at training sizes the weight is dequantized on the fly for a
dense matmul, and again in backward; no dense copy is kept); torch runs the launcher's
per-process thread count (OMP_NUM_THREADS, launch.worker_env).

Rank 0 alone writes the final checkpoint (`checkpoint.save_stage`: delta.safetensors,
lora.json, train_log.jsonl, manifest) and then removes the `.work` directory.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

STATE = "state.json"
LOG = "train_log.jsonl"
TOKENS = "tokens.safetensors"
SPEC = "spec.json"
STOP_ENV = "FRONTIER_FT_STOP_AFTER"
STOP_EXIT = 3
PHASES = ("transfer", "lora", "full")  # every phase there is; a method runs some, in this order
LM_PHASES = ("lora", "full")  # next-token phases
PROBE_SEED = 10_007
PROBE_ROWS = 8  # rows of the fixed held-out batch the phase metrics are measured on

log = logging.getLogger("frontier.finetune")


def fingerprint(spec: dict, world: int) -> str:
    key = {"cfg": spec["cfg"], "parent": str(Path(spec["parent"]).resolve()), "world": world,
           "ds_overrides": spec.get("ds_overrides") or {}}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def final_name(phase: str) -> str:
    return f"{phase}_final.safetensors"


def block_name(j: int) -> str:
    return f"transfer_b{j}.safetensors"


def transfer_blocks(layers: list, block_size: Optional[int]) -> list:
    """[[layer, ...], ...]: consecutive runs of `block_size` of the sorted layer indices (one
    block of all of them when block_size is null)."""
    layers = sorted(layers)
    if not layers:
        return []
    k = len(layers) if not block_size else int(block_size)
    return [layers[i:i + k] for i in range(0, len(layers), k)]


def method_phases(ft: dict) -> tuple:
    from ..config import FINETUNE_PHASES

    method = ft.get("method")
    if method not in FINETUNE_PHASES or not FINETUNE_PHASES[method]:
        raise ValueError(f"finetune.method {method!r} does not train; methods that do: "
                         f"{', '.join(m for m, p in FINETUNE_PHASES.items() if p)}")
    return FINETUNE_PHASES[method]


class StopRequested(SystemExit):
    pass


# ------------------------------------------------------------------ objectives (DeepSpeed modules)
def _objectives():
    import torch

    from .. import attention

    class TransferObjective(torch.nn.Module):
        """loss = mean over the trained layers (`layers`: layer indices; None: all) of
        MSE(student, teacher); aux = every swapped layer's MSE, in layer order."""

        def __init__(self, model, layers=None):
            super().__init__()
            self.model = model
            order = [m.layer_idx for m in attention.swapped_modules(model)]
            self.pick = None if layers is None else [order.index(i) for i in layers]

        def forward(self, input_ids):
            body = getattr(self.model, "model", self.model)  # skip the LM head: only layer outputs matter
            body(input_ids=input_ids, use_cache=False)
            losses = attention.transfer_losses(self.model)
            if not losses:
                raise RuntimeError("transfer mode produced no transfer losses (no swapped attention layers?)")
            per_layer = torch.stack([loss.float() for loss in losses])
            loss = per_layer.mean() if self.pick is None else per_layer[self.pick].mean()
            return loss, per_layer.detach()

    class LMObjective(torch.nn.Module):
        """Next-token cross-entropy of the causal LM."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            loss = self.model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
            return loss, loss.detach().float()[None]

    return TransferObjective, LMObjective


# ------------------------------------------------------------------ worker
class Worker:
    def __init__(self, spec: dict):
        import torch
        import torch.distributed as dist

        from .. import checkpoint, data

        self.torch, self.dist, self.checkpoint, self.data = torch, dist, checkpoint, data
        self.spec = spec
        self.cfg = spec["cfg"]
        self.ft = self.cfg["finetune"]
        self.data_cfg = self.cfg["data"]
        self.parent = Path(spec["parent"])
        self.out_dir = Path(spec["out_dir"])
        self.work = Path(spec["resume_dir"])
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        self.stop_after = int(os.environ[STOP_ENV]) if os.environ.get(STOP_ENV) else None
        self.zero = int(self.ft["zero_stage"])
        self.phases = method_phases(self.ft)
        self.blocks: list = []  # transfer blocks (layer index lists), known once the model is loaded
        self.phase_steps = {p: int(self.ft[p]["steps"]) for p in self.phases}
        self.run = None
        self.bar = None
        self.patched: list = []

    # ---------------------------------------------------------------- helpers
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        self.dist.barrier()

    def bcast(self, obj):
        lst = [obj]
        self.dist.broadcast_object_list(lst, src=0)
        return lst[0]

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

    def load_model(self, verify: bool = False):
        """A fresh model of the parent chain (base → quantized → surgered), on this rank's device."""
        lp = self.checkpoint.load_point(self.parent, verify=verify)
        att = lp.stage_config("surgery") or {}
        self.attention_name = (att.get("attention") or {}).get("name", "softmax (no surgery)")
        model = lp.model.to(self.device)
        for p in model.parameters():
            p.requires_grad_(False)
        return model, lp.tokenizer

    # ---------------------------------------------------------------- setup
    def setup(self):
        torch = self.torch
        fp = fingerprint(self.spec, self.world)
        state = None
        if self.is_main:
            self.work.mkdir(parents=True, exist_ok=True)
            path = self.work / STATE
            if path.exists():
                state = json.loads(path.read_text())
                if state.get("fingerprint") != fp:
                    print(f"[finetune] {self.work}: resume state is from a different spec/world size; starting over",
                          file=sys.stderr)
                    for p in self.work.iterdir():
                        if p.name != SPEC:
                            shutil.rmtree(p) if p.is_dir() else p.unlink()
                    state = None
            if state is None:
                state = {"fingerprint": fp, "phase": self.phases[0], "step": 0, "global_step": 0, "tag": None,
                         "block": 0, "blocks": [], "done": [], "phases": {}, "resumes": 0,
                         "started": time.time()}
            else:
                state["resumes"] = state.get("resumes", 0) + 1
                print(f"[finetune] resuming from {self.work}: phase {state['phase']} step {state['step']} "
                      f"(global step {state['global_step']})", file=sys.stderr)
                # drop log lines written after the checkpoint we resume from
                logp = self.work / LOG
                if logp.exists():
                    keep = [ln for ln in logp.read_text().splitlines()
                            if ln.strip() and json.loads(ln)["global_step"] <= state["global_step"]]
                    self.checkpoint.atomic_write_text(logp, "".join(x + "\n" for x in keep))
            self.checkpoint.atomic_write_json(self.work / STATE, state)
        self.state = self.bcast(state)
        self.global_step = int(self.state["global_step"])

        # token ids: rank 0 tokenizes once per spec, the others read its file
        self.model_cache = None
        model, tok = self.load_model(verify=self.is_main)
        self.check_precision(model)
        self.tokenizer = tok
        self.model_cache = model
        if "transfer" in self.phases:
            layers = sorted(set(self.layer_of(model).values()))
            self.blocks = transfer_blocks(layers, self.ft["transfer"].get("block_size"))
            self.phase_steps["transfer"] = int(self.ft["transfer"]["steps"]) * max(1, len(self.blocks))
        self.total_steps = sum(self.phase_steps.values())
        if self.is_main and not (self.work / TOKENS).exists():
            train_ids, held_ids = self.data.cached_token_splits(tok, self.data_cfg, self.token_cache_dir())
            self.checkpoint.save_tensors({"train": train_ids, "heldout": held_ids}, self.work / TOKENS)
        self.barrier()
        ids = self.checkpoint.load_tensors(self.work / TOKENS)
        self.train_ids, self.held_ids = ids["train"], ids["heldout"]
        torch.manual_seed(int(self.ft["seed"]))

    def token_cache_dir(self) -> Optional[Path]:
        """`<base _ckpt>.tokens/` beside the chain's base checkpoint: the corpus' token ids, shared by
        every fine-tune on that base (data.cached_token_splits); None if the chain cannot be read."""
        try:
            base_dir = self.checkpoint.chain(self.parent, verify=False)[0][0]
        except Exception:  # noqa: BLE001
            return None
        return base_dir.with_name(base_dir.name + ".tokens")

    def check_precision(self, model):
        """bf16 training casts the float parameters; torchao weights keep the dtype they were
        quantized in (their scales), and their kernels refuse bf16 activations against fp32 scales."""
        from .lora import is_quantized_tensor

        if self.ft["precision"] != "bf16":
            return
        bad = sorted({str(p.dtype) for p in model.parameters() if is_quantized_tensor(p) and p.dtype != self.torch.bfloat16})
        if bad:
            raise ValueError(f"finetune.precision=bf16 on a base quantized in {', '.join(bad)}: torchao's kernels "
                             "need activations of the quantized weights' dtype. Use precision fp32, or a bfloat16 "
                             "base (model.dtype: bfloat16) for quantized points.")

    def layer_of(self, model) -> dict:
        """{attention parameter name: its decoder layer index}."""
        from .. import attention

        mods = {name: m.layer_idx for name, m in model.named_modules() if m in attention.swapped_modules(model)}
        out = {}
        for pname in attention.attention_parameters(model):
            owner = max((n for n in mods if pname.startswith(n + ".")), key=len)
            out[pname] = mods[owner]
        return out

    def next_phase(self, phase: str) -> str:
        i = self.phases.index(phase)
        return self.phases[i + 1] if i + 1 < len(self.phases) else "export"

    def fresh_model(self):
        if self.model_cache is not None:
            model, self.model_cache = self.model_cache, None
            return model
        return self.load_model()[0]

    def stream(self, pcfg: dict, seed: int, skip: int):
        it = self.data.batches(self.train_ids, int(pcfg["seq_len"]), int(pcfg["micro_batch"]), seed,
                               tokenizer=self.tokenizer, recall_fraction=float(self.data_cfg["recall_fraction"]),
                               repeat_fraction=float(self.data_cfg.get("repeat_fraction", 0.0)),
                               rank=self.rank, world=self.world)
        for _ in range(skip):
            next(it)
        return it

    def probe_batch(self, pcfg: dict):
        ids = self.held_ids if self.held_ids.numel() > int(pcfg["seq_len"]) + 1 else self.train_ids
        rows = max(int(pcfg["micro_batch"]), PROBE_ROWS)
        it = self.data.batches(ids, int(pcfg["seq_len"]), rows, PROBE_SEED + int(self.ft["seed"]),
                               tokenizer=self.tokenizer, recall_fraction=float(self.data_cfg["recall_fraction"]),
                               repeat_fraction=float(self.data_cfg.get("repeat_fraction", 0.0)))
        return next(it).to(self.device)

    def probe(self, engine, batch) -> list:
        """Objective on a fixed held-out batch, no grad (a collective under ZeRO-3: all ranks)."""
        torch = self.torch
        engine.eval()
        with torch.no_grad():
            _, aux = engine(batch)
        engine.train()
        return [float(x) for x in aux.cpu()]

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

    # ---------------------------------------------------------------- the training loop
    def loop(self, phase: str, engine, pcfg: dict, start: int, seed: int, block: Optional[int] = None) -> None:
        torch = self.torch
        steps, ga = int(pcfg["steps"]), int(pcfg.get("grad_accum", 1))
        tokens_per_step = int(pcfg["micro_batch"]) * ga * self.world * int(pcfg["seq_len"])
        every = int(self.ft["checkpoint_every"])
        stream = self.stream(pcfg, seed, skip=start * ga)
        for i in range(start, steps):
            t0 = time.perf_counter()
            lr = self._lr(engine)
            acc = None
            for _ in range(ga):
                batch = next(stream).to(self.device)
                loss, aux = engine(batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite {phase} loss at step {i + 1} on rank {self.rank}")
                engine.backward(loss)
                engine.step()
                vals = torch.cat([loss.detach().float().reshape(1), aux.detach().float().reshape(-1)])
                acc = vals if acc is None else acc + vals
            acc = acc.to(self.device) / ga  # NCCL reduces device tensors only
            self.dist.all_reduce(acc)  # summed over ranks
            acc = (acc / self.world).cpu().tolist()
            dt = time.perf_counter() - t0
            self.global_step += 1
            rec = {"phase": phase, "step": i + 1, "global_step": self.global_step, "loss": acc[0], "lr": lr,
                   "tokens": tokens_per_step, "step_s": round(dt, 4), "tok_s": tokens_per_step / max(dt, 1e-9)}
            if phase == "transfer":
                rec["mse"] = acc[1:]
                if block is not None:
                    rec["block"] = block
            self.append_log(rec)
            if self.bar is not None:
                self.bar.set_postfix_str(f"{phase} loss={acc[0]:.4g} lr={lr:.2e}", refresh=False)
                self.bar.update(1)
            if (i + 1) % every == 0 and i + 1 < steps:
                self.save_ckpt(engine, phase, i + 1, block)

    @staticmethod
    def _lr(engine) -> float:
        from .engine import current_lr

        return current_lr(engine)

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

    # ---------------------------------------------------------------- phases
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

    def phase_transfer(self, TransferObjective):
        from .. import attention
        from . import engine as E

        phase, pcfg = "transfer", self.ft["transfer"]
        model = self.fresh_model()
        if not attention.attention_parameters(model):
            self.skip_phase(phase, f"the attention ({self.attention_name}) has no trainable parameters; nothing to transfer")
            self.model_cache = model
            return
        if int(pcfg["steps"]) == 0:
            self.skip_phase(phase, "transfer.steps is 0")
            self.model_cache = model
            return
        probe = self.probe_batch(pcfg)
        pstate = self.state.setdefault("probe", {})
        first_block = int(self.state.get("block", 0)) if self.state["phase"] == phase else 0
        engine = objective = None
        for j in range(first_block, len(self.blocks)):
            if model is None:
                model = self.fresh_model()
            # blocks before j are trained (in memory already, or from their files after a restart)
            self._load_finished(model, [self.work / block_name(i) for i in range(j)])
            params = attention.attention_parameters(model)
            layer_of = self.layer_of(model)
            bparams = {n: p for n, p in params.items() if layer_of[n] in self.blocks[j]}
            for p in model.parameters():
                p.requires_grad_(False)
            for p in bparams.values():
                p.requires_grad_(True)
            attention.set_transfer_mode(model, True)
            self.patched = self._patch(model)
            self.zero3_module_calls(model)
            block = None if len(self.blocks) == 1 else j  # one block: the all-layers-at-once layout
            objective = TransferObjective(model, layers=self.blocks[j])
            engine, ds_cfg = E.build(objective, bparams.values(), self.ft, pcfg, self.world, int(pcfg["steps"]),
                                     self.spec.get("ds_overrides"))
            start = self.restore(engine, phase, block)
            key = phase if block is None else f"{phase}_b{j}"
            if start == 0 or key not in pstate:
                pstate[key] = {"start": self.probe(engine, probe)}
                if j == 0:
                    pstate[phase] = pstate[key]
                self.save_state()
            self.loop(phase, engine, pcfg, start, seed=int(self.ft["seed"]) + 1000 * j, block=block)
            mse_end = self.probe(engine, probe)
            tensors = E.gather_named(bparams, self.zero)
            first, last = self._history(phase, block)
            pick = [self.layer_index(model).index(i) for i in self.blocks[j]]
            stats = {"block": j, "layers": list(self.blocks[j]), "steps": int(pcfg["steps"]),
                     "trainable_params": int(sum(getattr(p, "ds_numel", p.numel()) for p in bparams.values())),
                     "first_loss": first and first["loss"], "final_loss": last and last["loss"],
                     "probe_mse_first": [pstate[key]["start"][i] for i in pick],
                     "probe_mse_last": [mse_end[i] for i in pick],
                     "tok_s": self._tok_s(phase, block), "ds_config": ds_cfg,
                     "offload_active": self.offload_active(engine),
                     "zero3_partitioned_params": self.zero3_partitioned(objective)}
            self.finish_block(j, tensors, stats)
            last_block = j + 1 == len(self.blocks)
            if not last_block:
                engine.destroy()
                del engine, objective
                engine = objective = None
                # ZeRO-3 turned the model's parameters into partitioned ones: the next block loads afresh
                self.model_cache = model if self.zero < 3 else None
                model = None
                gc.collect()
        # the phase: every block's tensors and stats
        tensors = {}
        for j in range(len(self.blocks)):
            if self.is_main:
                tensors.update(self.checkpoint.load_tensors(self.work / block_name(j)))
        blocks = sorted(self.state.get("blocks", []), key=lambda b: b["block"]) if self.is_main else []
        first, last = self._history(phase)  # mse_end: the probe after the last block, every layer trained
        stats = {"steps": int(pcfg["steps"]) * len(self.blocks), "steps_per_block": int(pcfg["steps"]),
                 "block_size": pcfg.get("block_size"), "blocks": blocks,
                 "trainable_params": sum(b["trainable_params"] for b in blocks),
                 "first_loss": first and first["loss"], "final_loss": last and last["loss"],
                 "train_mse_first": first and first["mse"], "train_mse_last": last and last["mse"],
                 "probe_mse_first": pstate[phase]["start"], "probe_mse_last": mse_end,
                 "tok_s": self._tok_s(phase), "ds_config": blocks[-1]["ds_config"] if blocks else None,
                 "offload_active": self.offload_active(engine),
                 "zero3_partitioned_params": self.zero3_partitioned(objective)}
        self.finish_phase(phase, tensors, stats)
        if self.phases[-1] == phase:
            attention.set_transfer_mode(model, False)
            lm = objective.model
            self.debug_logits(lambda x: lm(input_ids=x, use_cache=False).logits, engine, pcfg)
        engine.destroy()
        del engine, objective, model
        gc.collect()

    @staticmethod
    def layer_index(model) -> list:
        """Layer indices of the swapped attention modules, in the order of the transfer MSE vectors."""
        from .. import attention

        return [m.layer_idx for m in attention.swapped_modules(model)]

    def phase_lm(self, phase: str, LMObjective):
        """A next-token phase: `lora` (peft adapters only) or `full` (every parameter)."""
        from .. import attention
        from . import engine as E
        from . import lora

        pcfg = self.ft[phase]
        if int(pcfg["steps"]) == 0:
            self.skip_phase(phase, f"{phase}.steps is 0")
            return
        model = self.fresh_model()
        attention.set_transfer_mode(model, False)
        if "transfer" in self.state["done"]:
            self._load_finished(model, [self.work / final_name("transfer")])
        for p in model.parameters():
            p.requires_grad_(False)
        self.torch.manual_seed(int(self.ft["seed"]))  # same adapter init on every rank
        lcfg = None
        if phase == "lora":
            self.patched = self._patch(model)
            lcfg = lora.lora_config_dict(pcfg)
            lora.wrap(model, lcfg)
            params = lora.lora_parameters(model)
            export_dtype = {n: self.torch.float32 for n in params}
        else:
            if lora.has_quantized_weights(model):
                raise ValueError("finetune.method full trains every weight, and this model's linear weights are "
                                 "quantized (frozen tensors); use lora or lolcats on a quantized base")
            params = dict(model.named_parameters())
            for p in params.values():
                p.requires_grad_(True)
            export_dtype = {n: p.dtype for n, p in params.items()}  # a full copy: keep the loaded dtype
        self.zero3_module_calls(model)
        objective = LMObjective(model)
        engine, ds_cfg = E.build(objective, params.values(), self.ft, pcfg, self.world, int(pcfg["steps"]),
                                 self.spec.get("ds_overrides"))
        start = self.restore(engine, phase)
        probe = self.probe_batch(pcfg)
        pstate = self.state.setdefault("probe", {})
        if start == 0 or phase not in pstate:
            pstate[phase] = {"start": self.probe(engine, probe)[0]}
            self.save_state()
        self.loop(phase, engine, pcfg, start, seed=int(self.ft["seed"]) + 1)
        loss_end = self.probe(engine, probe)[0]
        tensors = {n: t.to(export_dtype[n]) for n, t in E.gather_named(params, self.zero).items()}
        first, last = self._history(phase)
        stats = {"steps": int(pcfg["steps"]),
                 "trainable_params": int(sum(getattr(p, "ds_numel", p.numel()) for p in params.values())),
                 "first_loss": first and first["loss"], "final_loss": last and last["loss"],
                 "probe_loss_first": pstate[phase]["start"], "probe_loss_last": loss_end,
                 "tok_s": self._tok_s(phase), "lora": lcfg, "ds_config": ds_cfg,
                 "offload_active": self.offload_active(engine),
                 "zero3_partitioned_params": self.zero3_partitioned(objective)}
        self.finish_phase(phase, tensors, stats)
        if self.phases[-1] == phase:
            lm = objective.model
            self.debug_logits(lambda x: lm(input_ids=x, use_cache=False).logits, engine, pcfg)
        engine.destroy()
        del engine, objective, model
        gc.collect()

    @staticmethod
    def offload_active(engine) -> bool:
        """Whether the engine's ZeRO optimizer runs the offload path (CPU fp32 partitions + step)."""
        opt = getattr(engine, "optimizer", None)
        return bool(getattr(opt, "cpu_offload", False) or getattr(opt, "offload_optimizer", False))

    @staticmethod
    def zero3_partitioned(module) -> int:
        """Parameters ZeRO-3 holds partitioned (full size elsewhere, a shard or nothing here)."""
        return sum(1 for p in module.parameters() if hasattr(p, "ds_numel") and p.data.numel() < p.ds_numel)

    def _patch(self, model) -> list:
        """Frozen quantized linears, before a phase trains: `lora.make_frozen_linears_differentiable`
        (a kernel without autograd gets an input gradient; frontier's and torchao's CPU weight-only
        types have one: `quantize.fastpath`). Returns the names patched, over every model this
        worker built (a reused model is not patched twice)."""
        from . import lora

        names = lora.make_frozen_linears_differentiable(model)
        return sorted(set(self.patched) | set(names))

    def zero3_module_calls(self, model) -> int:
        """ZeRO-3 gathers a parameter in its owning module's hooks: before the module's forward, and
        before its backward (hooks on the module's outputs). The linear attention applies its feature
        map through `feature_map.forward_q/forward_k` (method calls, per kernel segment), not through
        the submodule's `__call__`, so no hook ever fires for the feature-map weights: forward would
        read partitioned (empty) tensors, and in transfer mode the loss does not even flow through the
        attention module's output. Under ZeRO-3 those methods are routed through `__call__` (the same
        computation), so every use gathers the weights and every backward through it re-gathers them.
        Returns how many modules were routed."""
        if self.zero != 3:
            return 0
        from .. import attention

        n = 0
        for mod in attention.swapped_modules(model):
            for name, sub in mod.named_children():
                if name in ("q_proj", "k_proj", "v_proj", "o_proj") or getattr(sub, "_frontier_z3", False):
                    continue
                if not (hasattr(sub, "forward_q") and hasattr(sub, "forward_k")) or not list(sub.parameters()):
                    continue
                fq, fk, plain = sub.forward_q, sub.forward_k, sub.forward

                def forward(x, which=None, positions=None, _fq=fq, _fk=fk, _plain=plain):
                    if isinstance(which, str):  # positions: position-dependent maps (cosFormer)
                        return _fq(x, positions) if which == "q" else _fk(x, positions)
                    return _plain(x, which, positions)  # the module's own forward(q, k, positions)

                sub.forward = forward
                sub.forward_q = lambda x, positions=None, _m=sub: _m(x, "q", positions)
                sub.forward_k = lambda x, positions=None, _m=sub: _m(x, "k", positions)
                sub._frontier_z3 = True
                n += 1
        return n

    def debug_logits(self, fn, engine, pcfg):
        """Debug/test mode: rank 0 saves the trained in-memory model's logits on a fixed batch."""
        d = self.spec.get("debug_dir")
        if not d:
            return
        torch = self.torch
        batch = self.probe_batch(pcfg)
        engine.eval()
        with torch.no_grad():
            logits = fn(batch)
        if self.is_main:
            Path(d).mkdir(parents=True, exist_ok=True)
            self.checkpoint.save_tensors({"input_ids": batch.cpu(), "logits": logits.float().cpu()},
                                         Path(d) / "logits.safetensors")

    # ---------------------------------------------------------------- export
    def export(self) -> Optional[dict]:
        """Rank 0: delta.safetensors (+ lora.json) and train_log.jsonl into the final checkpoint."""
        if not self.is_main:
            return None
        from . import lora

        st = self.state
        delta = {}
        for phase in self.phases:
            p = self.work / final_name(phase)
            if p.exists():
                delta.update(self.checkpoint.load_tensors(p))
        phases = st["phases"]
        lora_cfg = phases.get("lora", {}).get("lora")
        if not delta:
            raise RuntimeError(f"finetune trained nothing (phases {', '.join(self.phases)} skipped); "
                               "use finetune=none instead")

        def write(tmp: Path) -> dict:
            lora.write_delta(tmp, delta, lora_cfg)
            shutil.copyfile(self.work / LOG, tmp / LOG)
            ran = [p for p in self.phases if p in phases and not phases[p].get("skipped")]
            tr = phases.get("transfer", {})
            lm = next((phases[p] for p in LM_PHASES if p in ran), None)
            return {"finetune": {
                "method": self.ft["method"], "phases": list(self.phases), "phases_run": ran,
                "skipped": {p: phases[p]["skipped"] for p in self.phases if phases.get(p, {}).get("skipped")},
                "steps": {p: phases.get(p, {}).get("steps", 0) for p in self.phases},
                "final_loss": {p: phases[p].get("final_loss") for p in ran},
                "first_loss": {p: phases[p].get("first_loss") for p in ran},
                "transfer_mse": None if "transfer" not in ran else {
                    "first": tr["probe_mse_first"], "last": tr["probe_mse_last"],
                    "train_first": tr["train_mse_first"], "train_last": tr["train_mse_last"]},
                # per transfer block: its layers and their probe MSE before/after the block trained
                "transfer_blocks": None if "transfer" not in ran else {
                    "block_size": tr.get("block_size"), "steps_per_block": tr.get("steps_per_block"),
                    "blocks": [{k: b.get(k) for k in ("block", "layers", "steps", "trainable_params", "probe_mse_first",
                                                        "probe_mse_last", "first_loss", "final_loss", "tok_s")}
                               for b in tr.get("blocks", [])]},
                "lm_loss_probe": None if lm is None else {
                    "first": lm["probe_loss_first"], "last": lm["probe_loss_last"]},
                "tok_s": {p: phases[p].get("tok_s") for p in ran},
                "trainable_params": {p: phases[p].get("trainable_params") for p in ran},
                "delta_tensors": len(delta), "delta_bytes": sum(t.numel() * t.element_size() for t in delta.values()),
                "world_size": self.world, "nodes": int(self.ft.get("nodes", 1)), "zero_stage": self.zero,
                "offload_optimizer": bool(self.ft.get("offload_optimizer", False)),
                "precision": self.ft["precision"], "device": self.device.type,
                "backend": self.dist.get_backend(), "resumes": st.get("resumes", 0),
                "grad_patched_linears": len(self.patched),
                "zero3_partitioned_params": {p: phases[p].get("zero3_partitioned_params") for p in ran},
                "offload_active": {p: phases[p].get("offload_active") for p in ran},
                "ds_config": {p: phases[p].get("ds_config") for p in ran},
            }}

        manifest = self.checkpoint.save_stage(self.out_dir, stage="finetune", config=self.cfg, parent=self.parent,
                                              write=write, started=float(self.spec.get("started", time.time())))
        return manifest

    # ---------------------------------------------------------------- main
    def main(self) -> int:
        from contextlib import nullcontext

        from .. import tracking

        TransferObjective, LMObjective = _objectives()
        self.setup()
        ctx = (tracking.run(self.spec.get("tracking"), job_type="finetune", group=self.spec.get("sweep", ""),
                            name=self.spec.get("name") or "finetune", config=self.cfg,
                            work_dir=self.spec.get("wandb_dir", "work"))
               if self.is_main else nullcontext(None))
        with ctx as run:
            self.run = run
            if self.is_main:
                from tqdm import tqdm

                self.bar = tqdm(total=self.total_steps, initial=self.global_step, desc="finetune", file=sys.stderr,
                                mininterval=1.0, dynamic_ncols=False, ncols=100)
            try:
                for phase in self.phases:
                    if phase in self.state["done"]:
                        continue
                    if phase == "transfer":
                        self.phase_transfer(TransferObjective)
                    else:
                        self.phase_lm(phase, LMObjective)
            finally:
                if self.bar is not None:
                    self.bar.close()
            self.barrier()
            manifest = self.export()
            if self.is_main:
                ft = manifest["finetune"]
                if run is not None:
                    run.summary({"final_loss": ft["final_loss"], "tok_s": ft["tok_s"],
                                 "phases_run": ft["phases_run"], "wall_s": manifest["wall_s"]})
                    mse = ft.get("transfer_mse")
                    if mse:
                        run.table("transfer_mse", ["layer", "first", "last"],
                                  [[i, a, b] for i, (a, b) in enumerate(zip(mse["first"], mse["last"]))])
        self.barrier()
        if self.is_main:
            shutil.rmtree(self.work, ignore_errors=True)
        return 0


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m frontier.finetune.worker")
    ap.add_argument("--spec", required=True, help="spec.json written by frontier.finetune.run")
    args = ap.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())

    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    import warnings

    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*")
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*")
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        # the launcher's per-process share of the cores (launch.worker_env); torch would otherwise
        # follow MKL_NUM_THREADS when a hand-made launch leaves it at the job's full count
        torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    logging.getLogger("torch.distributed").setLevel(logging.WARNING)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass
    from .engine import dist_backend

    deepspeed.init_distributed(dist_backend=dist_backend())
    import torch.distributed as dist

    code = 0
    try:
        code = Worker(spec).main()
    except StopRequested as e:
        code = int(e.code)
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
    return code


if __name__ == "__main__":
    _code = main()
    # Every file is written and closed, W&B finished, the process group destroyed: skip the
    # interpreter's teardown of torch/DeepSpeed/transformers (measured ~1-3 s per fine-tune on
    # 2 cores, between the last log line and torchrun seeing the exit). An exception still
    # takes the normal path (traceback, status 1).
    for _stream in (sys.stdout, sys.stderr):
        try:
            _stream.flush()
        except Exception:  # noqa: BLE001
            pass
    logging.shutdown()
    os._exit(_code)
