"""Process set-up shared by every entry point (workflow scripts, CLI, workers)."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Optional


def quiet_libraries() -> None:
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("WANDB_SILENT", "true")
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*register_constant.*")
    for noisy in ("torch.utils._pytree", "torchao", "torchao.kernel", "torchao.quantization"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def set_threads(threads: Optional[int]) -> None:
    """Use exactly the cores Snakemake gave the job: oversubscribed OpenMP threads on a
    shared node cost far more than they bring."""
    if not threads:
        return
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(int(threads))


@contextlib.contextmanager
def stage_logging(log_path: Optional[str], stage: str, target: str,
                  threads: Optional[int] = None) -> Iterator[logging.Logger]:
    """Log records to the rule's log file (and one line each to stderr); progress bars stay on stderr."""
    quiet_libraries()
    set_threads(threads)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    handlers = []
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_path, mode="w")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(fh)
    sh = logging.StreamHandler(sys.stderr)
    sh.setLevel(logging.WARNING)
    sh.setFormatter(logging.Formatter(f"[{stage}] %(levelname)s %(message)s"))
    handlers.append(sh)
    for h in handlers:
        root.addHandler(h)
    log = logging.getLogger(f"frontier.{stage}")
    t0 = time.time()
    log.info("start %s %s", stage, target)
    try:
        yield log
        log.info("done %s %s in %.1fs", stage, target, time.time() - t0)
    except BaseException:
        log.exception("failed %s %s after %.1fs", stage, target, time.time() - t0)
        raise
    finally:
        for h in handlers:
            root.removeHandler(h)
            h.close()


@contextlib.contextmanager
def failure_recorded(stage: str, ckpt_dir, config: dict, parent=None) -> Iterator[None]:
    """Run a stage; if it raises, write a `status: failed` manifest with the reason instead of
    breaking the sweep (the evaluate stage then records the point as failed). Kills and
    interrupts are not caught: they leave nothing, and the job simply runs again."""
    started = time.time()
    try:
        yield
    except Exception as e:  # noqa: BLE001 - recorded, not lost
        from . import checkpoint

        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500]
        logging.getLogger(f"frontier.{stage}").exception("%s failed; recorded as a failed point", stage)
        checkpoint.save_failed(Path(ckpt_dir), stage=stage, config=config, parent=parent, reason=reason,
                               started=started)
        print(f"[{stage}] FAILED (recorded in {ckpt_dir}/manifest.json): {reason}", file=sys.stderr)
