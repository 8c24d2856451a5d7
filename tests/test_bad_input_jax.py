"""Bad T5X / Orbax inputs through the CLI, each built under tmp_path from a copy of a fixture.

Every refusal: exit 2, exactly one ``error:`` line naming the file or array and the problem, nothing
but error/hint/note lines on stderr, no traceback, no output or temporary directory left behind, and
the input byte-identical before and after the command.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import msgpack
import numpy as np
import pytest
import tensorstore as ts
from typer.testing import CliRunner

from deepfuse_cli.cli import app

from .conftest import FIXTURES
from .helpers import clean_refusal, digest_tree

T5X = FIXTURES / "t5x"
ORBAX = FIXTURES / "orbax"
runner = CliRunner()
NAN_TENSOR = "target/encoder/layers_0/mlp/wi_0/kernel"


def leftovers(*dirs: Path) -> list[str]:
    return [str(p) for d in dirs if d.exists() for p in d.rglob("*")
            if ".deepfuse-tmp-" in p.name or "deepfuse-old" in p.name]


def invoke(args: list, watched: list[Path]):
    before = [digest_tree(p) for p in watched]
    result = runner.invoke(app, [str(a) for a in args])
    assert [digest_tree(p) for p in watched] == before, "an input changed"
    return result


def refuse(args: list, contains: list[str], watched: list[Path], tmp: Path) -> str:
    """Run the CLI expecting a clean refusal; return the one error line."""
    result = invoke(args, watched)
    error = clean_refusal(result, contains)
    assert not (tmp / "out").exists(), "output written"
    assert not leftovers(tmp), leftovers(tmp)
    return error


# ---- building the cases ------------------------------------------------------------------------------
def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def edit_msgpack(step_dir: Path, edit) -> None:
    path = step_dir / "checkpoint"
    tree = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False)  # ext types kept as they are
    edit(tree)
    path.write_bytes(msgpack.packb(tree, use_bin_type=True))


def spec_of(tree: dict, name: str) -> dict:
    node = tree["optimizer"]
    for key in name.split("/"):
        node = node[key]
    return node


def t5x_case(tmp: Path, case: str) -> tuple[Path, list[str]]:
    """A damaged copy of legacy-a under tmp and the texts its error line must contain."""
    root = copy(T5X / "legacy-a", tmp / case)
    step = root / "checkpoint_1000"
    if case == "missing-array":
        shutil.rmtree(step / "target.encoder.layers_1.mlp.wo.kernel")
        return root, [str(step / "checkpoint"), "'target/encoder/layers_1/mlp/wo/kernel'", "missing on disk"]
    if case == "truncated-chunk":
        chunk = step / "target.decoder.logits_dense.kernel" / "0.0"
        chunk.write_bytes(chunk.read_bytes()[:-20])
        return root, ["'target/decoder/logits_dense/kernel'", "target.decoder.logits_dense.kernel/", "cannot be read"]
    if case in ("spec-absolute", "spec-dotdot"):
        outside = copy(step / "target.encoder.encoder_norm.scale", tmp / "outside")  # valid: following would work
        path = str(outside) + "/" if case == "spec-absolute" else "../../outside/"
        edit_msgpack(step, lambda t: spec_of(t, "target/encoder/encoder_norm/scale")["kvstore"].update(path=path))
        return root, [str(step / "checkpoint"), "'target/encoder/encoder_norm/scale'",
                      "is absolute" if case == "spec-absolute" else "leaves the checkpoint directory"]
    if case == "version-4":
        edit_msgpack(step, lambda t: t.update(version=4))
        return root, [str(step / "checkpoint"), "unsupported T5X checkpoint format version 4"]
    if case == "garbage-msgpack":
        (step / "checkpoint").write_bytes(b"\x85garbage" + bytes(range(200)))
        return root, [str(step / "checkpoint"), "not a valid T5X checkpoint file"]
    if case == "renamed-param":
        def rename(t):
            mlp = t["optimizer"]["target"]["encoder"]["layers_0"]["mlp"]
            mlp["wz"] = mlp.pop("wo")
        edit_msgpack(step, rename)
        return root, ["'target/encoder/layers_0/mlp/wz/kernel'"]
    if case == "nan-param":
        store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(step / NAN_TENSOR.replace("/", "."))
                                                       + "/"}}, open=True).result()
        values = store.read().result()
        values[0, :3] = np.nan
        store.write(values).result()
        return root, [repr(NAN_TENSOR), "3 non-finite"]
    raise AssertionError(case)


def orbax_case(tmp: Path, case: str) -> tuple[Path, list[str]]:
    item = copy(ORBAX / "std-a", tmp / case)
    meta_path = item / "_METADATA"
    if case == "orbax-garbage-metadata":
        meta_path.write_bytes(b"\x00\xffnot json")
        return item, [str(meta_path)]
    if case == "orbax-missing-array":
        meta = json.loads(meta_path.read_text())
        keys = ["target", "ghost", "kernel"]
        meta["tree_metadata"][str(tuple(keys))] = {
            "key_metadata": [{"key": k, "key_type": 2} for k in keys],
            "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False, "write_shape": [2, 2]}}
        meta_path.write_text(json.dumps(meta))
        return item, [str(item), "'target/ghost/kernel'", "listed in _METADATA but missing from the OCDBT database"]
    if case == "orbax-truncated-data":
        for data in (item / "ocdbt.process_0" / "d").iterdir():
            data.write_bytes(data.read_bytes()[:100])
        return item, [str(item), "OCDBT"]
    raise AssertionError(case)


# ---- the cases -----------------------------------------------------------------------------------
#: case -> whether `inspect` (which reads no tensor data) refuses it too
T5X_CASES = {"missing-array": True, "truncated-chunk": False, "spec-absolute": True, "spec-dotdot": True,
             "version-4": True, "garbage-msgpack": True, "renamed-param": False, "nan-param": False}
ORBAX_CASES = {"orbax-garbage-metadata": True, "orbax-missing-array": True, "orbax-truncated-data": False}


@pytest.mark.parametrize("case", [*T5X_CASES, *ORBAX_CASES])
def test_bad_source_is_refused(case, tmp_path):
    src, contains = (t5x_case if case in T5X_CASES else orbax_case)(tmp_path, case)
    line = refuse(["self-fuse", src, "--times", "2", "-o", tmp_path / "out"], contains, [src], tmp_path)
    result = invoke(["inspect", src], [src])
    if {**T5X_CASES, **ORBAX_CASES}[case]:
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")] == [line]
    else:  # the damage is in the tensor data or the rules, which inspect does not check
        assert result.exit_code == 0, result.output


def test_neither_format(tmp_path):
    src = tmp_path / "plain"
    src.mkdir()
    (src / "notes.txt").write_text("not a checkpoint")
    (src / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-1"\n')  # a TF checkpoint index, not T5X
    line = refuse(["self-fuse", src, "--times", "2", "-o", tmp_path / "out"], [str(src)], [src], tmp_path)
    assert refuse(["inspect", src], [str(src)], [src], tmp_path) == line


def test_missing_step_lists_the_steps_found(tmp_path):
    src = copy(T5X / "legacy-a-steps", tmp_path / "steps")
    line = refuse(["self-fuse", src, "--times", "2", "-o", tmp_path / "out", "--step", "700"],
                  [str(src), "no checkpoint for step 700", "steps found: 500, 1000"], [src], tmp_path)
    assert refuse(["inspect", src, "--step", "700"], [], [src], tmp_path) == line


def test_nonfinite_t5x_source_fuses_with_the_flag(tmp_path):
    src, _ = t5x_case(tmp_path, "nan-param")
    out = tmp_path / "out"
    result = invoke(["self-fuse", src, "--times", "2", "-o", out, "--allow-nonfinite"], [src])
    assert result.exit_code == 0, result.output
    assert "non-finite" in result.stderr and NAN_TENSOR in result.stderr
    assert any(e["tensor"] == NAN_TENSOR and e["count"] == 3 for e in json.loads((out / "deepfuse.json").read_text())
               ["nonfinite"])
    assert not leftovers(tmp_path)


def drop_last_layers(tree: dict) -> None:
    for part in (tree["optimizer"]["target"], tree["optimizer"]["state"]["param_states"]):
        for stack in ("encoder", "decoder"):
            del part[stack]["layers_1"]


@pytest.mark.parametrize("other, contains", [
    ("legacy-a-steps", ["vocab_size", "has 64", "has 8"]),  # a smaller model
    ("legacy-b-shallow", ["num_encoder_layers", "has 2", "has 1"]),  # legacy-b with its last layers dropped
])
def test_t5x_sources_of_different_shapes_are_refused(other, contains, tmp_path):
    a = copy(T5X / "legacy-a", tmp_path / "a")
    b = copy(T5X / other.removesuffix("-shallow"), tmp_path / other)
    if other.endswith("-shallow"):
        edit_msgpack(b / "checkpoint_1000", drop_last_layers)
    contains = [*contains, str(a), str(b)]
    refuse(["fuse", a, b, "-o", tmp_path / "out"], contains, [a, b], tmp_path)

