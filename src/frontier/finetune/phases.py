"""Training phases of the finetune worker (:mod:`frontier.finetune.worker`): the DeepSpeed
objectives, the training loop, the transfer phase (block by block) and the next-token phases
(``lora``, ``full``), with the ZeRO-3 and quantized-linear patches they need. :class:`PhasesMixin`
is a part of :class:`~frontier.finetune.worker.Worker` and uses its attributes and its
:class:`~frontier.finetune.resume.ResumeMixin` methods.
"""
from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Optional

from .resume import block_name, final_name



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


class PhasesMixin:
    """The training loop and the phases of a Worker."""

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

    # ---------------------------------------------------------------- phases
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
