"""lm-evaluation-harness tasks, run in-process on the point's loaded model.

The model the evaluate stage loaded (quantized, surgered, fine-tuned: whatever the chain
made) is wrapped as `lm_eval.models.huggingface.HFLM(pretrained=<model>, tokenizer=<tok>)`
and handed to `lm_eval.simple_evaluate(model=..., tasks=[...])`, so the harness scores
exactly what the other metrics measure -- nothing is reloaded from a hub id.

Tasks come from `eval.harness.tasks` (names of lm-eval tasks or groups); extra task YAMLs
(e.g. a task on local jsonl files: `dataset_path: json` + `dataset_kwargs.data_files`) come
from `eval.harness.include_path`. When every requested task is found under include_path,
lm-eval's own ~15k task definitions are not indexed (that alone takes ~10 s).

Results become metrics.json quality keys `harness.<task>.<metric>` (`<metric>_<filter>`
for a filter other than lm-eval's default "none"); stderr entries are dropped. A group's
aggregate row stands for its subtasks.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Optional

log = logging.getLogger(__name__)
INSTALL_HINT = "pip install lm-eval==0.4.13"


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"eval.harness.tasks needs lm-evaluation-harness, which is not installed ({INSTALL_HINT}); "
                           "or set eval.harness.tasks: []") from e
    return lm_eval


def version() -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version as _v

    try:
        return _v("lm_eval")
    except PackageNotFoundError:
        return None


# ------------------------------------------------------------------ results (pure)
def metric_name(task: str, key: str) -> Optional[str]:
    """`harness.<task>.<metric>` for an lm-eval result key "<metric>,<filter>" (or a bare
    "<metric>"); None for stderr entries and lm-eval's bookkeeping keys."""
    metric, _, filt = key.partition(",")
    if not metric or metric in ("alias", "name", "sample_len", "samples") or metric.endswith("_stderr"):
        return None
    suffix = "" if filt in ("", "none") else f"_{filt}"
    return f"harness.{task}.{metric}{suffix}"


def top_level(results: dict, group_subtasks: Optional[dict] = None) -> list[str]:
    """Task names of `results` not covered by a group also in `results` (the aggregate row
    stands for them), in results order."""
    covered: set = set()

    def walk(g: str) -> None:
        for sub in (group_subtasks or {}).get(g, []) or []:
            if sub not in covered:
                covered.add(sub)
                walk(sub)

    for g in results:
        walk(g)
    return [t for t in results if t not in covered]


def flatten_results(out: dict) -> dict:
    """{"harness.<task>.<metric>": float} from simple_evaluate's return value (its
    "results" and "group_subtasks"); non-numeric and non-finite values are dropped."""
    results = out.get("results") or {}
    flat: dict = {}
    for task in top_level(results, out.get("group_subtasks")):
        for key, value in (results[task] or {}).items():
            name = metric_name(task, key)
            if name is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(float(value)):
                flat[name] = float(value)
    return flat


# ------------------------------------------------------------------ running
def task_manager(tasks: list[str], include_path: Optional[str] = None):
    """A TaskManager that knows `tasks`: include_path alone when it has them all (fast),
    else include_path plus lm-eval's own tasks. Raises ValueError naming unknown tasks."""
    from lm_eval.tasks import TaskManager

    if include_path:
        tm = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in tm.all_tasks for t in tasks):
            return tm
    tm = TaskManager(include_path=str(include_path) if include_path else None)
    missing = [t for t in tasks if t not in tm.all_tasks]
    if missing:
        where = f" or under include_path {include_path}" if include_path else ""
        raise ValueError(f"unknown lm-eval task(s) {', '.join(missing)}: not among lm-eval's tasks{where}")
    return tm


@contextlib.contextmanager
def _frozen(model):
    """HFLM calls model.tie_weights() on a model object: that must not re-tie anything on a
    point whose lm_head was changed (quantized) after loading -- the harness scores the model
    as it is."""
    had = "tie_weights" in vars(model)
    old = vars(model).get("tie_weights")
    model.tie_weights = lambda *a, **k: None
    try:
        yield model
    finally:
        if had:
            model.tie_weights = old
        else:
            del model.tie_weights


def evaluate_harness(model, tokenizer, harness_cfg: Optional[dict], *, seed: int = 0) -> dict:
    """{"harness.<task>.<metric>": value} of the `eval.harness` tasks on `model`; {} when
    there are none. Few-shot sampling and the harness's own seeds come from `seed`."""
    cfg = dict(harness_cfg or {})
    tasks = list(cfg.get("tasks") or [])
    if not tasks:
        return {}
    _require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tm = task_manager(tasks, cfg.get("include_path"))
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    limit: Any = cfg.get("limit")
    if limit is not None:
        limit = int(limit) if float(limit) >= 1 else float(limit)
    with _frozen(model):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=int(cfg.get("batch_size", 8)),
                  max_length=int(max_pos) if max_pos else None)
    log.info("harness: %s (limit %s, few-shot %s)", ", ".join(tasks), limit, cfg.get("num_fewshot"))
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=tm, num_fewshot=cfg.get("num_fewshot"),
                          limit=limit, log_samples=False, bootstrap_iters=0, random_seed=seed,
                          numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                          verbosity="WARNING")
    if out is None:  # a non-zero rank under torch.distributed; never the case in-process
        return {}
    flat = flatten_results(out)
    log.info("harness: %s", ", ".join(f"{k}={v:.4f}" for k, v in flat.items()))
    return flat
