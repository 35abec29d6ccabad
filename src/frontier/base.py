"""Stage `base`: a full HF causal-LM checkpoint, the root of every chain.

`source: hf` loads any causal LM by hub id or local path (`AutoModelForCausalLM`,
safetensors, `trust_remote_code` only when the model config says so) and saves it.
`source: embedded` trains the project's own small Llama on CPU: a byte-level BPE
tokenizer and the model, on the Python standard library's sources mixed with
synthetic key-value recall — reproducible from the repo, no download.
`source: gguf` dequantizes a GGUF file (a path, or a file shipped in an installed package)
into the same safetensors checkpoint; the manifest records the file's sha256 and the
quantization types it was stored in (`frontier.gguf_file`).
"""
from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Optional

from . import checkpoint, data, tracking

log = logging.getLogger(__name__)
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
WEIGHTS = "model.safetensors"


def _torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def llama_config(m: dict, vocab_size: int, tokenizer=None):
    """A transformers config for the embedded model (Llama, or Qwen2/Mistral by family)."""
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig}[m["family"]]
    kw = dict(vocab_size=vocab_size, hidden_size=m["hidden"], intermediate_size=m["intermediate"],
              num_hidden_layers=m["layers"], num_attention_heads=m["heads"], num_key_value_heads=m["kv_heads"],
              head_dim=m["head_dim"], max_position_embeddings=m["max_position"], rope_theta=m["rope_theta"],
              tie_word_embeddings=m["tie_embeddings"], attn_implementation="sdpa")
    if tokenizer is not None:
        kw.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    if m["family"] == "mistral":
        kw["sliding_window"] = None
    return cls(**kw)


def train_embedded(cfg: dict, out: Path, run: Optional[tracking.Run] = None) -> dict:
    """Train the embedded model; writes tokenizer + HF checkpoint into `out`. Returns stats."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    m, d = cfg["model"], cfg["data"]
    t = m["train"]
    torch.manual_seed(t["seed"])
    docs = data.documents(d)
    train_docs, _ = data.split_documents(docs, d["heldout_fraction"], d["seed"])
    import random

    rng = random.Random(d["seed"])
    kv_samples = [data.kv_training_text(rng, rng.randint(4, 40), 8) for _ in range(200)]
    tok = data.train_tokenizer(train_docs + kv_samples, vocab_size=m["vocab"], out_dir=out)
    ids = data.encode_documents(tok, train_docs)
    model = AutoModelForCausalLM.from_config(llama_config(m, len(tok), tok), dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=t["lr"], weight_decay=0.01, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < t["warmup"]:
            return t["lr"] * (step + 1) / t["warmup"]
        frac = (step - t["warmup"]) / max(1, t["steps"] - t["warmup"])
        return t["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    stream = data.batches(ids, t["seq_len"], t["batch"], t["seed"], tokenizer=tok,
                          recall_fraction=d["recall_fraction"], repeat_fraction=float(d.get("repeat_fraction", 0.0)))
    losses = []
    t0 = time.time()
    bar = tqdm(range(t["steps"]), desc=f"base: training {m['name']}", file=sys.stderr, mininterval=2.0)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        batch = next(stream)
        loss = model(input_ids=batch, labels=batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss at step {step}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        if run is not None and (step % 10 == 0 or step == t["steps"] - 1):
            run.log({"loss": losses[-1], "lr": lr_at(step)}, step=step)
    wall = time.time() - t0
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    return {"train": {"first_loss": losses[0], "final_loss": sum(losses[-10:]) / len(losses[-10:]),
                      "steps": t["steps"], "tokens": t["steps"] * t["batch"] * t["seq_len"],
                      "tok_s": t["steps"] * t["batch"] * t["seq_len"] / wall, "corpus_tokens": int(ids.numel()),
                      "params": sum(p.numel() for p in model.parameters())}}


def save_hf(cfg: dict, out: Path) -> dict:
    """Load a hub id / local path and store it as the chain's base (safetensors)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = cfg["model"]
    tok = AutoTokenizer.from_pretrained(m["hf_id"], trust_remote_code=m["trust_remote_code"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(m["hf_id"], dtype=_torch_dtype(m["dtype"]),
                                                 trust_remote_code=m["trust_remote_code"],
                                                 use_safetensors=True, attn_implementation="sdpa")
    tok.save_pretrained(str(out))
    model.save_pretrained(str(out), safe_serialization=True)
    return {"source": m["hf_id"], "params": sum(p.numel() for p in model.parameters())}


def save_gguf(cfg: dict, out: Path) -> dict:
    """Dequantize a GGUF file (frontier.gguf_file) once into the ordinary base checkpoint:
    safetensors weights + the tokenizer (with its chat template)."""
    from . import gguf_file

    m = cfg["model"]
    source = gguf_file.describe(m)
    model, tok = gguf_file.convert(m, _torch_dtype(m["dtype"]))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    tok.save_pretrained(str(out))
    model.save_pretrained(str(out), safe_serialization=True)
    return {"source": source, "params": sum(p.numel() for p in model.parameters())}


def run(cfg: dict, out_dir: Path, *, tracking_cfg: Optional[dict] = None, sweep: str = "",
        work_dir: str = "work") -> dict:
    """Build the base checkpoint into `out_dir` (a `_ckpt` dir), atomically."""
    started = time.time()
    name = cfg["model"]["name"]
    with tracking.run(tracking_cfg, job_type="base", group=sweep, name=f"base/{name}", config=cfg,
                      work_dir=work_dir) as wb:
        def write(tmp: Path) -> dict:
            if cfg["model"]["source"] == "embedded":
                return train_embedded(cfg, tmp, wb)
            if cfg["model"]["source"] == "gguf":
                return save_gguf(cfg, tmp)
            return save_hf(cfg, tmp)

        manifest = checkpoint.save_stage(Path(out_dir), stage="base", config=cfg, parent=None,
                                         write=write, started=started)
        wb.summary(manifest.get("train", {}))
    return manifest


def load(ckpt_dir: Path, manifest: dict, device: str = "cpu"):
    """(model, tokenizer) of a base checkpoint; files were verified by the caller."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = manifest["config"]["model"]
    trust = bool(m.get("trust_remote_code", False))
    tok = AutoTokenizer.from_pretrained(str(ckpt_dir), trust_remote_code=trust)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(ckpt_dir), dtype=_torch_dtype(m["dtype"]),
                                                 trust_remote_code=trust, use_safetensors=True,
                                                 attn_implementation="sdpa")
    return model.to(device).eval(), tok
