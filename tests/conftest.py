"""Shared fixtures: a micro embedded model trained once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("FRONTIER_NO_WANDB", "1")  # unit tests; integration tests turn W&B on
ROOT = Path(__file__).resolve().parents[1]


def micro_cfg(steps: int = 20) -> dict:
    from frontier import config

    cfg = config.compose((("model", "micro"),))
    cfg["model"]["train"]["steps"] = steps
    cfg["data"]["max_mb"] = 0.3
    return {"model": cfg["model"], "data": cfg["data"]}


@pytest.fixture(scope="session")
def micro_base(tmp_path_factory) -> Path:
    """A `_ckpt` dir: the micro Llama trained for a few steps by frontier.base."""
    from frontier import base

    out = tmp_path_factory.mktemp("micro") / "base" / "_ckpt"
    base.run(micro_cfg(), out)
    return out


@pytest.fixture(scope="session")
def micro_chain(micro_base, tmp_path_factory):
    """Build (and cache) base → [quantize] → [surgery] chains: micro_chain(quant, attention) → ckpt dir."""
    from frontier import config, quantize, surgery

    root = tmp_path_factory.mktemp("chains")
    cache: dict = {}

    def build(quant: str = "none", attention: str = "softmax", **attn_overrides) -> Path:
        key = (quant, attention, tuple(sorted(attn_overrides.items())))
        if key in cache:
            return cache[key]
        parent = micro_base
        if quant != "none":
            q = config.compose((("quant", quant),))["quant"]
            out = root / quant / "_ckpt"
            if not out.exists():
                quantize.run({"quant": q}, parent, out)
            parent = out
        if attention != "softmax":
            a = {**config.compose((("attention", attention),))["attention"], **attn_overrides}
            tag = "-".join(f"{k}={v}" for k, v in sorted(attn_overrides.items()))
            out = root / quant / f"{attention}{tag}" / "_ckpt"
            surgery.run({"attention": a}, parent, out)
            parent = out
        cache[key] = parent
        return parent

    return build
