"""Text and token data, built offline.

`corpus: embedded` is the Python standard library's own sources (on every machine that
runs Python) mixed, at training time, with synthetic key-value recall sequences so that
the embedded model has measurable in-context recall. A local text file/folder or an HF
dataset id (`name[:config]`, via the `datasets` package) are the real loading paths.

Splits are by document (a file, or a dataset row), chosen by a hash: deterministic.
"""
from __future__ import annotations

import hashlib
import random
import sysconfig
from pathlib import Path
from typing import Iterator, Optional

KV_ALPHABET = "abcdefghijklmnopqrstuvwxyz"
KV_SEP = " ; "


# ------------------------------------------------------------------ documents
def _embedded_documents(max_bytes: int) -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for p in sorted(root.rglob("*.py")):
        rel = str(p.relative_to(root))
        if "site-packages" in rel or "/test" in rel or rel.startswith("test"):
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        docs.append((rel, text))
        total += len(text)
        if total >= max_bytes:
            break
    return docs


def _local_documents(path: Path, max_bytes: int) -> list[tuple[str, str]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    docs, total = [], 0
    for p in files:
        text = p.read_text(encoding="utf-8", errors="replace")
        docs.append((str(p), text))
        total += len(text)
        if total >= max_bytes:
            break
    return docs


def _hf_documents(spec: str, max_bytes: int) -> list[tuple[str, str]]:
    try:
        import datasets  # noqa: F401  (optional: not needed for the embedded corpus)
    except ImportError as e:
        raise RuntimeError(f"data.corpus={spec!r} is an HF dataset id; install the `datasets` package") from e
    name, _, conf = spec.partition(":")
    ds = datasets.load_dataset(name, conf or None, split="train")
    docs, total = [], 0
    for i, row in enumerate(ds):
        text = row.get("text") or ""
        if text.strip():
            docs.append((f"{name}#{i}", text))
            total += len(text)
        if total >= max_bytes:
            break
    return docs


def documents(data_cfg: dict) -> list[tuple[str, str]]:
    max_bytes = int(data_cfg["max_mb"] * 1e6)
    corpus = data_cfg["corpus"]
    if corpus == "embedded":
        return _embedded_documents(max_bytes)
    if Path(corpus).exists():
        return _local_documents(Path(corpus), max_bytes)
    return _hf_documents(corpus, max_bytes)


def split_documents(docs: list[tuple[str, str]], heldout_fraction: float, seed: int = 0):
    """(train, heldout) by a hash of the document name: stable when the corpus grows."""
    train, held = [], []
    for name, text in docs:
        h = int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (held if h < heldout_fraction else train).append(text)
    if not held:  # tiny corpora: keep at least one document out
        held.append(train.pop())
    return train, held


# ------------------------------------------------------------------ synthetic recall
def kv_pairs(rng: random.Random, n: int, key_len: int = 3) -> list[tuple[str, str]]:
    keys: set = set()
    while len(keys) < n:
        keys.add("".join(rng.choice(KV_ALPHABET) for _ in range(key_len)))
    ordered = sorted(keys)  # a set's order depends on the hash seed; the rng alone decides
    rng.shuffle(ordered)
    return [(k, f"{rng.randrange(100):02d}") for k in ordered]


def kv_text(pairs: list[tuple[str, str]]) -> str:
    return "KV " + KV_SEP.join(f"{k}:{v}" for k, v in pairs)


def kv_recall_example(rng: random.Random, n_pairs: int, depth: float = 0.5) -> tuple[str, str]:
    """A prompt listing `n_pairs` key:value pairs, then a query for the key at `depth`.

    Returns (prompt, answer): the model must continue `prompt` with `answer`.
    """
    pairs = kv_pairs(rng, n_pairs)
    k, v = pairs[min(int(depth * n_pairs), n_pairs - 1)]
    return f"{kv_text(pairs)} ? {k}:", v


def kv_training_text(rng: random.Random, n_pairs: int, n_queries: int) -> str:
    pairs = kv_pairs(rng, n_pairs)
    queries = [pairs[rng.randrange(n_pairs)] for _ in range(n_queries)]
    return kv_text(pairs) + "".join(f" ? {k}:{v}" for k, v in queries) + "\n"


# ------------------------------------------------------------------ tokenizer + tokens
def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Optional[Path] = None):
    """A byte-level BPE tokenizer trained offline, wrapped as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|pad|>")
    fast.padding_side = "left"
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def encode_documents(tokenizer, texts: list[str]):
    """One flat LongTensor: documents joined by EOS."""
    import torch

    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def token_splits(tokenizer, data_cfg: dict):
    """(train_ids, heldout_ids) flat token tensors of the configured corpus."""
    train, held = split_documents(documents(data_cfg), data_cfg["heldout_fraction"], data_cfg["seed"])
    return encode_documents(tokenizer, train), encode_documents(tokenizer, held)


TOKEN_CACHE_VERSION = 1
TOKEN_CACHE_KEYS = ("corpus", "max_mb", "heldout_fraction", "seed")  # what token_splits depends on


def corpus_fingerprint(data_cfg: dict) -> str:
    """What identifies the corpus' content without reading it: the Python build for the embedded
    corpus, the files' names, sizes and mtimes for a local one, the id for an HF dataset."""
    corpus = data_cfg["corpus"]
    if corpus == "embedded":
        import sys

        return f"embedded:{sys.version}:{sysconfig.get_paths()['stdlib']}"
    path = Path(corpus)
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        h = hashlib.sha256()
        for p in files:
            st = p.stat()
            h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return f"local:{h.hexdigest()}"
    return f"hf:{corpus}"


