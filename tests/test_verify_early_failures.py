"""deepfuse verify never ends in a traceback.

A fused checkpoint that fails early (a tensor missing or extra, a wrong shape or dtype, a tampered
config.json) — its manifest digests re-recorded, so that integrity passes and the later checks must
catch it — ends with exit 1 and one ``error:`` line naming the failed check; the checks that need it
are reported as skipped, naming it. The runtime refusing the fused model is a failed function check.
A manifest that does not parse, or has wrong types, is bad input: exit 2, one line. ``--text`` probes
with a text file's tokens.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from deepfuse_cli.cli import app
from deepfuse_cli.verify import run as verify_run
from deepfuse_cli.verify.report import Check

from .helpers import clean_refusal

HF = Path(__file__).resolve().parent.parent / "fixtures" / "hf"
runner = CliRunner()


@pytest.fixture(scope="module")
def fused(tmp_path_factory) -> Path:
    """llama-a self-fused twice, with its manifest (and the tokenizer copied from the source)."""
    out = tmp_path_factory.mktemp("fused") / "x2"
    result = runner.invoke(app, ["self-fuse", str(HF / "llama-a"), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    return out


def copy_of(fused: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(fused, out)
    return out


def rerecord(out: Path, name: str) -> None:
    """The manifest's digest of ``name`` made to match the file again: integrity passes."""
    manifest = json.loads((out / "deepfuse.json").read_text())
    manifest["files"][name] = hashlib.sha256((out / name).read_bytes()).hexdigest()
    (out / "deepfuse.json").write_text(json.dumps(manifest))


def edit_tensors(change):
    def apply(out: Path) -> None:
        path = out / "model.safetensors"
        state = load_file(path)
        change(state)
        save_file(state, path, metadata={"format": "pt"})
        rerecord(out, "model.safetensors")
    return apply


def edit_config(change):
    def apply(out: Path) -> None:
        path = out / "config.json"
        config = json.loads(path.read_text())
        change(config)
        path.write_text(json.dumps(config, indent=2))
        rerecord(out, "config.json")
    return apply


def write_config(text: str):
    def apply(out: Path) -> None:
        (out / "config.json").write_text(text)
        rerecord(out, "config.json")
    return apply


UP = "model.layers.1.mlp.up_proj.weight"


def verify(out: Path, *args: str):
    """``deepfuse verify OUT --json ARGS``: the result and the JSON report it printed."""
    result = runner.invoke(app, ["verify", str(out), "--json", "--probes", "2", "--seq-len", "4", *args])
    text = result.stdout
    data = json.JSONDecoder().raw_decode(text[text.index("{"):])[0] if "{" in text else None
    return result, data


def one_error_line(result, exit_code: int) -> str:
    """Exit ``exit_code``, no traceback, exactly one ``error:`` line on stderr (a hint may follow); the line."""
    assert result.exit_code == exit_code, f"exit {result.exit_code}:\n{result.output}\n{result.exception!r}"
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.stdout and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert all(line.startswith(("error: ", "hint: ")) for line in lines), result.stderr
    return errors[0]


