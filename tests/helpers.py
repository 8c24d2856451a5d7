"""Shared helpers for end-to-end tests: run the CLI, load with transformers, compare functions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from deepfuse_cli.cli import app
from deepfuse_cli.formats.files import sha256_file

runner = CliRunner()


def cli(*args: str, expect: int = 0) -> str:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    output = result.output + (result.stderr if hasattr(result, "stderr") and result.stderr_bytes is not None else "")
    assert result.exit_code == expect, f"exit {result.exit_code} != {expect} for {args}:\n{output}"
    return output


def kind_of(path: Path) -> str:
    cfg = json.loads((Path(path) / "config.json").read_text())
    return cfg["model_type"]


def load(path: Path):
    """Load a model directory with transformers; every key must match (no missing/unexpected/mismatched)."""
    import transformers

    mt = kind_of(path)
    cls = transformers.T5ForConditionalGeneration if mt == "t5" else transformers.AutoModelForCausalLM
    model, info = cls.from_pretrained(str(path), output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    assert not bad, f"{path}: {bad}"
    model.eval()
    return model


def probe(vocab: int = 64, batch: int = 2, seq: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(2, vocab, (batch, seq), generator=g),
        "decoder_input_ids": torch.randint(2, vocab, (batch, seq - 2), generator=g),
    }


def run(model, inputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and every hidden state (T5: encoder then decoder)."""
    with torch.no_grad():
        if model.config.model_type == "t5":
            out = model(input_ids=inputs["input_ids"], decoder_input_ids=inputs["decoder_input_ids"],
                        output_hidden_states=True)
            hidden = list(out.encoder_hidden_states) + list(out.decoder_hidden_states)
        else:
            out = model(input_ids=inputs["input_ids"], output_hidden_states=True)
            hidden = list(out.hidden_states)
    return out.logits, hidden


def assert_fused_function(fused_logits, fused_hidden, srcs: list[tuple[torch.Tensor, list[torch.Tensor]]],
                          weights: list[float], rel: float = 1e-5) -> float:
    """Fused logits == weighted average of the sources'; every fused hidden state == concatenation."""
    expected = sum(w * lg for w, (lg, _) in zip(weights, srcs))
    scale = max(float(expected.abs().max()), 1.0)
    err = float((fused_logits - expected).abs().max())
    assert err <= rel * scale, f"logits max abs error {err:.3g} > {rel} x scale {scale:.3g}"
    assert len(fused_hidden) == len(srcs[0][1])
    for layer, h in enumerate(fused_hidden):
        cat = torch.cat([hs[layer] for _, hs in srcs], dim=-1)
        hscale = max(float(cat.abs().max()), 1.0)
        herr = float((h - cat).abs().max())
        assert herr <= rel * hscale, f"hidden state {layer}: fusion property broken (max abs {herr:.3g})"
    return err


def digest_tree(path: Path) -> dict[str, str]:
    path = Path(path)
    files = [p for p in sorted(path.rglob("*")) if p.is_file()] if path.is_dir() else [path]
    return {str(p.relative_to(path) if path.is_dir() else p.name): sha256_file(p) for p in files}


def clean_refusal(result, contains: list[str]) -> str:
    """A CliRunner result that is a clean refusal: exit 2, exactly one ``error:`` line (containing every
    ``contains`` text), only error/hint/note lines on stderr, no traceback. Returns the error line."""
    assert result.exit_code == 2, f"exit {result.exit_code}:\n{result.output}\n{result.exception!r}"
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert all(line.startswith(("error: ", "hint: ", "note: ")) for line in lines), result.stderr
    for text in contains:
        assert text in errors[0], f"{text!r} not in {errors[0]!r}"
    return errors[0]


def deepfuse_on_private_tmpfs(mount: Path, options: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``deepfuse ARGS`` with a fresh tmpfs (mount ``options``, e.g. ``ro,size=64k``) at ``mount``, in a
    private mount namespace that vanishes with the process; stderr's last line is ``left: <what the run
    left in it>``. Mounting needs root and ``unshare``; CI runs as root with unshare, so these tests run there.
    Elsewhere the test is skipped: as a normal user the read-only case uses permission bits instead, and
    the free-space refusal also has an in-process test with a faked free-space figure."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("mounting a tmpfs needs root and unshare")
    script = (f'd=$1; shift; mount -t tmpfs -o {options} deepfuse-test "$d" || exit 99; '
              '"$@"; rc=$?; echo "left: $(ls -A "$d")" >&2; exit $rc')
    res = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", str(mount),
                          sys.executable, "-m", "deepfuse_cli", *map(str, args)],
                         check=False, capture_output=True, text=True, timeout=120)
    if res.returncode == 99 or "unshare:" in res.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()[:200]}")
    return res
