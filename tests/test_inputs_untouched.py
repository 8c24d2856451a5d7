"""Inputs are only ever read: every command, on every input format, leaves its inputs byte-identical
(and their modification times unchanged)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .conftest import FIXTURES, HF
from .helpers import cli, digest_tree


def snapshot(paths: list[Path]) -> dict:
    out = {}
    for p in paths:
        files = [f for f in sorted(p.rglob("*")) if f.is_file()] if p.is_dir() else [p]
        out[str(p)] = (digest_tree(p), {str(f): os.stat(f).st_mtime_ns for f in files})
    return out


T5X_A, T5X_B = FIXTURES / "t5x" / "legacy-a", FIXTURES / "t5x" / "legacy-b"
ORBAX_A = FIXTURES / "orbax" / "std-a"


@pytest.mark.parametrize("args, inputs", [
    (["plan", HF / "llama-a", HF / "llama-b", "--json"], [HF / "llama-a", HF / "llama-b"]),
    (["inspect", HF / "gpt2-b-bin-sharded"], [HF / "gpt2-b-bin-sharded"]),
    (["rules", "check", "llama", HF / "llama-b-sharded"], [HF / "llama-b-sharded"]),
    (["fuse", HF / "llama-a-bin", HF / "llama-b-sharded", "-o", "{out}", "-q", "--verify"],
     [HF / "llama-a-bin", HF / "llama-b-sharded"]),
    (["self-fuse", HF / "t5v10-a", "--times", "3", "--noise-scale", "0.01", "-o", "{out}", "-q"], [HF / "t5v10-a"]),
    (["fuse", T5X_A, ORBAX_A, "--optimizer-state", "fuse", "-o", "{out}", "-q", "--verify"], [T5X_A, ORBAX_A]),
    (["convert", T5X_B, "--to", "safetensors", "-o", "{out}", "-q"], [T5X_B]),
    (["self-fuse", FIXTURES / "orbax" / "mgr-a", "--step", "500", "-o", "{out}", "-q"], [FIXTURES / "orbax" / "mgr-a"]),
], ids=["plan", "inspect", "rules-check", "fuse-bin-sharded+verify", "self-fuse-noise", "fuse-t5x-orbax+verify",
        "convert", "self-fuse-step"])
def test_command_leaves_inputs_untouched(args, inputs, tmp_path):
    before = snapshot(inputs)
    cli(*[str(a).replace("{out}", str(tmp_path / "out")) for a in args])
    assert snapshot(inputs) == before
