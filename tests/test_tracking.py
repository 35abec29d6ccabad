"""frontier.tracking: a run's reference (id, URL, folder) as metrics.json and runs.parquet keep it."""
from pathlib import Path

from frontier import tracking
from frontier.results import runs as results_runs


def test_offline_run_reference(tmp_path, monkeypatch):
    monkeypatch.delenv("FRONTIER_NO_WANDB", raising=False)
    with tracking.run({"mode": "offline", "project": "t"}, job_type="evaluate", group="g", name="p",
                      config={"a": 1}, work_dir=str(tmp_path)) as wb:
        assert wb.active
        ref = wb.ref()
    assert ref["id"] and ref["url"] is None  # offline: no URL until `wandb sync`
    run_dir = Path(ref["dir"])
    assert run_dir.is_dir() and run_dir.name.startswith("offline-run-") and run_dir.name.endswith(ref["id"])
    assert tmp_path in run_dir.parents
    assert results_runs._wandb_link(ref) == f"file://{run_dir}"
    with tracking.run(None, job_type="evaluate", group="g", name="p", config={}) as off:
        assert off.ref() is None


def test_run_row_links_the_wandb_run():
    base = {"point_id": "m/none/softmax/none/e", "status": "ok", "config": {}, "choices": {}}
    online = {**base, "wandb": {"id": "abc", "url": "https://wandb.ai/e/p/runs/abc", "dir": "/w/run-abc"}}
    assert results_runs.run_row(online, "s")["wandb_url"] == "https://wandb.ai/e/p/runs/abc"
    offline = {**base, "wandb": {"id": "abc", "url": None, "dir": "/w/offline-run-abc"}}
    assert results_runs.run_row(offline, "s")["wandb_url"] == "file:///w/offline-run-abc"
    assert results_runs.run_row(base, "s")["wandb_url"] is None
