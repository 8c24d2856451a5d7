"""Legacy T5X adapter: reading the fixtures, writing as T5X writes, round trips and bad input."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts
import torch
from flax import serialization

from deepfuse_cli.errors import InputError
from deepfuse_cli.formats import t5x
from deepfuse_cli.formats.arrays import to_numpy
from deepfuse_cli.formats.base import OutputTensor

from .conftest import FIXTURES

T5X = FIXTURES / "t5x"
sys.path.insert(0, str(FIXTURES))
from make_t5x_fixtures import TINY  # noqa: E402
from t5x_trees import flatten, train_state  # noqa: E402

SOURCES = {  # fixture -> (seed, step, dims) it was written from
    "legacy-a": (0, 1000, None),
    "legacy-b": (1, 1000, None),
    "legacy-a-multi": (0, 1000, None),
}


@pytest.fixture(autouse=True)
def _no_fsync(request, monkeypatch):
    """fsync is slow on a busy disk and not what most tests check (the byte-equality test keeps it)."""
    if request.node.originalname != "test_writer_bytes_equal_a_t5x_save":
        monkeypatch.setattr(t5x, "fsync_path", lambda path: None)
        monkeypatch.setattr(t5x.os, "fsync", lambda fd: None)


@pytest.fixture(scope="module", autouse=True)
def _fixtures_exist():
    if not (T5X / "legacy-a" / "checkpoint_1000" / "checkpoint").is_file():
        raise RuntimeError(f"missing fixtures in {T5X}: run `python fixtures/make_t5x_fixtures.py`")


def all_refs(ckpt):
    return list(ckpt.tensors.values()) + list(ckpt.metadata["optimizer_state"].values())


def write(ckpt, out: Path, refs=None, **meta) -> t5x.T5XWriter:
    refs = all_refs(ckpt) if refs is None else refs
    metadata = {"step": ckpt.metadata["step"], "layout": ckpt.metadata["layout"],
                "compression": ckpt.metadata["compression"], **meta}
    out.mkdir(parents=True, exist_ok=True)
    w = t5x.T5XWriter(out, [OutputTensor(r.name, r.shape, r.dtype) for r in refs], metadata)
    for r in refs:
        w.write(r.name, r.load())
    w.files = w.finish()
    return w


def assert_same(a, b):
    assert list(a.tensors) == list(b.tensors)
    assert list(a.metadata["optimizer_state"]) == list(b.metadata["optimizer_state"])
    assert a.metadata["step"] == b.metadata["step"]
    assert a.metadata["version"] == b.metadata["version"]
    for ra, rb in zip(all_refs(a), all_refs(b)):
        assert (ra.name, ra.shape, ra.dtype) == (rb.name, rb.shape, rb.dtype)
        ta, tb = ra.load(), rb.load()
        assert ta.dtype == tb.dtype and ta.shape == tb.shape
        assert torch.equal(ta, tb), ra.name


def tree_digests(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def load_msgpack(step_dir: Path) -> dict:
    return serialization.msgpack_restore((step_dir / "checkpoint").read_bytes())


def save_msgpack(step_dir: Path, tree: dict) -> None:
    (step_dir / "checkpoint").write_bytes(serialization.msgpack_serialize(tree))


def copy_fixture(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / Path(name).name
    shutil.copytree(T5X / name, dst)
    return dst


def t5x_restore(step_dir: Path) -> dict[str, np.ndarray]:
    """What t5x's restore does with a legacy checkpoint read from local disk (flax msgpack + tensorstore)."""
    contents = serialization.msgpack_restore((step_dir / "checkpoint").read_bytes())
    assert contents["version"] == 3
    out = {}

    def visit(node, path):
        if isinstance(node, dict) and {"driver", "kvstore", "metadata"} <= set(node):
            spec = {k: (dict(v) if isinstance(v, dict) else v) for k, v in node.items()}
            kv = spec["kvstore"]
            spec["kvstore"] = {"driver": "file", "path": kv["path"]}  # _maybe_update_ts_from_gcs_to_file
            spec["metadata"] = dict(spec["metadata"])
            del spec["metadata"]["chunks"], spec["metadata"]["compressor"]  # as _read_ts does
            spec["kvstore"]["path"] = os.path.join(str(step_dir), spec["kvstore"]["path"])
            out[path] = ts.open(spec, open=True).result().read().result()
        elif isinstance(node, dict):
            for k in node:
                visit(node[k], f"{path}/{k}" if path else k)
        else:
            out[path] = node

    visit(contents["optimizer"], "")
    return out


