"""Orbax adapter: read the fixtures orbax-checkpoint wrote, write checkpoints orbax restores,
round trips for every layout and zarr format, and bad input as one-line InputErrors."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

from deepfuse_cli.errors import InputError
from deepfuse_cli.formats import orbax, staged_file
from deepfuse_cli.formats.arrays import to_numpy, to_torch
from deepfuse_cli.formats.base import OutputTensor
from fixtures.t5x_trees import flatten, train_state

ROOT = Path(__file__).resolve().parent.parent
ORBAX = ROOT / "fixtures" / "orbax"


def expected(seed: int, step: int = 1000) -> dict[str, np.ndarray]:
    return flatten(train_state(seed, step=step))


def nested_to_flat(tree, prefix: str = "") -> dict:
    """'/'-joined paths -> leaves of a restored tree (dicts and lists)."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else None
    if items is None:
        return {prefix: tree}
    out = {}
    for k, v in items:
        out.update(nested_to_flat(v, f"{prefix}/{k}" if prefix else str(k)))
    return out


def assert_matches(ckpt, values: dict[str, np.ndarray]) -> None:
    """Tensors = the target/ arrays, optimizer state = the other arrays, step aside; values exact."""
    params = sorted(n for n in values if n.startswith("target/"))
    others = sorted(n for n in values if not n.startswith("target/") and n != "state/step")
    assert list(ckpt.tensors) == params
    assert sorted(ckpt.metadata["optimizer_state"]) == others
    for name, ref in [*ckpt.tensors.items(), *ckpt.metadata["optimizer_state"].items()]:
        want = values[name]
        assert ref.shape == want.shape and to_numpy(torch.empty(0, dtype=ref.dtype)).dtype == want.dtype, name
        got = ref.load()
        assert tuple(got.shape) == ref.shape and got.dtype == ref.dtype
        np.testing.assert_array_equal(to_numpy(got), want, err_msg=f"{name} (fixtures stale? run "
                                      "python fixtures/make_orbax_fixtures.py)")
    assert int(ckpt.metadata["other_leaves"]["state/step"]) == int(values["state/step"])
    assert ckpt.metadata["step"] == int(values["state/step"])


def write(out: Path, ckpt, **meta):
    """Write a read checkpoint back (parameters, optimizer state and other leaves) with OrbaxWriter."""
    refs = [*ckpt.tensors.values(), *ckpt.metadata["optimizer_state"].values()]
    md = dict(ckpt.metadata, extra_leaves=ckpt.metadata["other_leaves"])
    md.update(meta)
    w = orbax.OrbaxWriter(out, [OutputTensor(r.name, r.shape, r.dtype) for r in refs], md)
    for r in refs:
        w.write(r.name, r.load())
    return w, w.finish()


def item_dir(out: Path, layout: str, step: int = 1000, item: str = "default") -> Path:
    return {"item": out, "step": out / item, "root": out / str(step) / item}[layout]


def orbax_restore(path: Path):
    import orbax.checkpoint as ocp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ocp.StandardCheckpointer().restore(path)


def assert_restored(tree, values: dict[str, np.ndarray]) -> None:
    flat = nested_to_flat(tree)
    assert sorted(flat) == sorted(values)
    for name, want in values.items():
        got = np.asarray(flat[name])
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)


# ---------------------------------------------------------------------------------------------
# reading what orbax-checkpoint wrote


@pytest.mark.parametrize("name, seed", [("std-a", 0), ("std-b", 1)])
def test_read_standard_checkpointer_fixtures(name, seed):
    ckpt = orbax.read_orbax(ORBAX / name)
    assert ckpt.format == "orbax" and ckpt.path == ORBAX / name and ckpt.config is None
    md = ckpt.metadata
    assert (md["layout"], md["item"], md["zarr_format"]) == ("item", None, 2)
    assert_matches(ckpt, expected(seed))
    assert list(ckpt.tensors)[0] == "target/decoder/decoder_norm/scale"  # sorted tree order
    files = {p.relative_to(ORBAX / name).as_posix() for p in ckpt.weight_files}
    assert {"_METADATA", "manifest.ocdbt"} <= files and any(f.startswith("ocdbt.process_0/d/") for f in files)
    assert all(p.is_file() for p in ckpt.weight_files)


