"""Reliability, round 2: inputs and races that used to crash, leak, hang or lose data.

The promise for every refusal: exit 2 and one ``error:`` line (a ``hint:`` may follow), no traceback,
nothing written, no temporary directory left, inputs byte-identical, no file outside the checkpoint
opened, no hang. One section per class of problem.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from deepfuse_cli import cli as cli_module
from deepfuse_cli import fuse as fuse_module
from deepfuse_cli.cli import app
from deepfuse_cli.formats import files as files_module
from deepfuse_cli.manifest import Manifest
from deepfuse_cli.untrusted import MAX_JSON_DEPTH, json_depth_exceeds, loads

from .helpers import clean_refusal

ROOT = Path(__file__).resolve().parent.parent
GOOD = ROOT / "tests" / "corpus" / "good"  # a tiny llama
MARKUP = ROOT / "tests" / "corpus" / "markup-name"
HF = ROOT / "fixtures" / "hf"
T5X = ROOT / "fixtures" / "t5x" / "legacy-a"
ORBAX = ROOT / "fixtures" / "orbax" / "std-a"
DEEP = "[" * 100_000 + "]" * 100_000  # valid JSON, 100,000 levels deep
runner = CliRunner()


def digest_tree(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (hashed here, not by the code under test, which tests spy on)."""
    path = Path(path)
    found = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in found}


def leftovers(*dirs: Path) -> list[str]:
    return [str(p) for d in dirs if d.exists() for p in d.rglob("*") if ".deepfuse-" in p.name]


def refuse(*args, contains: list[str], watch: list[Path] = (), tmp: Path | None = None, hint: str | None = None) -> str:
    """Run the CLI expecting a clean refusal; ``watch``ed inputs must not change, ``tmp`` must hold no
    output and no temporary directory. Returns the error line."""
    watch = [Path(p) for p in watch]
    before = [digest_tree(p) for p in watch]
    result = runner.invoke(app, [str(a) for a in args])
    line = clean_refusal(result, contains)
    if hint is not None:
        assert any(h.startswith("hint: ") and hint in h for h in result.stderr.splitlines()), result.stderr
    assert [digest_tree(p) for p in watch] == before, "an input changed"
    if tmp is not None:
        assert not (tmp / "out").exists(), "output written"
        assert not leftovers(tmp), leftovers(tmp)
    return line


def run_ok(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result.stderr


@pytest.fixture(scope="module")
def fused(tmp_path_factory) -> Path:
    """GOOD self-fused twice, with its manifest."""
    out = tmp_path_factory.mktemp("fused") / "x2"
    run_ok("self-fuse", GOOD, "-o", out, "-q")
    return out


def copy_of(src: Path, tmp_path: Path, name: str = "src") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst, symlinks=True)
    return dst