# ---------------------------------------------------------------------------------------------- reading


def test_detection(tmp_path):
    assert t5x.is_t5x_checkpoint(T5X / "legacy-a")
    assert t5x.is_t5x_checkpoint(T5X / "legacy-a" / "checkpoint_1000")
    assert t5x.is_t5x_checkpoint(T5X / "legacy-a-steps")
    assert not t5x.is_t5x_checkpoint(FIXTURES / "hf")
    assert not t5x.is_t5x_checkpoint(tmp_path)
    (tmp_path / "checkpoint_5").mkdir()  # an unfinished or Orbax-style step dir: not ours
    (tmp_path / "checkpoint_5" / "state").mkdir()
    assert not t5x.is_t5x_checkpoint(tmp_path)
    tf_dir = tmp_path / "tf"
    tf_dir.mkdir()
    (tf_dir / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-100"\n')
    assert not t5x.is_t5x_checkpoint(tf_dir)
    orbax_item = tmp_path / "orbax"
    shutil.copytree(T5X / "legacy-a-steps" / "checkpoint_500", orbax_item)
    (orbax_item / "_METADATA").write_text("{}")
    assert not t5x.is_t5x_checkpoint(orbax_item)


@pytest.mark.parametrize("name", list(SOURCES))
def test_read_equals_source_trees(name):
    seed, step, dims = SOURCES[name]
    state = train_state(seed, step=step)
    ckpt = t5x.read_t5x(T5X / name)
    params = flatten(state["target"])
    assert list(ckpt.tensors) == [f"target/{k}" for k in params]
    for k, v in params.items():
        ref = ckpt.tensors[f"target/{k}"]
        assert ref.shape == v.shape and ref.dtype == torch.float32
        assert np.array_equal(to_numpy(ref.load()), v)
    opt = flatten(state["state"]["param_states"])
    assert list(ckpt.metadata["optimizer_state"]) == [f"state/param_states/{k}" for k in opt]
    for k, v in opt.items():
        ref = ckpt.metadata["optimizer_state"][f"state/param_states/{k}"]
        assert ref.shape == v.shape
        assert np.array_equal(to_numpy(ref.load()), v)
    md = ckpt.metadata
    assert md["step"] == 1000 and md["layout"] == "root" and md["version"] == 3
    assert md["step_dir"] == T5X / name / "checkpoint_1000"
    assert md["other_leaves"] == {}
    assert md["compression"] == ({"id": "zstd", "level": 1} if "multi" in name else {"id": "gzip", "level": 1})
    assert ckpt.format == "t5x" and ckpt.path == T5X / name and ckpt.config is None
    files = ckpt.weight_files
    assert files[0] == md["step_dir"] / "checkpoint" and all(f.is_file() for f in files)
    on_disk = {p for p in md["step_dir"].rglob("*") if p.is_file()}
    assert set(files) == on_disk  # every file of the checkpoint is read, nothing else


def test_multi_device_fixture_has_gcs_specs_and_several_chunks():
    step_dir = T5X / "legacy-a-multi" / "checkpoint_1000"
    spec = load_msgpack(step_dir)["optimizer"]["target"]["encoder"]["layers_0"]["attention"]["query"]["kernel"]
    assert spec["kvstore"]["driver"] == "gcs" and spec["kvstore"]["bucket"] == "t5x-dummy-bucket"
    assert sorted(p.name for p in (step_dir / "target.encoder.layers_0.attention.query.kernel").iterdir()) == \
        [".zarray", "0.0", "0.1", "1.0", "1.1"]


def test_shapes_known_without_reading_data(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("array data read while opening")

    monkeypatch.setattr(t5x.ts, "open", boom)
    ckpt = t5x.read_t5x(T5X / "legacy-a")
    assert ckpt.tensors["target/token_embedder/embedding"].shape == (64, 16)


def test_step_selection(tmp_path):
    root = T5X / "legacy-a-steps"
    latest = t5x.read_t5x(root)
    assert latest.metadata["step"] == 1000 and latest.metadata["step_dir"].name == "checkpoint_1000"
    early = t5x.read_t5x(root, step=500)
    assert early.metadata["step"] == 500 and early.metadata["layout"] == "root"
    want = flatten(train_state(2, step=500, dims=TINY)["target"])
    got = {k[len("target/"):]: to_numpy(r.load()) for k, r in early.tensors.items()}
    assert list(got) == list(want) and all(np.array_equal(got[k], want[k]) for k in want)
    with pytest.raises(InputError, match=r"no checkpoint for step 7 \(steps found: 500, 1000\)"):
        t5x.read_t5x(root, step=7)
    step_dir = root / "checkpoint_500"
    assert t5x.read_t5x(step_dir, step=500).metadata["layout"] == "step"
    with pytest.raises(InputError, match="is step 500, not 1000"):
        t5x.read_t5x(step_dir, step=1000)
    # temporary dirs of an interrupted save are not steps
    shutil.copytree(root, tmp_path / "r")
    shutil.copytree(root / "checkpoint_1000", tmp_path / "r" / "checkpoint_2000.tmp-1700000000")
    assert t5x.read_t5x(tmp_path / "r").metadata["step"] == 1000


# ---------------------------------------------------------------------------------------------- writing


@pytest.mark.parametrize("name,step", [("legacy-a", None), ("legacy-a-multi", None),
                                       ("legacy-a-steps", 500), ("legacy-a/checkpoint_1000", None)])
def test_round_trip(name, step, tmp_path):
    src = t5x.read_t5x(T5X / name, step=step)
    out = tmp_path / "out"
    w = write(src, out)
    back = t5x.read_t5x(out)
    assert back.metadata["layout"] == src.metadata["layout"]
    assert back.metadata["compression"] == src.metadata["compression"]
    assert_same(src, back)
    on_disk = {p.relative_to(out) for p in out.rglob("*") if p.is_file()}
    assert set(w.files) == on_disk and len(w.files) == len(on_disk)
    assert w.digests == tree_digests(out)
    if src.metadata["layout"] == "root":
        assert (out / f"checkpoint_{src.metadata['step']}" / "checkpoint").is_file()
    else:
        assert (out / "checkpoint").is_file()


@pytest.mark.parametrize("name", ["legacy-a"])
def test_writer_bytes_equal_a_t5x_save(name, tmp_path):
    """The fixtures are written the way t5x/checkpoints.py saves; the writer reproduces them byte for byte."""
    src = t5x.read_t5x(T5X / name)
    write(src, tmp_path / "out")
    fixture = {k: v for k, v in tree_digests(T5X / name).items() if k.startswith(f"checkpoint_{src.metadata['step']}/")}
    assert tree_digests(tmp_path / "out") == fixture


def test_reproducible_bytes(tmp_path):
    src = t5x.read_t5x(T5X / "legacy-a-multi")
    a, b = write(src, tmp_path / "a"), write(src, tmp_path / "b")
    assert a.digests == b.digests == tree_digests(tmp_path / "b")
    assert '"id":"zstd"' in (tmp_path / "a" / "checkpoint_1000" / "target.token_embedder.embedding" / ".zarray").read_text()


def test_default_compression_is_gzip_level_1(tmp_path):
    src = t5x.read_t5x(T5X / "legacy-a-steps")
    refs = list(src.tensors.values())[:2]
    write(src, tmp_path / "a", refs=refs, compression=None, layout="step")
    assert t5x.read_t5x(tmp_path / "a").metadata["compression"] == {"id": "gzip", "level": 1}
    write(src, tmp_path / "b", refs=refs, compression={"id": "zstd"}, layout="step")  # normalised as T5X stores it
    spec = load_msgpack(tmp_path / "b")["optimizer"]["target"]["decoder"]["decoder_norm"]["scale"]
    assert spec["metadata"]["compressor"] == {"id": "zstd", "level": 1}


def test_writer_output_restores_as_t5x_does(tmp_path):
    src = t5x.read_t5x(T5X / "legacy-b")
    write(src, tmp_path / "out", layout="step", step=42)
    restored = t5x_restore(tmp_path / "out")
    state = train_state(1)
    for k, v in flatten(state["target"]).items():
        assert np.array_equal(restored[f"target/{k}"], v)
    for k, v in flatten(state["state"]["param_states"]).items():
        assert np.array_equal(restored[f"state/param_states/{k}"], v)
    step = restored["state/step"]
    assert isinstance(step, np.ndarray) and step.shape == () and step.dtype == np.int32 and int(step) == 42
    raw = load_msgpack(tmp_path / "out")
    assert list(raw) == ["version", "optimizer"]  # as flax.serialization.to_bytes({'version': 3, 'optimizer': ...})
    kernel = raw["optimizer"]["target"]["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
    want = ts.Spec({"driver": "zarr", "dtype": "float32",
                    "kvstore": {"driver": "file", "path": "target.encoder.layers_0.mlp.wi_0.kernel"},
                    "metadata": {"compressor": {"id": "gzip"}, "shape": (16, 24), "chunks": np.array([16, 24])}})
    assert kernel == want.to_json()  # t5x's _get_spec, serialised by to_json
    leaf = raw["optimizer"]["state"]["param_states"]["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
    assert isinstance(leaf["v_row"], np.ndarray) and isinstance(leaf["v_col"], np.ndarray)  # inline
    assert isinstance(leaf["v"], np.ndarray) and leaf["v"].shape == (1,)  # placeholder inline
    scale = raw["optimizer"]["state"]["param_states"]["encoder"]["encoder_norm"]["scale"]
    assert isinstance(scale["v"], dict) and scale["v"]["kvstore"]["path"] == "state.param_states.encoder.encoder_norm.scale.v/"


def test_without_optimizer_state(tmp_path):
    src = t5x.read_t5x(T5X / "legacy-a")
    w = write(src, tmp_path / "out", refs=list(src.tensors.values()))
    raw = load_msgpack(tmp_path / "out" / "checkpoint_1000")
    assert list(raw["optimizer"]["state"]) == ["step"]
    back = t5x.read_t5x(tmp_path / "out")
    assert back.metadata["optimizer_state"] == {} and back.metadata["step"] == 1000
    assert not any("state." in f.as_posix() for f in w.files)


def test_chunk_shape_rule():
    assert t5x.choose_chunk_shape((16, 24), 2**24) == [16, 24]
    assert t5x.choose_chunk_shape((32128, 4096), 2**24) == [4016, 4096]  # largest axis shrinks first
    assert t5x.choose_chunk_shape((8, 6), 10) == [2, 3]
    assert t5x.choose_chunk_shape((), 10) == []


def write_and_read(directory: Path, tensors: dict[str, torch.Tensor], step: int):
    """Write ``tensors`` with T5XWriter (step layout), read back: (checkpoint, name -> ref of params and state)."""
    w = t5x.T5XWriter(directory, [OutputTensor(k, tuple(v.shape), v.dtype) for k, v in tensors.items()],
                      {"step": step, "layout": "step"})
    for k, v in tensors.items():
        w.write(k, v)
    w.finish()
    back = t5x.read_t5x(directory)
    return back, {**back.tensors, **back.metadata["optimizer_state"]}


def test_bfloat16_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "target/decoder/logits_dense/kernel": torch.randn(8, 12, generator=g).to(torch.bfloat16),
        "target/encoder/encoder_norm/scale": torch.randn(8, generator=g).to(torch.bfloat16),
        "state/param_states/decoder/logits_dense/kernel/v_row": torch.rand(8, generator=g).to(torch.bfloat16),
        "state/param_states/encoder/encoder_norm/scale/v": torch.rand(8, generator=g).to(torch.bfloat16),
    }
    back, got = write_and_read(tmp_path, tensors, step=7)
    assert list(got) == sorted(tensors, key=lambda n: (not n.startswith("target/"), n))
    for k, v in tensors.items():
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k].load().view(torch.int16), v.view(torch.int16))
    assert '"dtype":"bfloat16"' in (tmp_path / "target.decoder.logits_dense.kernel" / ".zarray").read_text()
    restored = t5x_restore(tmp_path)  # flax decodes the inline bfloat16 payload too
    assert restored["state/param_states/decoder/logits_dense/kernel/v_row"].dtype == ml_dtypes.bfloat16


# ---------------------------------------------------------------------------------------------- bad input


def one_line_error(fn, *args, match: str, **kwargs) -> InputError:
    with pytest.raises(InputError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return info.value


def test_not_a_t5x_checkpoint(tmp_path):
    one_line_error(t5x.read_t5x, tmp_path, match="not a T5X checkpoint")
    (tmp_path / "f.bin").write_bytes(b"x")
    one_line_error(t5x.read_t5x, tmp_path / "f.bin", match="not a T5X checkpoint directory")


def test_missing_array(tmp_path):
    root = copy_fixture("legacy-a", tmp_path)
    shutil.rmtree(root / "checkpoint_1000" / "target.encoder.layers_1.mlp.wo.kernel")
    one_line_error(t5x.read_t5x, root, match=r"array 'target/encoder/layers_1/mlp/wo/kernel' is missing on disk")


def test_missing_chunk_file(tmp_path):
    root = copy_fixture("legacy-a-multi", tmp_path)
    (root / "checkpoint_1000" / "target.token_embedder.embedding" / "1.0").unlink()
    one_line_error(t5x.read_t5x, root, match=r"'target/token_embedder/embedding' is missing on disk \(file '1.0'")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_chunk_named_at_load(damage, tmp_path):
    root = copy_fixture("legacy-a", tmp_path)
    chunk = root / "checkpoint_1000" / "target.decoder.logits_dense.kernel" / "0.0"
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 8)
    ckpt = t5x.read_t5x(root)
    ckpt.tensors["target/decoder/logits_dense/kernel"].shape  # noqa: B018 - still known
    one_line_error(ckpt.tensors["target/decoder/logits_dense/kernel"].load,
                   match=r"array 'target/decoder/logits_dense/kernel' in target.decoder.logits_dense.kernel/ cannot be read")


@pytest.mark.parametrize("path", ["ABS", "../../legacy-b/checkpoint_1000/target.encoder.encoder_norm.scale/",
                                  "sub/../../outside/"])
def test_spec_escaping_the_checkpoint_is_refused(path, tmp_path):
    root = copy_fixture("legacy-a", tmp_path)
    there = "legacy-b/checkpoint_1000/target.encoder.encoder_norm.scale"
    shutil.copytree(T5X / there, tmp_path / there)  # a valid array there: following it would "work"
    outside = tmp_path / "outside"
    shutil.copytree(root / "checkpoint_1000" / "target.encoder.encoder_norm.scale", outside)
    if path == "ABS":
        path = str(outside) + "/"
    step_dir = root / "checkpoint_1000"
    tree = load_msgpack(step_dir)
    tree["optimizer"]["target"]["encoder"]["encoder_norm"]["scale"]["kvstore"]["path"] = path
    save_msgpack(step_dir, tree)
    one_line_error(t5x.read_t5x, root, match=r"'target/encoder/encoder_norm/scale'.*(absolute|leaves the checkpoint)")


def test_symlink_out_of_the_checkpoint_is_refused(tmp_path):
    root = copy_fixture("legacy-a", tmp_path)
    arr = root / "checkpoint_1000" / "target.encoder.encoder_norm.scale"
    shutil.move(arr, tmp_path / "elsewhere")
    arr.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    one_line_error(t5x.read_t5x, root, match="resolves outside the checkpoint directory")


@pytest.mark.parametrize("kvstore", [{"driver": "gcs", "bucket": "some-training-bucket"}, {"driver": "gfile"}])
def test_gcs_and_gfile_specs_resolve_locally(kvstore, tmp_path, monkeypatch):
    root = copy_fixture("legacy-a", tmp_path)
    step_dir = root / "checkpoint_1000"
    tree = load_msgpack(step_dir)
    node = tree["optimizer"]["target"]["decoder"]["logits_dense"]["kernel"]
    node["kvstore"] = dict(kvstore, path=node["kvstore"]["path"])
    save_msgpack(step_dir, tree)
    opened = []
    real_open = t5x.ts.open
    monkeypatch.setattr(t5x.ts, "open", lambda spec, **kw: opened.append(spec) or real_open(spec, **kw))
    ckpt = t5x.read_t5x(root)
    want = flatten(train_state(0)["target"])["decoder/logits_dense/kernel"]
    assert np.array_equal(to_numpy(ckpt.tensors["target/decoder/logits_dense/kernel"].load()), want)
    assert [s["kvstore"]["driver"] for s in opened] == ["file"]  # never the network


def test_old_tensorstore_spec_with_top_level_path(tmp_path):
    root = copy_fixture("legacy-a", tmp_path)
    step_dir = root / "checkpoint_1000"
    tree = load_msgpack(step_dir)
    node = tree["optimizer"]["target"]["decoder"]["logits_dense"]["kernel"]
    node["path"] = node["kvstore"].pop("path").rstrip("/")
    save_msgpack(step_dir, tree)
    assert t5x.read_t5x(root).tensors["target/decoder/logits_dense/kernel"].load().shape == (16, 64)


@pytest.mark.parametrize("version", [1, 4, "3", None])
def test_unsupported_version(version, tmp_path):
    step_dir = copy_fixture("legacy-a-steps/checkpoint_1000", tmp_path)
    tree = load_msgpack(step_dir)
    if version is None:
        del tree["version"]
    else:
        tree["version"] = version
    save_msgpack(step_dir, tree)
    one_line_error(t5x.read_t5x, step_dir, match="unsupported T5X checkpoint format version")


@pytest.mark.parametrize("content", [b"", b"\x93\x01\x02", bytes(range(256)) * 4, "truncated"])
def test_garbage_msgpack(content, tmp_path):
    step_dir = copy_fixture("legacy-a-steps/checkpoint_1000", tmp_path)
    target = step_dir / "checkpoint"
    if content == "truncated":
        content = target.read_bytes()[:-100]
    target.write_bytes(content)
    one_line_error(t5x.read_t5x, step_dir, match="not a valid T5X checkpoint file")


def test_bad_ext_payload(tmp_path):
    step_dir = copy_fixture("legacy-a-steps/checkpoint_500", tmp_path)
    target = step_dir / "checkpoint"
    data = bytearray(target.read_bytes())
    i = data.index(b"float32")
    data[i: i + 7] = b"flxat32"
    target.write_bytes(bytes(data))
    one_line_error(t5x.read_t5x, step_dir, step=500, match="not a valid T5X checkpoint file")


@pytest.mark.parametrize("names,meta,match", [
    (["encoder/x"], {"step": 1}, "not a T5X tree path"),
    (["target/a//b"], {"step": 1}, "not a T5X tree path"),
    (["target/../x"], {"step": 1}, "not a T5X tree path"),
    (["state/step"], {"step": 1}, "written from the step"),
    (["target/a", "target/a"], {"step": 1}, "given twice"),
    (["target/a", "target/a/b"], {"step": 1}, "both a tensor and a subtree"),
    (["target/a.b", "target/a/b"], {"step": 1}, "share the array directory"),
    (["target/a"], {}, "step None"),
    (["target/a"], {"step": -1}, "step -1"),
    (["target/a"], {"step": 1, "layout": "flat"}, "unknown layout"),
    (["target/a"], {"step": 1, "compression": {"id": "lz4"}}, "unsupported compression"),
    (["target/a"], {"step": 1, "compression": {"id": "gzip", "level": 99}}, "invalid compression"),
])
def test_writer_refuses_bad_input_and_writes_nothing(names, meta, match, tmp_path):
    one_line_error(t5x.T5XWriter, tmp_path, [OutputTensor(n, (2,), torch.float32) for n in names], meta, match=match)
    assert list(tmp_path.iterdir()) == []


def test_edge_shapes_round_trip(tmp_path):
    tensors = {
        "target/empty": torch.zeros(0, 4),
        "target/scalar": torch.tensor(3.5),
        "target/ints": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "target/mask": torch.tensor([True, False]),
        "state/param_states/scalar/v": torch.tensor(2.0),
        "state/param_states/empty/v": torch.zeros(0, 4),
    }
    back, got = write_and_read(tmp_path, tensors, step=3)
    for k, v in tensors.items():
        assert got[k].shape == tuple(v.shape) and torch.equal(got[k].load(), v), k
    assert back.metadata["step"] == 3


def test_large_inline_arrays_are_chunked_as_flax_does(tmp_path, monkeypatch):
    """Inline arrays over flax's MAX_CHUNK_SIZE become {'__msgpack_chunked_array__': True, ...}."""
    monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", 64)
    monkeypatch.setattr(t5x, "MSGPACK_MAX_CHUNK", 64)
    v_row = np.arange(40, dtype=np.float32).reshape(5, 8)
    kernel = np.ones((5, 8), np.float32)
    w = t5x.T5XWriter(tmp_path, [OutputTensor("target/k", (5, 8), torch.float32),
                                 OutputTensor("state/param_states/k/v_row", (5, 8), torch.float32)],
                      {"step": 1, "layout": "step"})
    w.write("target/k", torch.from_numpy(kernel))
    w.write("state/param_states/k/v_row", torch.from_numpy(v_row))
    w.finish()
    data = (tmp_path / "checkpoint").read_bytes()
    assert b"__msgpack_chunked_array__" in data
    restored = t5x_restore(tmp_path)
    assert np.array_equal(restored["state/param_states/k/v_row"], v_row)
    # and the same bytes as flax writes the same tree
    spec = serialization.msgpack_restore(data)["optimizer"]["target"]["k"]
    tree = {"version": 3, "optimizer": {"state": {"param_states": {"k": {"v_row": v_row}},
                                                  "step": np.asarray(1, np.int32)}, "target": {"k": spec}}}
    assert serialization.msgpack_serialize(tree, in_place=True) == data  # as to_bytes does
    back = t5x.read_t5x(tmp_path)
    assert np.array_equal(to_numpy(back.metadata["optimizer_state"]["state/param_states/k/v_row"].load()), v_row)


def test_unsupported_state_leaf_is_kept_not_refused(tmp_path):
    step_dir = copy_fixture("legacy-a-steps/checkpoint_1000", tmp_path)
    tree = load_msgpack(step_dir)
    tree["optimizer"]["state"]["param_states"]["count"] = np.asarray(5, np.uint32)
    tree["optimizer"]["state"]["param_states"]["none"] = None
    save_msgpack(step_dir, tree)
    ckpt = t5x.read_t5x(step_dir)
    other = ckpt.metadata["other_leaves"]
    assert other["state/param_states/count"] == 5 and other["state/param_states/count"].dtype == np.uint32
    assert other["state/param_states/none"] is None
    assert "state/param_states/count" not in ckpt.metadata["optimizer_state"]


def test_symlinked_chunk_out_of_the_checkpoint_is_refused(tmp_path):
    root = copy_fixture("legacy-a", tmp_path)
    chunk = root / "checkpoint_1000" / "target.encoder.encoder_norm.scale" / "0"
    shutil.move(chunk, tmp_path / "chunk")
    chunk.symlink_to(tmp_path / "chunk")
    one_line_error(t5x.read_t5x, root, match="resolves outside the checkpoint directory")


def _pieces(t: torch.Tensor, sizes: list[int]):
    """Irregular pieces of the row-major bytes, alternating bytes objects and row blocks."""
    raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    pos, i = 0, 0
    while pos < len(raw):
        n = sizes[i % len(sizes)]
        yield raw[pos:pos + n]
        pos, i = pos + n, i + 1


@pytest.mark.parametrize("shape,dtype", [((64, 8), torch.float32), ((8, 64), torch.float32),
                                         ((8, 64), torch.bfloat16), ((100,), torch.float32)])
def test_write_chunks_streams_same_bytes_as_write(shape, dtype, tmp_path, monkeypatch):
    # small chunks so arrays span several chunk files: (64, 8) by slabs of chunk rows, (8, 64) staged
    monkeypatch.setattr(t5x, "DESIRED_CHUNK_BYTES", 256)
    monkeypatch.setattr(t5x, "MAX_SLAB_BYTES", 512)
    g = torch.Generator().manual_seed(1)
    tensors = {"target/a/kernel": torch.randn(*shape, generator=g).to(dtype),
               "target/b/scale": torch.randn(4, generator=g).to(dtype),
               "state/param_states/a/kernel/v_row": torch.rand(3, generator=g).to(dtype)}
    outs = [OutputTensor(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    whole = t5x.T5XWriter(tmp_path / "whole", outs, {"step": 2, "layout": "step"})
    streamed = t5x.T5XWriter(tmp_path / "streamed", outs, {"step": 2, "layout": "step"})
    for k, v in tensors.items():
        whole.write(k, v)
        streamed.write_chunks(k, _pieces(v, [7, 100, 1, 33]))
    whole.finish()
    streamed.finish()
    assert len(list((tmp_path / "whole" / "target.a.kernel").iterdir())) > 2  # several chunks
    assert tree_digests(tmp_path / "streamed") == tree_digests(tmp_path / "whole") == streamed.digests
    back = t5x.read_t5x(tmp_path / "streamed")
    assert torch.equal(back.tensors["target/a/kernel"].load().view(-1).view(torch.uint8),
                       tensors["target/a/kernel"].view(-1).view(torch.uint8))


def test_write_chunks_checks_the_byte_count(tmp_path):
    w = t5x.T5XWriter(tmp_path, [OutputTensor("target/k", (4, 4), torch.float32)], {"step": 1})
    with pytest.raises(RuntimeError, match="were given"):
        w.write_chunks("target/k", [b"\0" * 60])
    w.abort()
    w = t5x.T5XWriter(tmp_path / "x", [OutputTensor("target/k", (4, 4), torch.float32)], {"step": 1})
    with pytest.raises(RuntimeError, match="more than"):
        w.write_chunks("target/k", [b"\0" * 60, b"\0" * 8])
    w.abort()
    assert not list(tmp_path.rglob(".*.staging"))