# what is broken -> (the check that fails, what its message says, the checks skipped because of it)
EARLY = {
    "missing tensor": (edit_tensors(lambda s: s.pop(UP)), "tensors: names", f"missing tensor {UP!r}",
                       ["tensors: shapes", "tensors: decomposition", "function"]),
    "extra tensor": (edit_tensors(lambda s: s.update({"model.extra.weight": torch.zeros(3)})), "tensors: names",
                     "unexpected tensor 'model.extra.weight'", ["tensors: shapes", "tensors: decomposition", "function"]),
    "wrong shape": (edit_tensors(lambda s: s.update({UP: s[UP][:-2]})), "tensors: shapes",
                    f"tensor {UP!r} has shape [46, 32], expected [48, 32]", ["tensors: decomposition", "function"]),
    "wrong dtype": (edit_tensors(lambda s: s.update({UP: s[UP].half()})), "tensors: shapes",
                    f"tensor {UP!r} is torch.float16, expected torch.float32", ["tensors: decomposition", "function"]),
    "config width": (edit_config(lambda c: c.update(intermediate_size=50)), "config",
                     "field 'intermediate_size' is 50, the fusion writes 48", ["function"]),
    "config model_type": (edit_config(lambda c: c.update(model_type="gpt2")), "config",
                          "field 'model_type' is \"gpt2\", the fusion writes \"llama\"", ["function"]),
    "config field dropped": (edit_config(lambda c: c.pop("num_key_value_heads")), "config",
                             "config.json has no field 'num_key_value_heads'", ["function"]),
    "config invalid JSON": (write_config("{not json"), "checkpoint", "config.json: invalid JSON",
                            ["tensors", "config", "function"]),
    "config not an object": (write_config("[1, 2]"), "checkpoint", "config.json", ["tensors", "config", "function"]),
}


@pytest.mark.parametrize("case", list(EARLY))
def test_early_failure_skips_what_needs_it(case, fused, tmp_path):
    change, failed, says, skipped = EARLY[case]
    out = copy_of(fused, tmp_path)
    change(out)
    result, data = verify(out)
    line = one_error_line(result, 1)
    assert line.startswith(f"error: {out}: {failed}: ") and says in line, line
    assert data is not None and data["passed"] is False and data["failed"] == failed
    checks = {c["name"]: c for c in data["checks"]}
    assert checks["integrity"]["status"] == "pass"
    assert checks[failed]["status"] == "fail" and says in checks[failed]["message"]
    assert [c["name"] for c in data["checks"] if c["status"] == "fail"] == [failed]
    for name in skipped:
        assert checks[name]["status"] == "skip", checks[name]
        assert checks[name]["blocked_by"] == failed and checks[name]["message"] == f"{failed} failed"
    assert not any(c["name"].startswith("function: ") for c in data["checks"])  # the function never ran


def test_report_files_name_the_failed_and_skipped_checks(fused, tmp_path):
    """--report, --junit and --markdown are written too when verification fails early."""
    out = copy_of(fused, tmp_path)
    EARLY["missing tensor"][0](out)
    report, junit, md = tmp_path / "r.json", tmp_path / "j.xml", tmp_path / "r.md"
    result, _ = verify(out, "--report", str(report), "--junit", str(junit), "--markdown", str(md))
    one_error_line(result, 1)
    data = json.loads(report.read_text())
    assert {c["name"]: c["status"] for c in data["checks"]}["function"] == "skip"
    assert 'failures="1"' in junit.read_text() and "tensors: names failed" in junit.read_text()
    assert "Failed: `tensors: names`" in md.read_text()
    assert "| function | skip | tensors: names failed |" in md.read_text()


# the runtime refusing the fused model (here: the config check made blind, as a new way of breaking a
# checkpoint could slip past it) -> what the function check's one line says
RUNTIME = {
    "mismatched shapes": (edit_config(lambda c: c.update(intermediate_size=50)),
                          "mismatched shape of 'model.layers.0.mlp.down_proj.weight' ([32, 48] in the checkpoint, "
                          "[32, 50] in the model its config describes) (and 5 more)"),
    "missing keys": (edit_config(lambda c: c.update(model_type="gpt2")), "missing keys 'transformer."),
    "config refused": (edit_config(lambda c: c.update(hidden_size=36)), "hidden size (36)"),
}


@pytest.mark.parametrize("case", list(RUNTIME))
def test_runtime_refusing_the_fused_model_is_a_failed_function_check(case, fused, tmp_path, monkeypatch):
    change, says = RUNTIME[case]
    out = copy_of(fused, tmp_path)
    change(out)
    monkeypatch.setattr(verify_run, "check_config", lambda *a: Check("config", "pass", "not looked at"))
    result, data = verify(out)
    line = one_error_line(result, 1)
    assert line.startswith(f"error: {out}: function: transformers AutoModelForCausalLM cannot load or run the "
                           "fused model: "), line
    assert says in line, line
    fn = {c["name"]: c for c in data["checks"]}["function"]
    assert fn["status"] == "fail" and says in fn["message"]


