"""Bad input through the CLI: exit 2, one line naming the file/tensor and a hint, no traceback,
nothing written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from .helpers import cli, digest_tree


def refused(*args, contains: list[str]) -> str:
    out = cli(*args, expect=2)
    assert "Traceback" not in out
    assert out.startswith("error: "), out
    for text in contains:
        assert text in out, f"{text!r} not in {out!r}"
    return out


def no_output_left(parent):
    return not [p for p in parent.iterdir() if "deepfuse-tmp" in p.name or p.name == "out"]


@pytest.mark.parametrize("a, b, what", [
    ("llama-a", "llama-mha-a", "kv_ratio"),
    ("llama-a", "gpt2-a", "is a gpt2 model"),
    ("t5v11-a", "t5v10-a", "feed_forward_proj"),
    ("mlp-a", "llama-a", "is a llama model"),
])
def test_mismatched_sources_are_refused_naming_the_difference(a, b, what, hf_fixtures, tmp_path):
    before = digest_tree(hf_fixtures / a), digest_tree(hf_fixtures / b)
    out = refused("fuse", hf_fixtures / a, hf_fixtures / b, "-o", tmp_path / "out", contains=[what, "hint:"])
    assert str(hf_fixtures / b) in out or str(hf_fixtures / a) in out
    assert no_output_left(tmp_path)
    assert (digest_tree(hf_fixtures / a), digest_tree(hf_fixtures / b)) == before


def test_vocab_and_depth_mismatch(hf_fixtures, tmp_path):
    import shutil

    other = tmp_path / "llama-deep"
    shutil.copytree(hf_fixtures / "llama-b", other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (other / "config.json").write_text(json.dumps(cfg))
    refused("fuse", hf_fixtures / "llama-a", other, "-o", tmp_path / "out",
            contains=["num_hidden_layers", "2", "3"])
    cfg["num_hidden_layers"], cfg["vocab_size"] = 2, 65
    (other / "config.json").write_text(json.dumps(cfg))
    refused("fuse", hf_fixtures / "llama-a", other, "-o", tmp_path / "out", contains=["vocab_size", "64", "65"])


@pytest.mark.parametrize("times", ["0", "1"])
def test_times_below_two(times, hf_fixtures, tmp_path):
    refused("self-fuse", hf_fixtures / "llama-a", "--times", times, "-o", tmp_path / "out", contains=["--times", ">= 2"])


@pytest.mark.parametrize("weights, text", [("0.5", "1 values for 2 sources"), ("1,-1", "not a positive"),
                                           ("a,b", "not a comma-separated"), ("1,0", "not a positive")])
def test_bad_weights(weights, text, hf_fixtures, tmp_path):
    refused("fuse", hf_fixtures / "llama-a", hf_fixtures / "llama-b", "--weights", weights, "-o", tmp_path / "out",
            contains=[text])


def test_bad_noise_and_modes(hf_fixtures, tmp_path):
    refused("self-fuse", hf_fixtures / "llama-a", "--noise-std", "-1", "-o", tmp_path / "o", contains=["noise"])
    refused("fuse", hf_fixtures / "llama-a", hf_fixtures / "llama-b", "--noise-scale", "0.1", "--noise-mode",
            "preserving", "-o", tmp_path / "o", contains=["self-fusion only"])
    refused("self-fuse", hf_fixtures / "llama-a", "--norm", "both", "-o", tmp_path / "o", contains=["--norm"])
    refused("self-fuse", hf_fixtures / "llama-a", "--dtype", "int8", "-o", tmp_path / "o", contains=["--dtype"])
    refused("self-fuse", hf_fixtures / "llama-a", "--max-shard-size", "lots", "-o", tmp_path / "o",
            contains=["--max-shard-size"])


def test_existing_output_needs_force_and_is_replaced_whole(hf_fixtures, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    refused("self-fuse", hf_fixtures / "llama-a", "-o", out, contains=["already exists", "--force"])
    assert (out / "keep.txt").exists()
    cli("self-fuse", hf_fixtures / "llama-a", "-o", out, "--force", "-q")
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert no_output_left(tmp_path) or [p.name for p in tmp_path.iterdir()] == ["out"]


def test_output_inside_input_is_refused(hf_fixtures, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(hf_fixtures / "llama-a", src)
    before = digest_tree(src)
    refused("self-fuse", src, "-o", src / "fused", contains=["overlaps input"])
    assert digest_tree(src) == before


def test_unknown_family_and_non_checkpoints(hf_fixtures, tmp_path):
    weird = tmp_path / "weird"
    weird.mkdir()
    (weird / "config.json").write_text(json.dumps({"model_type": "xlnet"}))
    (weird / "model.safetensors").write_bytes((hf_fixtures / "llama-a" / "model.safetensors").read_bytes())
    refused("self-fuse", weird, "-o", tmp_path / "out", contains=["unknown architecture family", "'xlnet'", "--rules"])
    empty = tmp_path / "empty"
    empty.mkdir()
    refused("self-fuse", empty, "-o", tmp_path / "out", contains=["no model weights found"])
    refused("self-fuse", tmp_path / "missing", "-o", tmp_path / "out", contains=["no such file"])
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    refused("self-fuse", text, "-o", tmp_path / "out", contains=["not a checkpoint"])


class Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/deepfuse-pwned-by-pickle",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    import os

    marker = "/tmp/deepfuse-pwned-by-pickle"
    if os.path.exists(marker):
        os.remove(marker)
    bad = tmp_path / "evil.bin"
    torch.save({"w": torch.zeros(2), "payload": Evil()}, bad)
    out = refused("self-fuse", bad, "--rules", "mlp", "-o", tmp_path / "out",
                  contains=["refused", "weights_only=True", "safetensors"])
    assert str(bad) in out
    assert not os.path.exists(marker)


def test_bare_files_with_rules(hf_fixtures, tmp_path):
    a, b = hf_fixtures / "mlp-a" / "model.safetensors", hf_fixtures / "mlp-b" / "model.safetensors"
    refused("fuse", a, b, "-o", tmp_path / "o", contains=["unknown architecture family", "--rules"])
    cli("fuse", a, b, "--rules", "mlp", "-o", tmp_path / "out", "-q")
    assert (tmp_path / "out" / "model.safetensors").exists() and not (tmp_path / "out" / "config.json").exists()


def test_module_entry_point(hf_fixtures):
    res = subprocess.run([sys.executable, "-m", "deepfuse_cli", "rules", "list"], capture_output=True, text=True)
    assert res.returncode == 0 and "gpt2" in res.stdout
    res = subprocess.run([sys.executable, "-m", "deepfuse_cli", "self-fuse", str(hf_fixtures / "llama-a"),
                          "--times", "1", "-o", "/nonexistent/x"], capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr and res.stderr.startswith("error:")


def test_missing_output_parents_are_created(hf_fixtures, tmp_path):
    out = tmp_path / "a" / "b" / "fused"
    cli("self-fuse", hf_fixtures / "llama-a", "-o", out, "-q")
    assert (out / "model.safetensors").exists()
    blocked = tmp_path / "file"
    blocked.write_text("x")
    refused("self-fuse", hf_fixtures / "llama-a", "-o", blocked / "sub" / "fused", contains=["is not a directory"])


def test_error_messages_stay_one_line_whatever_they_quote():
    # found by fuzzing: a T5X spec path holding a newline was quoted raw into the message
    from deepfuse_cli.errors import InputError

    exc = InputError("array directory target.encoder.\nayers_0/ not found", "copy\rit again")
    assert "\n" not in exc.message and "\r" not in exc.hint
    assert exc.message == "array directory target.encoder.\\nayers_0/ not found"
    assert str(InputError("名前 é")) == "名前 é"  # printable text is left as it is
