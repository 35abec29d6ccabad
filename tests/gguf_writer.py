"""Write a tiny Llama GGUF file the way llama.cpp's converter does, for the GGUF source tests.

The tests must not depend on the 98 MB SmolLM2 file, so they write their own: a random tiny
transformers Llama, its tensors renamed to GGUF names (`token_embd`, `blk.N.attn_q`, ...),
q/k rows permuted as llama.cpp's `convert_hf_to_gguf.py` does for RoPE (transformers undoes
that permutation when it loads), 2-D weights stored as Q4_1 or F32 with the `gguf` package's
own quantizer, and a byte-level BPE vocabulary (GPT-2's byte alphabet).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def bytes_to_unicode() -> dict:
    """GPT-2's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (HF rotate-half layout -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_llama(seed: int = 0, *, layers: int = 2, hidden: int = 64, heads: int = 2, kv_heads: int = 1,
               intermediate: int = 128, vocab: int = 260, max_position: int = 256, tie: bool = True):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=hidden // heads, max_position_embeddings=max_position, rope_theta=10000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=257, eos_token_id=258,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)  # not all ones, so a dropped norm would show
    return model


def write_gguf(model, path: Path, *, qtype: str = "Q4_1", name: str = "tiny-llama", truncate: int = 0) -> Path:
    """Write `model` (a transformers LlamaForCausalLM) as a llama GGUF file at `path`."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float((getattr(c, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    qt = getattr(gguf.GGMLQuantizationType, qtype)
    w.add_file_type({"Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1, "F32": gguf.LlamaFileType.ALL_F32,
                     "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype])
    # byte-level BPE: 256 byte tokens + one merge ("ab") + bos/eos/pad + filler up to the vocabulary size, no merges
    table = bytes_to_unicode()
    tokens = [table[b] for b in range(256)] + [table[ord("a")] + table[ord("b")], "<|bos|>", "<|eos|>", "<|pad|>"]
    tokens += [f"<|unused{i}|>" for i in range(c.vocab_size - len(tokens))]
    types = [gguf.TokenType.NORMAL] * 257 + [gguf.TokenType.CONTROL] * (len(tokens) - 257)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([f"{table[ord('a')]} {table[ord('b')]}"])
    w.add_bos_token_id(257)
    w.add_eos_token_id(258)
    w.add_pad_token_id(259)
    w.add_add_bos_token(False)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                 "post_attention_layernorm": "ffn_norm"}
    for i in range(c.num_hidden_layers):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for k, arr in sd.items():
        if k == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if k.endswith("q_proj.weight"):
            arr = _permute(arr, c.num_attention_heads)
        elif k.endswith("k_proj.weight"):
            arr = _permute(arr, c.num_key_value_heads)
        if arr.ndim == 2 and qtype != "F32" and arr.shape[1] % 32 == 0:
            data = gguf.quants.quantize(arr.astype(np.float32), qt)
            w.add_tensor(names[k], data, raw_dtype=qt)
        else:
            w.add_tensor(names[k], arr.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if truncate:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - truncate)
    return path


def dequantized_reference(model, qtype: str = "Q4_1"):
    """A copy of `model` whose 2-D weights went through the gguf package's own quantize +
    dequantize (what a correct GGUF loader must reproduce)."""
    import copy

    import gguf
    import torch

    ref = copy.deepcopy(model)
    if qtype == "F32":
        return ref
    qt = getattr(gguf.GGMLQuantizationType, qtype)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if p.ndim == 2 and p.shape[1] % 32 == 0:
                arr = p.detach().float().numpy()
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(arr, qt), qt)).reshape(p.shape))
    return ref
