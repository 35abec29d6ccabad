"""Shared fixtures: a micro embedded model trained once per test session."""
from __future__ import annotations

import os
import subprocess
import sys
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
                quantize.run({"quant": q, "data": micro_cfg()["data"]}, parent, out)
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


FAKE_WANDB_KEY = "fk-0123456789abcdef0123456789abcdef01234567"
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile")]


def snakemake(workdir: Path, *args: str, check: bool = True, timeout: int = 1500) -> subprocess.CompletedProcess:
    """Run the project's Snakefile in `workdir`, W&B offline, with a fake API key in the environment."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_API_KEY": FAKE_WANDB_KEY}
    env.pop("FRONTIER_NO_WANDB", None)  # integration runs log to W&B (offline)
    r = subprocess.run([*SNAKEMAKE, "--directory", str(workdir), *args], capture_output=True, text=True, env=env,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"snakemake {args} failed:\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}")
    return r


@pytest.fixture(scope="session")
def ci_sweep(tmp_path_factory) -> Path:
    """The ci sweep run once, uninterrupted, through collect; returns its working directory."""
    wd = tmp_path_factory.mktemp("ci_sweep")
    snakemake(wd, "--cores", "2", "--config", "sweep=ci", "--show-failed-logs")
    return wd
