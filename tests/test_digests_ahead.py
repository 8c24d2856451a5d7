"""Source digests computed ahead (while torch is imported) are the digests of the files as they are."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from deepfuse_cli.formats import files
from deepfuse_cli.formats.hf_layout import likely_weight_files

from .helpers import cli


def _wait(path: Path) -> None:
    ahead = files._AHEAD[os.path.realpath(path)][1]
    ahead.result(timeout=30)


def test_prefetched_digest_is_the_files_sha256(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes(os.urandom(3 * 2**20 + 17))
    files.prefetch_sha256([p, tmp_path / "missing.safetensors", tmp_path])
    _wait(p)
    assert files.sha256_file(p) == hashlib.sha256(p.read_bytes()).hexdigest()
    assert os.path.realpath(tmp_path / "missing.safetensors") not in files._AHEAD


def test_a_file_changed_after_prefetch_is_hashed_again(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes(b"a" * 4096)
    files.prefetch_sha256([p])
    _wait(p)
    time.sleep(0.01)
    p.write_bytes(b"b" * 5000)  # new size and mtime: the prefetched digest no longer applies
    assert files.sha256_file(p) == hashlib.sha256(b"b" * 5000).hexdigest()


def test_a_failed_prefetch_is_retried_and_reports_its_own_error(tmp_path, monkeypatch):
    p = tmp_path / "model.safetensors"
    p.write_bytes(b"x" * 100)
    real = files._sha256_now
    calls = []

    def flaky(path):
        calls.append(path)
        if len(calls) == 1:
            raise OSError("transient")
        return real(path)

    monkeypatch.setattr(files, "_sha256_now", flaky)
    files.prefetch_sha256([p])
    with pytest.raises(OSError):
        _wait(p)
    assert files.sha256_file(p) == hashlib.sha256(b"x" * 100).hexdigest()
    assert len(calls) == 2


def test_likely_weight_files(tmp_path):
    """Only files the checkpoint references: its index's shards, else its single weights file; never
    files found by globbing (an unlisted shard, a link to a file elsewhere)."""
    d = tmp_path / "m"
    d.mkdir()
    assert likely_weight_files(d) == []
    (d / "pytorch_model.bin").write_bytes(b"")
    assert likely_weight_files(d) == [d / "pytorch_model.bin"]
    for name in ("model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors", "other.safetensors"):
        (d / name).write_bytes(b"")
    (tmp_path / "elsewhere.safetensors").write_bytes(b"")
    (d / "model-00003-of-00002.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    assert likely_weight_files(d) == [d / "pytorch_model.bin"]  # no index: the reader takes pytorch_model.bin
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "b": "model-00002-of-00002.safetensors", "a": "model-00001-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors"}}))
    assert [p.name for p in likely_weight_files(d)] == ["model-00002-of-00002.safetensors",
                                                       "model-00001-of-00002.safetensors"]
    assert likely_weight_files(d / "other.safetensors") == [d / "other.safetensors"]
    assert likely_weight_files(tmp_path / "config.json") == []
    for bad in ({"weight_map": {"a": "../elsewhere.safetensors"}}, {"weight_map": {"a": str(tmp_path / "x")}}, [1]):
        (d / "model.safetensors.index.json").write_text(json.dumps(bad))
        assert likely_weight_files(d) == []  # nothing outside the directory: the reader reports the index
    (d / "model.safetensors.index.json").write_text("[" * 100_000 + "]" * 100_000)
    assert likely_weight_files(d) == []


def test_manifest_digests_match_the_sources(hf_fixtures, tmp_path):
    src = hf_fixtures / "llama-a"
    out = tmp_path / "out"
    cli("self-fuse", str(src), "--times", "2", "-o", str(out), "-q")
    manifest = json.loads((out / "deepfuse.json").read_text())
    recorded = manifest["sources"][0]["files"]
    assert recorded and all(v == hashlib.sha256((src / k).read_bytes()).hexdigest() for k, v in recorded.items())
