"""A Hugging Face Hub cache laid out as huggingface_hub documents it, made from shipped fixtures.

    <cache>/models--<org>--<name>/
        blobs/<sha256>                          the files' bytes
        refs/<branch or tag>                    the commit hash it points at
        snapshots/<commit>/<file> -> ../../blobs/<sha256>

Tests point ``HF_HUB_CACHE`` at it with ``HF_HUB_OFFLINE=1``, so that Hub ids resolve through
huggingface_hub itself, without network.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deepfuse_cli.cli import app

#: commit hashes of the repositories tests make
A, B = "a" * 40, "b" * 40
runner = CliRunner()


def invoke(*args, expect: int = 0):
    """Run the CLI in-process; the result and everything it printed (stdout, stderr)."""
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    try:
        err = result.stderr
    except ValueError:  # stderr mixed into output
        err = ""
    text = result.output if err in result.output else result.output + err
    assert result.exit_code == expect, f"exit {result.exit_code} != {expect} for {args}:\n{text}"
    return result, text


def add_repo(cache: Path, repo_id: str, source: Path, commit: str, refs: tuple[str, ...] = ("main",),
             skip: tuple[str, ...] = ()) -> Path:
    """Put every file of the directory ``source`` into ``cache`` as ``repo_id`` at ``commit``; the
    snapshot directory."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    blobs, snapshot = repo / "blobs", repo / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in sorted(source.iterdir()):
        if not f.is_file() or f.name in skip:
            continue
        data = f.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache that huggingface_hub uses, offline."""
    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    return cache
