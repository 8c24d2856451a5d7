"""Interrupted and failing runs leave nothing behind: a real fuse in a subprocess is sent SIGINT /
SIGTERM mid-write, or runs into a simulated full disk (RLIMIT_FSIZE with SIGXFSZ ignored, so a
write fails with EFBIG as on a full disk). Afterwards: nonzero exit, a message and no traceback,
no output and no temporary directory, inputs byte-identical, and an existing output that
``--force`` would have replaced still intact."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from .helpers import deepfuse_on_private_tmpfs, digest_tree


# Llama-shaped, bf16: ~124 MB in, ~430 MB out for self-fusion x2 (about a second of writing)
SHAPE = {"hidden": 1024, "intermediate": 2816, "layers": 4, "heads": 16, "kv_heads": 4, "vocab": 8192}


def make_llama(directory: Path) -> Path:
    h, inter, heads, kv, vocab = (SHAPE[k] for k in ("hidden", "intermediate", "heads", "kv_heads", "vocab"))
    hd = h // heads
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": w(vocab, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
               "lm_head.weight": w(vocab, h)}
    for i in range(SHAPE["layers"]):
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": w(heads * hd, h), p + "self_attn.k_proj.weight": w(kv * hd, h),
            p + "self_attn.v_proj.weight": w(kv * hd, h), p + "self_attn.o_proj.weight": w(h, heads * hd),
            p + "mlp.gate_proj.weight": w(inter, h), p + "mlp.up_proj.weight": w(inter, h),
            p + "mlp.down_proj.weight": w(h, inter),
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        })
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
              "intermediate_size": inter, "num_hidden_layers": SHAPE["layers"], "num_attention_heads": heads,
              "num_key_value_heads": kv, "head_dim": hd, "vocab_size": vocab, "hidden_act": "silu",
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 256,
              "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    src = make_llama(tmp_path_factory.mktemp("big") / "llama")
    return src, digest_tree(src)


def temp_dirs(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if ".deepfuse-tmp-" in p.name or ".deepfuse-old-" in p.name]


# Runs deepfuse with a file-size limit: a write past it fails with EFBIG (SIGXFSZ ignored), like a full disk.
# (Set in the child itself rather than with preexec_fn, which forks a possibly multithreaded test process.)
FSIZE_WRAPPER = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
sys.argv = ["deepfuse", *sys.argv[2:]]
runpy.run_module("deepfuse_cli", run_name="__main__")
"""


def start(src: Path, out: Path, *extra: str, fsize_limit: int | None = None) -> subprocess.Popen:
    args = ["self-fuse", str(src), "-o", str(out), "-q", *extra]
    cmd = ([sys.executable, "-c", FSIZE_WRAPPER, str(fsize_limit)] if fsize_limit else
           [sys.executable, "-m", "deepfuse_cli"]) + args
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"deepfuse did not exit: {err}")
    return proc.returncode, err


def wait_mid_write(proc: subprocess.Popen, parent: Path, min_bytes: int = 2**20) -> None:
    """Block until the temporary output directory holds at least ``min_bytes`` of a shard."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"deepfuse exited ({proc.returncode}) before it could be interrupted: {proc.stderr.read()}")
        for tmp in temp_dirs(parent):
            try:
                if sum(f.stat().st_size for f in tmp.iterdir()) >= min_bytes:
                    return
            except FileNotFoundError:
                pass
        time.sleep(0.005)
    proc.kill()
    pytest.fail("the temporary output directory never appeared")


def previous_output(out: Path) -> dict[str, str]:
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"previous run")
    (out / "deepfuse.json").write_text("{}")
    return digest_tree(out)


@pytest.mark.parametrize("sig, force", [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["SIGINT", "SIGTERM", "SIGINT-force-existing"])
def test_signal_mid_write_leaves_nothing(sig, force, big, tmp_path):
    src, src_digest = big
    out = tmp_path / "out"
    old = previous_output(out) if force else None
    proc = start(src, out, *(["--force"] if force else []))
    wait_mid_write(proc, tmp_path)
    proc.send_signal(sig)
    code, err = finish(proc)
    assert code == 128 + sig, err  # 130 for SIGINT, 143 for SIGTERM, as shells report them
    assert "Traceback" not in err and "interrupted" in err, err
    assert not temp_dirs(tmp_path), temp_dirs(tmp_path)
    if force:
        assert digest_tree(out) == old, "--force replaced the output before the new one was complete"
    else:
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if force else [])
    assert digest_tree(src) == src_digest


@pytest.mark.parametrize("force", [False, True], ids=["new", "force-existing"])
def test_full_disk_mid_write_leaves_nothing(force, big, tmp_path):
    src, src_digest = big
    out = tmp_path / "out"
    old = previous_output(out) if force else None
    code, err = finish(start(src, out, *(["--force"] if force else []), fsize_limit=32 * 2**20))
    assert code == 2, err
    lines = err.splitlines()
    assert "Traceback" not in err and lines[0].startswith("error: "), err
    assert str(out) in lines[0] and "File too large" in lines[0] and "nothing was written" in lines[0], lines[0]
    assert not temp_dirs(tmp_path), temp_dirs(tmp_path)
    if force:
        assert digest_tree(out) == old
    else:
        assert not out.exists()
    assert digest_tree(src) == src_digest


def test_run_that_does_not_fit_is_refused_before_writing(big, tmp_path):
    """The free-space check: a destination with less room than the plan needs is refused up front
    (a 16 MiB tmpfs in a private mount namespace; needs root and unshare, as on CI)."""
    src, src_digest = big
    mount = tmp_path / "small"
    mount.mkdir()
    res = deepfuse_on_private_tmpfs(mount, "size=16m", "self-fuse", src, "-o", mount / "out")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.splitlines()
    assert lines[0].startswith("error: not enough free space") and "Traceback" not in res.stderr, res.stderr
    assert lines[-1] == "left: ", lines[-1]
    assert digest_tree(src) == src_digest


def test_free_space_check_refuses_before_writing(tmp_path, monkeypatch):
    """The same check anywhere (no mount needed): the destination reports less free space than the plan needs."""
    from collections import namedtuple

    from typer.testing import CliRunner

    from deepfuse_cli.cli import app

    src = Path(__file__).resolve().parent / "corpus" / "good"
    before = digest_tree(src)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    result = CliRunner().invoke(app, ["self-fuse", str(src), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: not enough free space") and "Traceback" not in result.output
    assert not list(tmp_path.iterdir()) and digest_tree(src) == before
