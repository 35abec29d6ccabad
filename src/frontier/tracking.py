"""W&B logging that never breaks a run.

W&B mirrors results (metrics.json / Parquet are the store). Offline by default: runs land
in `<work_dir>/wandb` and sync later with `wandb sync`. The API key comes from the
environment (WANDB_API_KEY) and is never written into configs, manifests or logs.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator, Optional

log = logging.getLogger(__name__)
SECRET_KEYS = ("WANDB_API_KEY",)


def redact(obj: Any) -> Any:
    """Drop anything that looks like a secret from a config before it is logged or written."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if any(s in str(k).lower() for s in ("api_key", "token", "secret", "password")) else redact(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        for name in SECRET_KEYS:
            val = os.environ.get(name)
            if val and val in obj:
                obj = obj.replace(val, "<redacted>")
    return obj


class Run:
    """A thin handle: `log(dict)` and `summary(dict)`; no-ops when W&B is off or failed."""

    def __init__(self, wb_run=None):
        self._run = wb_run

    @property
    def active(self) -> bool:
        return self._run is not None

    def ref(self) -> Optional[dict]:
        """{"id", "url", "dir"} of the W&B run (url: None offline, where `wandb sync <dir>`
        uploads it later), or None without a run."""
        if self._run is None:
            return None
        try:
            offline = getattr(getattr(self._run, "settings", None), "mode", None) == "offline"
            url = None if offline else self._run.url
            return {"id": self._run.id, "url": url or None, "dir": os.path.dirname(self._run.dir)}
        except Exception as e:  # noqa: BLE001 - tracking must never break a run
            log.warning("wandb run reference failed: %s", e)
            return None

    def log(self, data: dict, step: Optional[int] = None) -> None:
        if self._run is None:
            return
        try:
            self._run.log(data, step=step)
        except Exception as e:  # noqa: BLE001 - tracking must never break a run
            log.warning("wandb log failed: %s", e)

    def summary(self, data: dict) -> None:
        if self._run is None:
            return
        try:
            self._run.summary.update(data)
        except Exception as e:  # noqa: BLE001
            log.warning("wandb summary failed: %s", e)

    def table(self, key: str, columns: list, rows: list) -> None:
        if self._run is None:
            return
        try:
            import wandb

            self._run.log({key: wandb.Table(columns=columns, data=rows)})
        except Exception as e:  # noqa: BLE001
            log.warning("wandb table failed: %s", e)


@contextlib.contextmanager
def run(tracking: Optional[dict], *, job_type: str, group: str, name: str, config: dict,
        work_dir: str = "work") -> Iterator[Run]:
    """Open a W&B run (group = sweep, job_type = stage) or a no-op handle."""
    if not tracking or tracking.get("mode", "disabled") == "disabled" or os.environ.get("FRONTIER_NO_WANDB"):
        yield Run(None)
        return
    wb = None
    try:
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_DISABLE_GIT", "true")
        import wandb

        wdir = os.path.abspath(work_dir)
        os.makedirs(os.path.join(wdir, "wandb"), exist_ok=True)
        wb = wandb.init(project=tracking.get("project", "frontier"), entity=tracking.get("entity"),
                        mode=tracking["mode"], group=group, job_type=job_type, name=name[:120],
                        config=redact(config), dir=wdir, reinit="finish_previous",
                        settings=wandb.Settings(console="off", x_disable_stats=True, silent=True))
    except Exception as e:  # noqa: BLE001 - never required to succeed
        log.warning("wandb unavailable (%s); continuing without tracking", e)
        wb = None
    try:
        yield Run(wb)
    finally:
        if wb is not None:
            try:
                wb.finish()
            except Exception as e:  # noqa: BLE001
                log.warning("wandb finish failed: %s", e)
