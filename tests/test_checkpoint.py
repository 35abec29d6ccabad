"""Atomic writes, manifests with sha256, integrity checks, chains of deltas."""
import json

import pytest

from frontier import checkpoint as ck


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "a" / "_ckpt"
    with pytest.raises(RuntimeError):
        with ck.atomic_dir(final) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 10)
            raise RuntimeError("killed")
    assert not final.exists()
    assert list((tmp_path / "a").iterdir()) == []


def test_atomic_dir_replaces_previous(tmp_path):
    final = tmp_path / "_ckpt"
    for content in (b"old", b"new"):
        with ck.atomic_dir(final) as tmp:
            (tmp / "f").write_bytes(content)
    assert (final / "f").read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["_ckpt"]


def test_manifest_hashes_and_tamper_detection(tmp_path):
    parent = tmp_path / "p" / "_ckpt"
    child = tmp_path / "p" / "c" / "_ckpt"
    ck.save_stage(parent, stage="base", config={"a": 1}, parent=None,
                  write=lambda d: (d / "w.bin").write_bytes(b"abc") and None, started=0.0)
    m = ck.save_stage(child, stage="quantize", config={"b": 2}, parent=parent,
                      write=lambda d: {"extra": 1} if (d / "q.bin").write_bytes(b"q") else None, started=0.0)
    assert m["parent"] == "../../_ckpt" and m["extra"] == 1
    assert m["files"]["q.bin"]["sha256"] == ck.sha256_file(child / "q.bin")
    assert set(m["versions"]) >= {"torch", "transformers", "torchao"}
    links = ck.chain(child)
    assert [x[1]["stage"] for x in links] == ["base", "quantize"]
    (parent / "w.bin").write_bytes(b"abd")
    with pytest.raises(ck.IntegrityError, match="does not match the manifest"):
        ck.chain(child)
    (parent / "w.bin").unlink()
    with pytest.raises(ck.IntegrityError, match="missing"):
        ck.read_manifest(parent)


def test_incomplete_dir_is_not_a_checkpoint(tmp_path):
    (tmp_path / "_ckpt").mkdir()
    with pytest.raises(ck.IntegrityError, match="no manifest.json"):
        ck.read_manifest(tmp_path / "_ckpt")


def test_atomic_json(tmp_path):
    ck.atomic_write_json(tmp_path / "m.json", {"x": 1})
    assert json.loads((tmp_path / "m.json").read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