def test_runtime_refusing_a_source_is_bad_input(fused, monkeypatch):
    """The sources are input: a source the runtime cannot run is exit 2, one line naming it."""
    from deepfuse_cli.verify import function_level

    def refuse(view, *args):
        raise ValueError("this runtime does not\nload it")

    monkeypatch.setattr(function_level, "_hf_forward", refuse)
    result = runner.invoke(app, ["verify", str(fused)])
    clean_refusal(result, [f"source {HF / 'llama-a'}", "cannot load or run it: ValueError: this runtime does not load it"])


@pytest.mark.parametrize("text, contains", [
    ("{not json", ["deepfuse.json", "invalid"]),
    ("", ["deepfuse.json"]),
    (json.dumps({"seed": "zero"}), ["deepfuse.json", "invalid manifest"]),
])
def test_manifest_that_does_not_parse_is_bad_input(text, contains, fused, tmp_path):
    out = copy_of(fused, tmp_path)
    (out / "deepfuse.json").write_text(text)
    clean_refusal(runner.invoke(app, ["verify", str(out), "--json"]), contains)


@pytest.mark.parametrize("change, contains", [
    (lambda m: m.update(seed="0"), ["seed", "valid integer"]),
    (lambda m: m.update(weights="half"), ["weights"]),
    (lambda m: m["files"].update({"model.safetensors": 7}), ["files"]),
    (lambda m: m.update(sources={"path": "x"}), ["sources"]),
])
def test_manifest_with_wrong_types_is_bad_input(change, contains, fused, tmp_path):
    out = copy_of(fused, tmp_path)
    manifest = json.loads((out / "deepfuse.json").read_text())
    change(manifest)
    (out / "deepfuse.json").write_text(json.dumps(manifest))
    clean_refusal(runner.invoke(app, ["verify", str(out), "--json"]), ["deepfuse.json", "invalid manifest", *contains])


# ---- --text: real text as probes ------------------------------------------------------------------------------------
def words(n: int) -> str:
    """``n`` words of the fixtures' word-level vocabulary (w0 .. w60), as lines of text."""
    return "\n".join(" ".join(f"w{(7 * i + j) % 61}" for j in range(10)) for i in range(0, n, 10)) + "\n"


def test_text_probes_with_the_copied_tokenizer(fused, tmp_path):
    sample = tmp_path / "sample.txt"
    sample.write_text(words(100))
    result, data = verify(fused, "--text", str(sample), "--probes", "3", "--seq-len", "8")
    assert result.exit_code == 0, result.output
    assert data["passed"] and {c["name"]: c["status"] for c in data["checks"]}["function: logits vs source"] == "pass"
    meta = data["meta"]
    assert meta["probe_inputs"] == {"kind": "text", "file": "sample.txt", "tokens": 100, "tokens_used": 24,
                                    "truncated": False, "tokenizer": str(fused)}
    assert meta["probes"] == 3 and meta["seq_len"] == 8 and meta["probe_seed"] is None


def test_text_probes_are_the_texts_tokens(fused, tmp_path, monkeypatch):
    """The probe ids are the text's token ids, in order, split into --probes runs of --seq-len."""
    from deepfuse_cli.verify import function_level

    seen = []
    real = function_level._hf_forward

    def spy(view, cls, inputs, groups):
        seen.append(inputs["input_ids"].clone())
        return real(view, cls, inputs, groups)

    monkeypatch.setattr(function_level, "_hf_forward", spy)
    sample = tmp_path / "short.txt"
    sample.write_text("w5 w6 w7 w8 w9 w10 w11")  # 7 tokens: one probe of 4 (--probes 2 --seq-len 4)
    result, data = verify(fused, "--text", str(sample))
    assert result.exit_code == 0, result.output
    vocab = {"w5": 8, "w6": 9, "w7": 10, "w8": 11}  # <pad> </s> <unk>, then w0 = 3
    assert seen and all(ids.tolist() == [list(vocab.values())] for ids in seen)
    assert data["meta"]["probe_inputs"]["tokens_used"] == 4 and data["meta"]["probes"] == 1