def token_cache_key(tokenizer, data_cfg: dict) -> str:
    """Hash of everything `token_splits(tokenizer, data_cfg)` depends on."""
    import json

    try:
        tok = tokenizer.backend_tokenizer.to_str()
    except Exception:  # noqa: BLE001 - a slow tokenizer: its vocabulary
        tok = json.dumps(sorted(tokenizer.get_vocab().items()))
    key = {"v": TOKEN_CACHE_VERSION, "tokenizer": hashlib.sha256(tok.encode()).hexdigest(),
           "eos": tokenizer.eos_token_id, "data": {k: data_cfg.get(k) for k in TOKEN_CACHE_KEYS},
           "corpus": corpus_fingerprint(data_cfg)}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cached_token_splits(tokenizer, data_cfg: dict, cache_dir: Optional[Path]):
    """`token_splits`, through a file cache in `cache_dir` keyed by `token_cache_key` (None: no cache).

    Every fine-tune of a sweep tokenizes the same corpus with the same tokenizer (~2 s for the
    embedded 3 MB on one core); the first writes `<cache_dir>/tokens-<key>.safetensors`
    (atomically), the others read it. A cache that cannot be read or written is ignored."""
    if cache_dir is None:
        return token_splits(tokenizer, data_cfg)
    import os
    import uuid

    from safetensors.torch import load_file, save_file

    path = Path(cache_dir) / f"tokens-{token_cache_key(tokenizer, data_cfg)}.safetensors"
    if path.exists():
        try:
            t = load_file(str(path))
            return t["train"], t["heldout"]
        except Exception:  # noqa: BLE001 - unreadable: tokenize again, and rewrite it
            pass
    train_ids, held_ids = token_splits(tokenizer, data_cfg)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        save_file({"train": train_ids.contiguous(), "heldout": held_ids.contiguous()}, str(tmp))
        os.replace(tmp, path)
    except OSError:
        pass
    return train_ids, held_ids


def batches(ids, seq_len: int, batch: int, seed: int, *, tokenizer=None, recall_fraction: float = 0.0,
            repeat_fraction: float = 0.0, rank: int = 0, world: int = 1) -> Iterator:
    """Endless [batch, seq_len] LongTensor batches of random windows of `ids`.

    With `recall_fraction` > 0 (needs the tokenizer) that share of rows is a synthetic
    key-value recall sequence instead, and with `repeat_fraction` > 0 that share repeats one
    corpus window (`_repeat_row`). `rank`/`world` give each data-parallel process
    its own stream.
    """
    import torch

    g = torch.Generator().manual_seed(seed * 1000 + rank)
    rng = random.Random(seed * 1000 + rank)
    n = ids.numel() - seq_len - 1
    if n <= 0:
        raise ValueError(f"corpus has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    while True:
        rows = []
        for _ in range(batch):
            r = rng.random()
            if tokenizer is not None and r < recall_fraction:
                rows.append(_recall_row(tokenizer, rng, seq_len))
            elif recall_fraction <= r < recall_fraction + repeat_fraction:
                rows.append(_repeat_row(ids, g, rng, seq_len))
            else:
                start = int(torch.randint(0, n, (1,), generator=g))
                rows.append(ids[start:start + seq_len])
        yield torch.stack(rows)


def _repeat_row(ids, g, rng: random.Random, seq_len: int):
    """A random corpus window of 8 .. seq_len/2 tokens, repeated to fill the row: every token
    after the first copy is predictable only by looking back (the induction / copying signal
    that in-context recall is built on)."""
    import torch

    span = rng.randint(8, max(9, seq_len // 2))
    start = int(torch.randint(0, ids.numel() - span, (1,), generator=g))
    seg = ids[start:start + span]
    return seg.repeat(seq_len // span + 1)[:seq_len].clone()


def _recall_row(tokenizer, rng: random.Random, seq_len: int):
    import torch

    n_pairs = rng.randint(4, max(5, seq_len // 8))
    text = kv_training_text(rng, n_pairs, n_queries=max(2, n_pairs // 2))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < seq_len:
        ids = ids + [tokenizer.eos_token_id] + tokenizer(kv_training_text(rng, n_pairs, n_pairs // 2),
                                                         add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[:seq_len], dtype=torch.long)