def test_read_checkpoint_manager_root_and_steps():
    root = ORBAX / "mgr-a"
    assert orbax.is_orbax_checkpoint(root)
    latest = orbax.read_orbax(root)
    assert (latest.metadata["layout"], latest.metadata["item"], latest.metadata["step"]) == ("root", "default", 1000)
    assert_matches(latest, expected(0, step=1000))
    old = orbax.read_orbax(root, step=500)
    assert_matches(old, expected(0, step=500))
    assert all(str(p).startswith(str(root / "500" / "default")) for p in old.weight_files)
    with pytest.raises(InputError, match=r"no step 7 .*steps found: 500, 1000") as err:
        orbax.read_orbax(root, step=7)
    assert "\n" not in str(err.value) and "hint" in str(err.value)

    step_dir = orbax.read_orbax(root / "500")
    assert (step_dir.metadata["layout"], step_dir.metadata["item"], step_dir.metadata["step"]) == ("step", "default", 500)
    item = orbax.read_orbax(root / "500" / "default", step=500)
    assert (item.metadata["layout"], item.metadata["step"]) == ("item", 500)
    with pytest.raises(InputError, match="holds step 500, not step 1000"):
        orbax.read_orbax(root / "500" / "default", step=1000)


def test_read_v1_api_zarr3_fixture():
    ckpt = orbax.read_orbax(ORBAX / "v1-a")
    assert (ckpt.metadata["layout"], ckpt.metadata["item"], ckpt.metadata["zarr_format"]) == ("step", "state", 3)
    assert_matches(ckpt, expected(0))


def test_detection(tmp_path):
    for name in ("std-a", "mgr-a", "mgr-a/1000", "v1-a", "v1-a/state"):
        assert orbax.is_orbax_checkpoint(ORBAX / name), name
    assert not orbax.is_orbax_checkpoint(ROOT / "fixtures" / "hf" / "llama-a")
    assert not orbax.is_orbax_checkpoint(tmp_path)
    assert not orbax.is_orbax_checkpoint(ORBAX / "std-a" / "_METADATA")


# ---------------------------------------------------------------------------------------------
# writing: round trips, orbax restores our output, reproducibility


@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("layout", ["item", "step", "root"])
def test_round_trip_and_orbax_restores(tmp_path, layout, zarr_format):
    src = orbax.read_orbax(ORBAX / "std-a")
    out = tmp_path / "out"
    w, files = write(out, src, layout=layout, zarr_format=zarr_format, item="default")
    assert sorted(p.as_posix() for p in files) == sorted(w.digests)
    for rel, digest in w.digests.items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == digest
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(w.digests)

    back = orbax.read_orbax(out)
    md = back.metadata
    assert (md["layout"], md["zarr_format"], md["step"]) == (layout, zarr_format, 1000)
    assert md["item"] == (None if layout == "item" else "default")
    assert_matches(back, expected(0))
    assert md["value_types"] == src.metadata["value_types"] and md["tree_keys"] == src.metadata["tree_keys"]

    assert_restored(orbax_restore(item_dir(out, layout)), expected(0))
    if layout == "root":
        import orbax.checkpoint as ocp

        with ocp.CheckpointManager(out) as manager:
            assert manager.all_steps() == [1000] and manager.latest_step() == 1000
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                assert_restored(manager.restore(1000, args=ocp.args.StandardRestore()), expected(0))
                assert_restored(manager.restore(1000), expected(0))


def test_output_is_byte_reproducible(tmp_path):
    src = orbax.read_orbax(ORBAX / "mgr-a")
    w1, f1 = write(tmp_path / "one", src)
    w2, f2 = write(tmp_path / "t w%20o #?", src)  # also: odd characters in the path
    assert f1 == f2 and w1.digests == w2.digests
    assert any(p.as_posix().startswith("1000/default/d/") for p in f1)
    assert_matches(orbax.read_orbax(tmp_path / "t w%20o #?"), expected(0))


