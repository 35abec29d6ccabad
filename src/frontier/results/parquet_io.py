"""Reading and writing the results: Parquet tables with the schema-level metadata, every file
written atomically (a temp file in the same directory, then ``os.replace``)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from importlib import metadata as _md
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from frontier.results.schema import (
    _FLOAT_BASE,
    _INT_BASE,
    _STR_BASE,
    _STR_TAIL,
    SCHEMA_VERSION,
    to_float,
    to_int,
    to_str,
)

TABLES = ("runs", "costs", "frontier", "crossover")


def library_versions() -> dict[str, str]:
    out = {}
    for pkg in ("frontier", "pyarrow", "numpy", "torch", "transformers", "torchao", "matplotlib"):
        try:
            out[pkg] = _md.version(pkg)
        except _md.PackageNotFoundError:
            pass
    return out


def git_commit() -> str:
    env = os.environ.get("FRONTIER_GIT_COMMIT")
    if env:
        return env
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                           capture_output=True, text=True, timeout=5)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def file_metadata(sweep: str) -> dict[str, str]:
    """The key/value metadata every results file carries (``FILE_METADATA`` documents it)."""
    return {
        "sweep": sweep,
        "schema_version": SCHEMA_VERSION,
        "versions": json.dumps(library_versions(), sort_keys=True),
        "git_commit": git_commit(),
    }


def _atomic(path: Path, write, suffix: str = ".tmp") -> Path:
    """Call ``write(tmp_path)``, then rename the temp file onto ``path`` (mode 0644)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write(table: pa.Table, path: Path, meta: dict[str, str]) -> None:
    """Write ``table`` to ``path`` with ``meta`` added to its schema metadata."""
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
    _atomic(path, lambda tmp: pq.write_table(table, tmp))


def write_text(path: Path, text: str) -> Path:
    """Write a text file (HTML, JSON) atomically."""
    return _atomic(path, lambda tmp: Path(tmp).write_text(text))


def atomic_save(path: Path, save, suffix: str = ".tmp") -> Path:
    """``save(tmp_path)`` (e.g. a matplotlib ``savefig``), then rename onto ``path``."""
    return _atomic(path, save, suffix)


def read_metadata(path: str | Path) -> dict[str, str]:
    """Schema-level key/value metadata of a Parquet file, decoded."""
    md = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in md.items()}


def read_rows(out_dir: Path, name: str) -> list[dict]:
    """``<out_dir>/<name>.parquet`` as a list of dicts; [] when the file is absent."""
    p = Path(out_dir) / f"{name}.parquet"
    return pq.read_table(p).to_pylist() if p.exists() else []


def sweep_metadata(out_dir: Path) -> dict[str, str]:
    """The metadata of ``runs.parquet`` ({} without one)."""
    p = Path(out_dir) / "runs.parquet"
    return read_metadata(p) if p.exists() else {}


def runs_table(rows: list[dict], quality: list[str]) -> pa.Table:
    """``runs.parquet``: the fixed columns, then ``quality`` (in that order), ``ovr.*``,
    ``cfg.*``, ``attn.*`` (sorted), then the tail columns."""
    cols: set[str] = set()
    for r in rows:
        cols.update(r)
    ovr = sorted(c for c in cols if c.startswith("ovr."))
    cfg = sorted(c for c in cols if c.startswith("cfg."))
    attn = sorted(c for c in cols if c.startswith("attn."))
    fields, arrays = [], []

    def add(name: str, typ: pa.DataType, conv) -> None:
        fields.append(pa.field(name, typ))
        arrays.append(pa.array([conv(r.get(name)) for r in rows], type=typ))

    for c in _STR_BASE:
        add(c, pa.string(), to_str)
    for c in _INT_BASE:
        add(c, pa.int64(), to_int)
    for c in _FLOAT_BASE:
        add(c, pa.float64(), to_float)
    for c in quality:
        add(c, pa.float64(), to_float)
    for c in ovr + cfg + attn:
        add(c, pa.string(), to_str)
    for c in _STR_TAIL:
        add(c, pa.string(), to_str)
    meta = {"quality_columns": json.dumps(quality)}
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=meta))


def table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)