# ---- 1. deeply nested JSON ----------------------------------------------------------------------------
def test_depth_is_measured_without_recursion_and_ignores_strings():
    assert json_depth_exceeds(DEEP)
    assert not json_depth_exceeds("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)
    assert json_depth_exceeds("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1))
    text = json.dumps({"a": "[[[[{{{{" * 100, "b": ['\\"[[[' * 100]})
    assert not json_depth_exceeds(text) and loads(text)["a"].startswith("[[[[")
    with pytest.raises(ValueError, match="nested deeper than"):
        loads(DEEP)


def _deep_config(tmp_path):
    src = copy_of(GOOD, tmp_path)
    (src / "config.json").write_text(DEEP)
    return ["self-fuse", src, "-o", tmp_path / "out"], src, "config.json"


def _deep_index(tmp_path):
    src = copy_of(HF / "llama-b-sharded", tmp_path)
    (src / "model.safetensors.index.json").write_text(DEEP)
    return ["self-fuse", src, "-o", tmp_path / "out"], src, "model.safetensors.index.json"


def _deep_orbax_metadata(tmp_path):
    src = copy_of(ORBAX, tmp_path)
    (src / "_METADATA").write_text(DEEP)
    return ["inspect", src], src, "_METADATA"


def _deep_rules(tmp_path):
    (tmp_path / "rules.json").write_text(DEEP)
    return ["self-fuse", GOOD, "--rules", tmp_path / "rules.json", "-o", tmp_path / "out"], tmp_path / "rules.json", \
        "rules.json"


@pytest.mark.parametrize("case", [_deep_config, _deep_index, _deep_orbax_metadata, _deep_rules])
def test_deeply_nested_json_is_refused(case, tmp_path):
    args, watched, name = case(tmp_path)
    refuse(*args, contains=[name, f"nested deeper than {MAX_JSON_DEPTH} levels"], watch=[watched], tmp=tmp_path)


def test_deeply_nested_rules_file_in_rules_check(tmp_path):
    (tmp_path / "rules.json").write_text(DEEP)
    refuse("rules", "check", tmp_path / "rules.json", contains=["rules.json", "nested deeper"])


def test_deeply_nested_manifest_is_refused(fused, tmp_path):
    out = copy_of(fused, tmp_path, "fused")
    (out / "deepfuse.json").write_text(DEEP)
    refuse("verify", out, contains=["deepfuse.json", "nested deeper"], watch=[out])


# ---- 2. symlink loops ---------------------------------------------------------------------------------
def test_output_under_a_symlink_loop_is_refused(tmp_path):
    (tmp_path / "loop").symlink_to("loop")
    refuse("self-fuse", GOOD, "-o", tmp_path / "loop" / "out", contains=["loop", "symlink loop"], watch=[GOOD],
           tmp=tmp_path)


def test_output_that_is_a_symlink_loop_is_refused_without_force(tmp_path):
    (tmp_path / "out").symlink_to("out")
    result = runner.invoke(app, ["self-fuse", str(GOOD), "-o", str(tmp_path / "out")])
    clean_refusal(result, ["already exists", "symlink"])
    assert (tmp_path / "out").is_symlink() and not leftovers(tmp_path)


def _t5x_array_dir(step: Path) -> Path:
    return next(p for p in sorted(step.iterdir()) if p.name.startswith("target.") and p.is_dir())


@pytest.mark.parametrize("what", ["array directory", "chunk file", "zarr metadata"])
def test_symlink_loop_inside_a_t5x_checkpoint_is_refused(what, tmp_path):
    src = copy_of(T5X, tmp_path)
    array = _t5x_array_dir(src / "checkpoint_1000")
    if what == "array directory":
        shutil.rmtree(array)
        array.symlink_to(array.name)
    else:
        victim = array / ".zarray" if what == "zarr metadata" else next(p for p in array.iterdir() if p.name != ".zarray")
        victim.unlink()
        victim.symlink_to(victim.name)
    refuse("self-fuse", src, "-o", tmp_path / "out", contains=[array.name, "symlink loop"], watch=[src], tmp=tmp_path)


def test_symlink_loop_in_an_orbax_database_is_refused(tmp_path):
    src = copy_of(ORBAX, tmp_path)
    shutil.rmtree(src / "d")
    (src / "d").symlink_to("d")
    refuse("inspect", src, contains=["d", "symlink loop"], watch=[src])


# ---- 3. console markup in user-controlled text ----------------------------------------------------------
def test_rules_show_prints_brackets_of_descriptions():
    result = runner.invoke(app, ["rules", "show", "t5"])
    assert result.exit_code == 0
    assert "weights [out, in]" in " ".join(result.stdout.split()), result.stdout


def test_markup_in_tensor_names_is_printed_verbatim():
    result = runner.invoke(app, ["inspect", str(MARKUP)])
    assert result.exit_code == 0, result.output
    assert "[/red]model.extra[bold]" in result.stdout.replace("\n", "").replace("│", "").replace(" ", "") or \
        "[/red]model.extra[bold" in result.stdout, result.stdout
    result = runner.invoke(app, ["rules", "check", "llama", str(MARKUP)])  # the report's lines, then the error
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "unmatched tensor: [/red]model.extra[bold]" in result.stderr.splitlines()[1], result.stderr
    assert [x for x in result.stderr.splitlines() if x.startswith("error: ")] == [result.stderr.splitlines()[2]]


def test_markup_in_the_output_path(tmp_path):
    out = tmp_path / "out[/bold][red]"
    stderr = run_ok("self-fuse", GOOD, "-o", out)
    assert f"wrote {out}:" in stderr
    assert (out / "deepfuse.json").is_file()


def test_a_failure_to_print_after_writing_is_not_a_failed_write(tmp_path, monkeypatch):
    """The output is complete once renamed into place: printing the summary may fail, the run may not."""
    real = cli_module.err.print

    def broken(*args, **kwargs):
        if args and str(args[0]).startswith("wrote "):
            raise OSError(5, "Input/output error")
        return real(*args, **kwargs)

    monkeypatch.setattr(cli_module.err, "print", broken)
    run_ok("self-fuse", GOOD, "-o", tmp_path / "out")
    assert Manifest.read(tmp_path / "out" / "deepfuse.json").n == 2 and not leftovers(tmp_path)


# ---- 4. unusual tensors in PyTorch pickles ----------------------------------------------------------------
NORM = "model.norm.weight"
UP = "model.layers.0.mlp.up_proj.weight"


def _pickle_with(tmp_path: Path, name: str, make) -> Path:
    src = tmp_path / "pickled"
    src.mkdir(exist_ok=True)
    shutil.copy(GOOD / "config.json", src)
    state = load_file(GOOD / "model.safetensors")
    state[name] = make(state[name])
    torch.save(state, src / "pytorch_model.bin")
    return src


@pytest.mark.parametrize("make, why", [
    (lambda t: t.to_sparse(), "sparse tensor (sparse_coo)"),
    (lambda t: t.unsqueeze(0).to_sparse_csr(), "sparse tensor (sparse_csr)"),
    (lambda t: torch.empty_like(t, device="meta"), "meta device"),
    (lambda t: torch.quantize_per_tensor(t.float(), 0.1, 0, torch.qint8), "quantized tensor (qint8)"),
])
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_odd_tensors_in_pickles_are_refused_by_name(make, why, tmp_path):
    src = _pickle_with(tmp_path, NORM, make)
    for args in (["self-fuse", src, "-o", tmp_path / "out"], ["inspect", src]):
        refuse(*args, contains=["pickled/pytorch_model.bin", repr(NORM), why], watch=[src], tmp=tmp_path)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_next_to_float32_is_refused_or_cast(dtype, tmp_path):
    src = _pickle_with(tmp_path, UP, lambda t: t.to(dtype))
    refuse("fuse", GOOD, src, "-o", tmp_path / "out", contains=[repr(UP), str(dtype).removeprefix("torch."),
                                                               "do not mix"], hint="--dtype", watch=[src], tmp=tmp_path)
    run_ok("fuse", GOOD, src, "-o", tmp_path / "out", "--dtype", "float32", "-q")


# ---- 5. absurd numbers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, contains", [
    (["self-fuse", GOOD, "--times", str(10**12)], ["--times 1000000000000", "at most"]),
    (["self-fuse", GOOD, "--times", "-3"], ["--times -3", ">= 2"]),
    (["plan", GOOD, "--times", str(10**30)], ["--times", "at most"]),
    (["fuse", GOOD, GOOD, "--weights", "1e308,1e308"], ["--weights", "overflows"]),
    (["self-fuse", GOOD, "--max-shard-size", "0.0000001B"], ["--max-shard-size", "is not a size"]),
])
def test_absurd_fuse_numbers_are_refused(args, contains, tmp_path):
    start = time.monotonic()
    refuse(*args, "-o", tmp_path / "out", contains=contains, tmp=tmp_path) if args[0] != "plan" else \
        refuse(*args, contains=contains)
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("args, contains", [
    (["--probes", "0"], ["--probes 0", "greater than or equal to 1"]),
    (["--probes", "-4"], ["--probes -4", "greater than or equal to 1"]),
    (["--seq-len", "0"], ["--seq-len 0", "greater than or equal to 2"]),
    (["--probes", "100000", "--seq-len", "100000"], ["probe tokens"]),
    (["--seed", "-1"], ["--seed -1"]),
    (["--seed", str(2**70)], ["--seed"]),
    (["--tol", "nan"], ["--tol nan"]),
    (["--tol", "-1"], ["--tol -1"]),
    (["--times", str(10**9)], ["--times 1000000000", "less than or equal to 1024"]),
])
def test_absurd_verify_numbers_are_refused(args, contains, fused):
    extra = ["--sources", GOOD] if "--times" in args else []
    refuse("verify", fused, *extra, *args, contains=contains, watch=[fused])