def test_bfloat16_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    values = {"params/dense/kernel": rng.standard_normal((8, 5)).astype(ml_dtypes.bfloat16),
              "params/dense/bias": rng.standard_normal(5).astype(ml_dtypes.bfloat16),
              "params/embed/embedding": rng.standard_normal((300, 16)).astype(ml_dtypes.bfloat16)}
    tensors = [OutputTensor(n, v.shape, torch.bfloat16) for n, v in values.items()]
    for zarr_format in (2, 3):
        out = tmp_path / f"bf16-{zarr_format}"
        w = orbax.OrbaxWriter(out, tensors, {"zarr_format": zarr_format, "extra_leaves": {"step": 7}})
        for n, v in values.items():
            w.write(n, to_torch(v))
        w.finish()
        back = orbax.read_orbax(out)
        assert list(back.tensors) == sorted(values) and back.metadata["step"] == 7
        for n, ref in back.tensors.items():
            assert ref.dtype == torch.bfloat16
            np.testing.assert_array_equal(to_numpy(ref.load()).view(np.uint16), values[n].view(np.uint16))
        restored = nested_to_flat(orbax_restore(out))
        assert restored["step"] == 7
        for n, v in values.items():
            got = np.asarray(restored[n])
            assert got.dtype == ml_dtypes.bfloat16
            np.testing.assert_array_equal(got.view(np.uint16), v.view(np.uint16))


def test_extra_leaves_of_every_kind(tmp_path):
    out = tmp_path / "out"
    extra = {"step": 12, "lr": 0.25, "name": "run-7", "nothing": None, "empty": {},
             "state/count": np.array([1, 2, 3], np.int32), "state/flag": torch.tensor(True)}
    w = orbax.OrbaxWriter(out, [OutputTensor("params/w", (2, 2), torch.float32)], {"extra_leaves": extra})
    w.write("params/w", torch.arange(4.0).reshape(2, 2))
    w.finish()
    back = orbax.read_orbax(out)
    other = back.metadata["other_leaves"]
    assert back.metadata["step"] == 12 and other["step"] == 12 and other["lr"] == 0.25
    assert other["name"] == "run-7" and other["nothing"] is None and other["empty"] == {}
    assert set(back.metadata["optimizer_state"]) == {"state/count", "state/flag"}
    restored = orbax_restore(out)
    assert restored["step"] == 12 and restored["lr"] == 0.25 and restored["name"] == "run-7"
    assert restored["nothing"] is None and restored["empty"] == {}
    np.testing.assert_array_equal(np.asarray(restored["state"]["count"]), [1, 2, 3])
    assert bool(restored["state"]["flag"]) is True
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), np.arange(4.0, dtype=np.float32).reshape(2, 2))


def test_writer_streams_and_aborts(tmp_path, monkeypatch):
    monkeypatch.setattr(staged_file, "STAGE_BYTES", 4096)
    monkeypatch.setattr(staged_file, "STAGES", 2)  # the third staging buffer waits for the first write
    out = tmp_path / "out"
    tensors = [OutputTensor(f"params/w{i}", (64, 64), torch.float32) for i in range(2)]
    w = orbax.OrbaxWriter(out, tensors, {})
    w.write("params/w0", torch.randn(64, 64))  # ~15 KB compressed: more than three staging buffers
    assert [p.name for p in (out / "d").iterdir()] == [".partial-0"]  # data is on disk before finish
    assert (out / "d" / ".partial-0").stat().st_size >= 4096
    w.abort()
    assert not list((out / "d").iterdir())


def test_ocdbt_writer_multiple_data_files(tmp_path):
    import tensorstore as ts

    db = orbax.OcdbtWriter(tmp_path, max_inline=4, target_file_size=16)
    pairs = {b"a/0": b"0123456789", b"a/.zarray": b"xyz", b"ab/0": b"QQ", b"k2": b"B" * 12, b"k3": b"C" * 3000,
             b"k4": b"0123456789"}
    for k, v in pairs.items():
        db.put(k, v)
    files = db.finish()
    assert sum(f.startswith("d/") for f in files) == 4  # three value files (two equal ones share a name) + node
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{tmp_path}/"}).result()
    assert kv.list().result() == sorted(pairs)
    for k, v in pairs.items():
        assert kv.read(k).result().value == v


# ---------------------------------------------------------------------------------------------
# bad input


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def copy_fixture(tmp_path: Path, name: str = "std-a") -> Path:
    dst = tmp_path / name
    shutil.copytree(ORBAX / name, dst)
    return dst


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="not an Orbax checkpoint") as err:
        orbax.read_orbax(tmp_path)
    assert "hint" in one_line(err)
    with pytest.raises(InputError):
        orbax.read_orbax(tmp_path / "notes.txt")