def test_default_probes_stay_seeded_random_ids(fused):
    result, data = verify(fused)
    assert result.exit_code == 0, result.output
    assert data["meta"]["probe_inputs"] == {"kind": "random", "seed": 0} and data["meta"]["probe_seed"] == 0


def test_text_without_a_tokenizer_is_refused(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(HF / "llama-a", src, ignore=shutil.ignore_patterns("tokenizer*"))
    out = tmp_path / "fused"
    assert runner.invoke(app, ["self-fuse", str(src), "-o", str(out), "-q"]).exit_code == 0
    sample = tmp_path / "sample.txt"
    sample.write_text(words(40))
    result = runner.invoke(app, ["verify", str(out), "--text", str(sample)])
    clean_refusal(result, ["--text: no tokenizer in", str(out), str(src)])
    assert f"hint: copy the source model's tokenizer files into {out}, or drop --text" in result.stderr


@pytest.mark.parametrize("args, contains", [
    (["--no-function"], ["--text", "--no-function does not run"]),
    (["--integrity-only"], ["--text", "--integrity-only does not run"]),
])
def test_text_needs_the_function_check(args, contains, fused, tmp_path):
    sample = tmp_path / "sample.txt"
    sample.write_text(words(20))
    clean_refusal(runner.invoke(app, ["verify", str(fused), "--text", str(sample), *args]), contains)


@pytest.mark.parametrize("content, contains", [
    (None, ["--text", "does not exist"]),
    (b"\xff\xfe w1 w2", ["--text", "not UTF-8 text"]),
    (b"w1", ["--text", "1 token(s)", "at least 2"]),
])
def test_unusable_text_is_refused(content, contains, fused, tmp_path):
    sample = tmp_path / "sample.txt"
    if content is not None:
        sample.write_bytes(content)
    clean_refusal(runner.invoke(app, ["verify", str(fused), "--text", str(sample)]), contains)


def test_text_for_a_family_probed_with_features_is_refused(tmp_path):
    out = tmp_path / "mlp"
    assert runner.invoke(app, ["self-fuse", str(HF / "mlp-a"), "-o", str(out), "-q"]).exit_code == 0
    sample = tmp_path / "sample.txt"
    sample.write_text(words(20))
    clean_refusal(runner.invoke(app, ["verify", str(out), "--text", str(sample)]), ["--text", "feature vectors"])


def test_text_ids_must_be_in_the_vocabulary(tmp_path):
    from deepfuse_cli.errors import InputError
    from deepfuse_cli.verify.function_level import tokenize_text

    sample = tmp_path / "sample.txt"
    sample.write_text("w1 w2 w30")
    assert tokenize_text(sample, [HF / "llama-a"], 64).ids == (4, 5, 33)
    with pytest.raises(InputError, match="gives token id 33, but the model's vocabulary has 20 entries"):
        tokenize_text(sample, [HF / "llama-a"], 20)


def test_a_long_text_is_read_from_its_start(tmp_path, monkeypatch):
    from deepfuse_cli.verify import function_level

    monkeypatch.setattr(function_level, "MAX_TEXT_BYTES", 14)
    sample = tmp_path / "sample.txt"
    sample.write_text("w1 w2 w3 w4 w\u00e9 " + words(1000))  # 14 bytes end inside the two-byte character
    tokens = function_level.tokenize_text(sample, [HF / "llama-a"], 64)
    assert tokens.truncated and tokens.ids == (4, 5, 6, 7, 2)  # the half character dropped; "w" is <unk>