def _set_zarray(array: Path, **fields) -> None:
    meta = json.loads((array / ".zarray").read_text())
    meta.update(fields)
    (array / ".zarray").write_text(json.dumps(meta))


def test_zarr_chunks_larger_than_the_array_never_reach_tensorstore(tmp_path):
    """tensorstore aborts the process (std::bad_alloc, exit 134) on such a chunk: checked first, and run in a
    subprocess so that a regression cannot take the test session down with it."""
    src = copy_of(T5X, tmp_path)
    array = _t5x_array_dir(src / "checkpoint_1000")
    _set_zarray(array, chunks=[10**6] * len(json.loads((array / ".zarray").read_text())["shape"]))
    before = digest_tree(src)
    res = subprocess.run([sys.executable, "-m", "deepfuse_cli", "self-fuse", str(src), "-o", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.splitlines()
    assert len([x for x in lines if x.startswith("error: ")]) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "zarr chunk shape [1000000" in lines[0] and "does not fit the array shape" in lines[0], lines[0]
    assert array.name in lines[0]
    assert digest_tree(src) == before and not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_zarr_metadata_checks():
    from deepfuse_cli.errors import InputError
    from deepfuse_cli.formats.arrays import check_chunk_shape, check_fits_memory
    from deepfuse_cli.formats.orbax import _chunk_shapes

    check_chunk_shape((16, 16), (16, 8), "a", "")
    check_chunk_shape((0, 4), (1, 4), "a", "")
    check_chunk_shape((), (), "a", "")
    for chunks in [(32, 16), (16,), (0, 16), (16, -1)]:
        with pytest.raises(InputError, match="does not fit"):
            check_chunk_shape((16, 16), chunks, "a", "")
    check_fits_memory((16, 16), 4, "a")
    with pytest.raises(InputError, match="more than this machine's memory"):
        check_fits_memory((10**9, 10**9), 4, "a")
    zarr3 = {"chunk_grid": {"configuration": {"chunk_shape": [4]}},
             "codecs": [{"name": "sharding_indexed", "configuration": {"chunk_shape": [10**9], "codecs": []}}]}
    assert _chunk_shapes(zarr3, 3) == [(4,), (10**9,)]


# ---- 7. files outside the checkpoint --------------------------------------------------------------------------
@pytest.fixture
def hashed(monkeypatch) -> list[Path]:
    """Every file whose sha256 is computed (ahead or not), as real paths."""
    seen: list[Path] = []
    real = files_module._sha256_now

    def spy(path):
        seen.append(Path(os.path.realpath(path)))
        return real(path)

    monkeypatch.setattr(files_module, "_sha256_now", spy)
    monkeypatch.setattr(files_module, "_AHEAD", {})  # nothing hashed earlier in this process counts
    return seen


def test_hashing_ahead_opens_only_files_the_index_lists(tmp_path, hashed):
    src = copy_of(HF / "llama-b-sharded", tmp_path)
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"not yours")
    (src / "model-00009-of-00002.safetensors").symlink_to(secret)
    shutil.copy(src / "model-00001-of-00002.safetensors", src / "model-unlisted.safetensors")
    run_ok("self-fuse", src, "-o", tmp_path / "out", "-q")
    listed = set(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"].values())
    of_source = {p.name for p in hashed if p.parent == src.resolve()}
    assert of_source == listed | {"model.safetensors.index.json"}, hashed
    assert secret.resolve() not in hashed


def test_orbax_database_linked_outside_is_refused(tmp_path, hashed):
    src = copy_of(ORBAX, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(src / "d", elsewhere / "d")
    (src / "d").symlink_to(elsewhere / "d")
    for args in (["inspect", src], ["self-fuse", src, "-o", tmp_path / "out"]):
        refuse(*args, contains=["d", "resolves outside the checkpoint directory"], watch=[src, elsewhere], tmp=tmp_path)
    assert not [p for p in hashed if p.is_relative_to(elsewhere)]


def test_t5x_checkpoint_file_linked_outside_is_refused(tmp_path, hashed):
    src = copy_of(T5X, tmp_path)
    msg = src / "checkpoint_1000" / "checkpoint"
    shutil.move(msg, tmp_path / "elsewhere")
    msg.symlink_to(tmp_path / "elsewhere")
    refuse("self-fuse", src, "-o", tmp_path / "out", contains=["checkpoint_1000", "resolves outside"], watch=[src],
           tmp=tmp_path)
    assert not hashed


def test_verify_hashes_only_the_sources_own_files(fused, tmp_path, hashed):
    out = copy_of(fused, tmp_path, "fused")
    secret = tmp_path / "secret"
    secret.write_bytes(b"not yours")
    manifest = json.loads((out / "deepfuse.json").read_text())
    for rec in manifest["sources"]:
        rec["files"].update({"../secret": "0" * 64, str(secret): "0" * 64, "../../../../etc/hostname": "0" * 64})
    (out / "deepfuse.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    result = runner.invoke(app, ["verify", str(out), "--probes", "1", "--seq-len", "4"])
    assert result.exit_code == 0, result.output
    assert secret.resolve() not in hashed and not [p for p in hashed if p.name == "hostname"], hashed
    assert (GOOD / "model.safetensors").resolve() in hashed  # the source's own file is checked


def test_verify_integrity_does_not_follow_links_out_of_the_checkpoint(fused, tmp_path, hashed):
    out = copy_of(fused, tmp_path, "fused")
    outside = tmp_path / "config.json"
    shutil.move(out / "config.json", outside)
    (out / "config.json").symlink_to(outside)
    result = runner.invoke(app, ["verify", str(out), "--integrity-only"])
    assert result.exit_code == 1 and "config.json is not a file of" in result.stderr, result.output
    assert outside.resolve() not in hashed


# ---- 8. the manifest: typed, and never executed ------------------------------------------------------------------
def test_manifest_round_trips_byte_for_byte(fused):
    text = (fused / "deepfuse.json").read_text()
    assert Manifest.read(fused / "deepfuse.json").dumps() == text
    assert json.loads(Manifest.model_validate_json(text).dumps()) == json.loads(text)


@pytest.mark.parametrize("change, contains", [
    (lambda m: m.update(seed="0"), ["seed", "valid integer"]),
    (lambda m: m.update(colour="red"), ["colour", "Extra inputs"]),
    (lambda m: m["noise"].update(std="lots"), ["noise.std"]),
    (lambda m: m.update(weights=[0.5]), ["weights has 1 entries for n = 2"]),
    (lambda m: m.update(dtype="float7"), ["dtype"]),
    (lambda m: m.pop("files"), ["files", "Field required"]),
])
def test_manifest_with_wrong_types_is_one_clean_error(change, contains, fused, tmp_path):
    out = copy_of(fused, tmp_path, "fused")
    manifest = json.loads((out / "deepfuse.json").read_text())
    change(manifest)
    (out / "deepfuse.json").write_text(json.dumps(manifest))
    refuse("verify", out, contains=["deepfuse.json", "invalid manifest", *contains], watch=[out])


def _fused_with_own_rules(tmp_path: Path) -> tuple[Path, Path]:
    rules = json.loads(runner.invoke(app, ["rules", "show", "llama", "--json"]).stdout)
    rules["description"] = "my own llama rules"
    path = tmp_path / "my-rules.json"
    path.write_text(json.dumps(rules))
    out = tmp_path / "fused"
    run_ok("self-fuse", GOOD, "--rules", path, "-o", out, "-q")
    return out, path


def test_rules_in_the_manifest_are_never_compiled(tmp_path):
    """A pattern that backtracks forever, put in the manifest: verify refuses it at once (only a built-in
    preset's rules are taken from a manifest, recognised by digest), and runs with --rules."""
    out, path = _fused_with_own_rules(tmp_path)
    manifest = json.loads((out / "deepfuse.json").read_text())
    manifest["rules"]["rules"][0]["pattern"] = "(.*.*)*X"
    (out / "deepfuse.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "deepfuse_cli", "verify", str(out)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr, res.stderr
    assert "not a built-in preset" in res.stderr and "--rules" in res.stderr
    assert time.monotonic() - start < 60


def test_own_rules_verify_with_rules_option(tmp_path):
    out, path = _fused_with_own_rules(tmp_path)
    refuse("verify", out, contains=["not a built-in preset"], hint="--rules", watch=[out])
    result = runner.invoke(app, ["verify", str(out), "--rules", str(path), "--probes", "1", "--seq-len", "4"])
    assert result.exit_code == 0, result.output


# ---- 9. output races and leftovers ------------------------------------------------------------------------------
def test_two_runs_to_one_output_never_replace_each_other(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "deepfuse_cli", "self-fuse", str(GOOD), "-o", str(out), "-q"]
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert loser.startswith("error: ") and ("already exists" in loser or "appeared while" in loser), loser
    assert not leftovers(tmp_path)
    result = runner.invoke(app, ["verify", str(out), "--integrity-only"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("noreplace", [True, False])
def test_an_output_appearing_meanwhile_is_not_replaced(noreplace, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = fuse_module._make_temp

    def someone_else_writes(output):
        made = real(output)
        out.mkdir()
        (out / "theirs").write_text("keep me")
        return made

    monkeypatch.setattr(fuse_module, "_make_temp", someone_else_writes)
    if not noreplace:  # where renameat2 is missing: the lock and the check under it
        monkeypatch.setattr(fuse_module, "_libc", lambda: None)
    refuse("self-fuse", GOOD, "-o", out, contains=["appeared while this run was writing"], hint="--force",
           watch=[GOOD])
    assert [p.name for p in out.iterdir()] == ["theirs"] and not leftovers(tmp_path)


def test_rename_refuses_to_replace(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()  # empty: a plain rename would replace it silently
    with pytest.raises(FileExistsError):
        fuse_module._rename_noreplace(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a").is_dir()


def test_temp_dirs_of_dead_runs_are_removed_and_live_ones_kept(tmp_path):
    dead = tmp_path / ".out.deepfuse-tmp-999999999"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")
    live = tmp_path / ".out.deepfuse-tmp-999999998"
    live.mkdir()
    other = tmp_path / ".other.deepfuse-tmp-999999997"
    other.mkdir()
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a run still writing holds this
        run_ok("self-fuse", GOOD, "-o", tmp_path / "out", "-q")
        assert not dead.exists() and live.is_dir() and other.is_dir()
    finally:
        os.close(fd)


def test_temp_dir_of_a_killed_run_is_removed_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    # a run that dies with SIGKILL after creating (and locking) its temporary directory
    code = ("import os, signal; from pathlib import Path; from deepfuse_cli import fuse; "
            f"fuse._make_temp(Path({str(out)!r})); os.kill(os.getpid(), signal.SIGKILL)")
    res = subprocess.run([sys.executable, "-c", code], timeout=120)
    assert res.returncode == -9
    assert leftovers(tmp_path)
    run_ok("self-fuse", GOOD, "-o", out, "-q")
    assert not leftovers(tmp_path) and (out / "deepfuse.json").is_file()


def test_dangling_symlink_output(tmp_path):
    target = tmp_path / "missing" / "deeper" / "target"
    (tmp_path / "out").symlink_to(target)
    refuse("self-fuse", GOOD, "-o", tmp_path / "out", contains=["already exists", "symlink"], hint="--force")
    assert (tmp_path / "out").is_symlink() and not (tmp_path / "missing").exists()
    run_ok("self-fuse", GOOD, "-o", tmp_path / "out", "--force", "-q")  # the link is replaced, not followed
    assert (tmp_path / "out").is_dir() and not (tmp_path / "out").is_symlink() and not (tmp_path / "missing").exists()
    assert not leftovers(tmp_path)


def test_output_through_a_symlinked_directory(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    run_ok("self-fuse", GOOD, "-o", tmp_path / "link" / "out", "-q")
    assert (tmp_path / "real" / "out" / "deepfuse.json").is_file() and not leftovers(tmp_path)


def test_output_name_too_long(tmp_path):
    for out in (tmp_path / ("x" * 250), tmp_path / ("y" * 300) / "out"):
        refuse("self-fuse", GOOD, "-o", out, contains=["name too long"], hint="shorter", watch=[GOOD], tmp=tmp_path)
        assert not list(tmp_path.iterdir())


# ---- 10. report paths ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--report", "--junit", "--markdown"])
@pytest.mark.parametrize("where, contains", [
    (lambda tmp: tmp / "missing" / "report", ["does not exist"]),
    (lambda tmp: tmp, ["is a directory"]),
])
def test_report_paths_are_checked_before_verifying(flag, where, contains, fused, tmp_path, monkeypatch):
    import deepfuse_cli.verify as verify_pkg

    def never(*args, **kwargs):
        raise AssertionError("verification ran before the report path was checked")

    monkeypatch.setattr(verify_pkg, "run_verify", never)
    path = where(tmp_path)
    refuse("verify", fused, flag, path, contains=[flag, str(path), *contains], watch=[fused])
    assert not (tmp_path / "missing").exists()