def test_garbage_metadata(tmp_path):
    ckpt = copy_fixture(tmp_path)
    (ckpt / "_METADATA").write_bytes(b"\x00\xffnot json")
    with pytest.raises(InputError, match="_METADATA") as err:
        orbax.read_orbax(ckpt)
    one_line(err)
    (ckpt / "_METADATA").write_text(json.dumps({"tree": {}}))
    with pytest.raises(InputError, match="no 'tree_metadata'"):
        orbax.read_orbax(ckpt)
    (ckpt / "_METADATA").write_text(json.dumps({"tree_metadata": {"x": {"key_metadata": 3}}}))
    with pytest.raises(InputError, match="malformed tree_metadata entry 'x'"):
        orbax.read_orbax(ckpt)


def test_array_listed_but_missing_from_database(tmp_path):
    ckpt = copy_fixture(tmp_path)
    meta = json.loads((ckpt / "_METADATA").read_text())
    meta["tree_metadata"]["('target', 'ghost', 'kernel')"] = {
        "key_metadata": [{"key": "target", "key_type": 2}, {"key": "ghost", "key_type": 2},
                         {"key": "kernel", "key_type": 2}],
        "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False, "write_shape": [2, 2]}}
    (ckpt / "_METADATA").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="'target/ghost/kernel' is listed in _METADATA but missing") as err:
        orbax.read_orbax(ckpt)
    assert "hint" in one_line(err)


def test_truncated_database_files(tmp_path):
    ckpt = copy_fixture(tmp_path)
    for data in (ckpt / "ocdbt.process_0" / "d").iterdir():  # the root manifest references some of them
        data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(InputError, match="OCDBT") as err:
        c = orbax.read_orbax(ckpt)
        for ref in [*c.tensors.values(), *c.metadata["optimizer_state"].values()]:
            ref.load()
    one_line(err)

    ckpt2 = copy_fixture(tmp_path / "two")
    manifest = ckpt2 / "manifest.ocdbt"
    manifest.write_bytes(manifest.read_bytes()[:40])
    with pytest.raises(InputError, match="OCDBT") as err:
        orbax.read_orbax(ckpt2)
    one_line(err)

    ckpt3 = copy_fixture(tmp_path / "three")
    (ckpt3 / "manifest.ocdbt").unlink()
    with pytest.raises(InputError, match="no manifest.ocdbt"):
        orbax.read_orbax(ckpt3)


def test_ambiguous_items(tmp_path):
    step = tmp_path / "1000"
    shutil.copytree(ORBAX / "std-a", step / "params")
    shutil.copytree(ORBAX / "std-b", step / "ema")
    with pytest.raises(InputError, match=r"several Orbax items \(ema, params\)") as err:
        orbax.read_orbax(step)
    one_line(err)
    with pytest.raises(InputError, match="several Orbax items"):
        orbax.read_orbax(tmp_path)
    assert orbax.read_orbax(step / "ema").metadata["layout"] == "item"


@pytest.mark.parametrize("meta, match", [
    ({"layout": "flat"}, "unknown Orbax layout"),
    ({"zarr_format": 4}, "zarr_format must be 2 or 3"),
    ({"layout": "root"}, "needs a step"),
    ({"step": "ten"}, "step must be an integer"),
    ({"item": "a/b"}, "invalid Orbax item name"),
    ({"extra_leaves": {"state/obj": object()}}, "cannot store a object"),
    ({"extra_leaves": {"params/w": 1}}, "given twice"),
    ({"extra_leaves": {"params.w": 1}}, "would both be stored as 'params.w'"),
])
def test_writer_refuses_bad_metadata(tmp_path, meta, match):
    with pytest.raises(InputError, match=match) as err:
        orbax.OrbaxWriter(tmp_path / "out", [OutputTensor("params/w", (2,), torch.float32)], meta)
    one_line(err)


def test_writer_refuses_wrong_tensor(tmp_path):
    w = orbax.OrbaxWriter(tmp_path / "out", [OutputTensor("params/w", (2,), torch.float32)], {})
    with pytest.raises(InputError, match="'params/w' is torch.float16\\[2\\], planned torch.float32\\[2\\]"):
        w.write("params/w", torch.zeros(2, dtype=torch.float16))


