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
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

from .phases import PhasesMixin, _objectives  # noqa: F401  (_objectives: bench/finetune.py imports it from here)
from .resume import LOG, SPEC, STATE, STOP_ENV, TOKENS, ResumeMixin, StopRequested, final_name, fingerprint

PHASES = ("transfer", "lora", "full")  # every phase there is; a method runs some, in this order
LM_PHASES = ("lora", "full")  # next-token phases
PROBE_SEED = 10_007
PROBE_ROWS = 8  # rows of the fixed held-out batch the phase metrics are measured on

log = logging.getLogger("frontier.finetune")


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


# ------------------------------------------------------------------ worker
class Worker(ResumeMixin, PhasesMixin):
    """One rank of a fine-tune: setup, data, export and the phase order here; resume bookkeeping in
    :class:`~frontier.finetune.resume.ResumeMixin`, the loop and the phases in
    :class:`~frontier.finetune.phases.PhasesMixin`."""

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