def test_written_metadata_matches_what_orbax_wrote(tmp_path):
    """_METADATA and _sharding written back are the JSON orbax-checkpoint wrote for the same tree."""
    src = orbax.read_orbax(ORBAX / "std-a")
    write(tmp_path / "out", src)
    for name in ("_METADATA", "_sharding"):
        assert json.loads((tmp_path / "out" / name).read_text()) == json.loads((ORBAX / "std-a" / name).read_text())
    assert (tmp_path / "out" / "_METADATA").read_bytes() == (ORBAX / "std-a" / "_METADATA").read_bytes()


def test_v1_round_trip_loads_with_the_v1_api(tmp_path):
    import orbax.checkpoint as ocp

    src = orbax.read_orbax(ORBAX / "v1-a")
    write(tmp_path / "out", src)
    back = orbax.read_orbax(tmp_path / "out")
    assert (back.metadata["layout"], back.metadata["item"], back.metadata["zarr_format"]) == ("step", "state", 3)
    handlers = json.loads((tmp_path / "out" / "_CHECKPOINT_METADATA").read_text())["item_handlers"]
    assert handlers == src.metadata["checkpoint_metadata"]["item_handlers"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_restored(ocp.v1.load_pytree(tmp_path / "out"), expected(0))


def test_large_arrays_are_chunked(tmp_path, monkeypatch):
    assert orbax._chunk_shape((40, 30), 4, limit=1000) == [8, 30]
    assert orbax._chunk_shape((2, 300), 4, limit=1000) == [1, 250]
    assert orbax._chunk_shape((5, 6), 4, limit=1000) == [5, 6]
    assert orbax._chunk_shape((), 4, limit=1000) == []
    monkeypatch.setattr(orbax, "CHUNK_BYTES", 1000)
    value = np.arange(1200, dtype=np.float32).reshape(40, 30)
    for zarr_format in (2, 3):
        out = tmp_path / f"z{zarr_format}"
        w = orbax.OrbaxWriter(out, [OutputTensor("params/big", (40, 30), torch.float32)], {"zarr_format": zarr_format})
        w.write("params/big", torch.from_numpy(value))
        w.finish()
        np.testing.assert_array_equal(to_numpy(orbax.read_orbax(out).tensors["params/big"].load()), value)
        np.testing.assert_array_equal(np.asarray(orbax_restore(out)["params"]["big"]), value)


def test_zarr3_chunks_equal_to_the_fill_value_are_stored(tmp_path):
    """zarr3 skips chunks equal to the fill value unless told otherwise; orbax then fails on restore."""
    import tensorstore as ts

    w = orbax.OrbaxWriter(tmp_path, [OutputTensor("params/zeros", (4, 4), torch.float32)], {"zarr_format": 3})
    w.write("params/zeros", torch.zeros(4, 4))
    w.finish()
    kv = ts.KvStore.open({"driver": "ocdbt", "base": {"driver": "file", "path": f"{tmp_path}/"}}).result()
    assert kv.list().result() == [b"params.zeros/c/0/0", b"params.zeros/zarr.json"]
    np.testing.assert_array_equal(np.asarray(orbax_restore(tmp_path)["params"]["zeros"]), np.zeros((4, 4), np.float32))


def test_value_size_and_streamed_values(tmp_path):
    import tensorstore as ts

    kv = ts.KvStore.open({"driver": "memory"}).result()
    sizes = [0, 1, 2, 3, 7, 8, 1023, 1024, 1025, 2**20 + 7]
    for n in sizes:
        kv[f"k{n}".encode()] = bytes(range(256)) * (n // 256) + bytes(n % 256)
    assert [orbax._value_size(kv, f"k{n}".encode()) for n in sizes] == sizes

    db = orbax.OcdbtWriter(tmp_path, max_inline=4)
    db.put_pieces(b"big", 10, [b"0123", b"456789"])
    db.put_pieces(b"small", 3, [b"ab", b"c"])  # inline
    with pytest.raises(RuntimeError, match="announced"):
        db.put_pieces(b"liar", 10, [b"0123"])
    with pytest.raises(ValueError, match="duplicate"):
        db.put_pieces(b"big", 5, [b"xxxxx"])
    db.abort()
