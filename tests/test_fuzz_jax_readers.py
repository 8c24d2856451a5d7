"""Property-based fuzzing of the JAX-format readers: the legacy T5X msgpack reader (and the tensorstore
specs it follows) and the Orbax ``_METADATA`` reader.

For every generated checkpoint, ``open_checkpoint`` and then loading every tensor must either succeed
or raise InputError with a one-line message. Any other exception, a hang, a read outside the
checkpoint directory or a tensorstore spec that could reach the network is a bug. Bounded
(``max_examples``) so CI stays fast; DEEPFUSE_FUZZ_EXAMPLES=5000 for a longer local run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
import tensorstore as ts
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from deepfuse_cli.errors import InputError
from deepfuse_cli.formats import open_checkpoint
from deepfuse_cli.sources import open_source
from deepfuse_cli.formats.orbax import read_orbax
from deepfuse_cli.formats.t5x import read_t5x

from .conftest import FIXTURES

FUZZ = settings(max_examples=int(os.environ.get("DEEPFUSE_FUZZ_EXAMPLES", "150")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
T5X_STEP = FIXTURES / "t5x" / "legacy-a" / "checkpoint_1000"
ORBAX_ITEM = FIXTURES / "orbax" / "std-a"
SENTINEL = 31337.0  # every value of the array planted outside the checkpoint
REAL_MSGPACK = (T5X_STEP / "checkpoint").read_bytes()
REAL_TREE = msgpack.unpackb(REAL_MSGPACK, raw=False, strict_map_key=False)  # ext types kept as ExtType
REAL_METADATA = json.loads((ORBAX_ITEM / "_METADATA").read_text())
ARRAY_DIRS = sorted(p.name for p in T5X_STEP.iterdir() if p.is_dir())
ABS_SENTINEL = "@ABS@"  # replaced by the absolute path of the planted array when written


# ---- the sandbox: a checkpoint copy, an array planted outside it, links out of it ---------------------
class Sandbox:
    def __init__(self, root: Path):
        self.root = root
        self.outside = root / "outside"
        self.step = root / "ckpt" / "checkpoint_1000"
        self.orbax = root / "orbax" / "std-a"
        shutil.copytree(T5X_STEP, self.step)
        shutil.copytree(ORBAX_ITEM, self.orbax)
        sentinel = self.outside / "sentinel"
        spec = json.loads((T5X_STEP / "target.encoder.encoder_norm.scale" / ".zarray").read_text())
        store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(sentinel) + "/"},
                         "metadata": {"shape": spec["shape"], "chunks": spec["chunks"], "dtype": "<f4",
                                      "compressor": spec["compressor"]}},
                        create=True).result()
        store.write(np.full(spec["shape"], SENTINEL, dtype=np.float32)).result()
        self.sentinel = sentinel
        # links out of the checkpoint: a whole array, the parent, one chunk, the metadata, a chunk subdirectory
        (self.step / "link_out").symlink_to(sentinel, target_is_directory=True)
        (self.step / "link_parent").symlink_to(self.outside, target_is_directory=True)
        for name, link in (("chunklink", "0"), ("zarraylink", ".zarray")):
            d = self.step / name
            shutil.copytree(T5X_STEP / "target.encoder.encoder_norm.scale", d)
            (d / link).unlink()
            (d / link).symlink_to(sentinel / link)
        sub = self.outside / "subdir"
        sub.mkdir()
        shutil.copy(sentinel / "0", sub / "0")
        d = self.step / "slashsep"
        d.mkdir()
        (d / ".zarray").write_text(json.dumps(dict(spec, dimension_separator="/", shape=[16, 1], chunks=[16, 1])))
        (d / "0").symlink_to(sub, target_is_directory=True)  # key "0/0" goes through a linked directory
        for name, shape, chunks in (("hugezarray", [10**12], [1]), ("hugezarray2", [2**40, 2**40], [3, 5])):
            d = self.step / name  # a lying .zarray: a trillion chunks, none of them there
            d.mkdir()
            (d / ".zarray").write_text(json.dumps(dict(spec, shape=shape, chunks=chunks)))
            (d / "0").write_bytes(b"")
        self.violations: list[str] = []
        self.active = False

    def path_ok(self, p: str, inside: Path) -> bool:
        try:
            return Path(p).resolve().is_relative_to(inside.resolve())
        except (OSError, ValueError):
            return False


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    sb = Sandbox(tmp_path_factory.mktemp("jaxfuzz"))
    real_open, real_kv_open = ts.open, ts.KvStore.open

    def check_spec(spec) -> None:
        if not sb.active:
            return
        spec = spec.to_json() if isinstance(spec, ts.Spec) else spec
        kv = spec.get("kvstore") if isinstance(spec, dict) else None
        if isinstance(spec, dict) and spec.get("driver") == "ocdbt":
            kv = spec
        while isinstance(kv, dict) and kv.get("driver") == "ocdbt":
            kv = kv.get("base")
        if not isinstance(kv, dict) or kv.get("driver") != "file":
            sb.violations.append(f"tensorstore spec not on the local disk: {spec!r}")
        elif not (sb.path_ok(kv.get("path", ""), sb.step.parent) or sb.path_ok(kv.get("path", ""), sb.orbax)):
            sb.violations.append(f"tensorstore opened outside the checkpoint: {kv.get('path')!r}")

    def ts_open(spec, *args, **kwargs):
        check_spec(spec)
        return real_open(spec, *args, **kwargs)

    def kv_open(spec, *args, **kwargs):
        check_spec(spec)
        return real_kv_open(spec, *args, **kwargs)

    def audit(event_name, args):  # python-level opens (tensorstore's own are checked above)
        if sb.active and event_name == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            p = os.fsdecode(args[0]) if not isinstance(args[0], int) else ""
            if str(sb.outside) in p or (p and sb.path_ok(p, sb.outside)):
                sb.violations.append(f"opened outside the checkpoint: {p}")

    sys.addaudithook(audit)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ts, "open", ts_open)
        mp.setattr(ts.KvStore, "open", staticmethod(kv_open))
        yield sb
    sb.active = False


def note(text: str) -> None:
    """hypothesis.event, also usable from the plain (parametrized) tests."""
    try:
        event(text)
    except InvalidArgument:
        pass


def clean_refusal(exc: InputError) -> None:
    assert exc.message and "\n" not in exc.message and "\r" not in exc.message, repr(exc.message)
    assert exc.exit_code == 2


def load_all(ck) -> int:
    refs = [*ck.tensors.values(), *ck.metadata.get("optimizer_state", {}).values(),
            *(v for v in ck.metadata.get("other_leaves", {}).values() if hasattr(v, "load"))]
    for ref in refs:
        t = ref.load()
        assert isinstance(t, torch.Tensor) and tuple(t.shape) == tuple(ref.shape) and t.dtype == ref.dtype, ref.name
        if t.is_floating_point() and t.numel():
            assert not bool((t.float() == SENTINEL).any()), f"{ref.name}: data read from outside the checkpoint"
    return len(refs)


def exercise(box: Sandbox, path: Path, reader) -> None:
    """open_source + load everything; on a refusal, the bare format reader too (config inference can
    refuse before any array is looked at). Only results and clean refusals are allowed."""
    box.violations.clear()
    box.active = True
    try:
        for opener in (open_source, reader):
            try:
                ck = opener(path)
                n = load_all(ck)
            except InputError as exc:
                clean_refusal(exc)
                note(f"{opener.__name__}: refused")
                continue
            note(f"{opener.__name__}: accepted ({'some' if n else 'no'} tensors)")
            break
    finally:
        box.active = False
    assert not box.violations, box.violations


def write_msgpack(box: Sandbox, data: bytes) -> None:
    (box.step / "checkpoint").write_bytes(data.replace(ABS_SENTINEL.encode(), str(box.sentinel).encode()))


# ---- (a) arbitrary bytes, (b) the real file mutated ------------------------------------------------
@FUZZ
@given(raw=st.binary(max_size=300) | st.binary(max_size=40).map(lambda b: b"\x82\xa7version\x03" + b))
def test_t5x_arbitrary_msgpack_bytes(raw, box):
    write_msgpack(box, raw)
    exercise(box, box.step, read_t5x)


@FUZZ
@given(edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=4),
       cut=st.none() | st.floats(0, 1), tail=st.binary(max_size=8))
def test_t5x_mutated_msgpack(edits, cut, tail, box):
    data = bytearray(REAL_MSGPACK)
    for pos, value in edits:
        data[int(pos * len(data))] = value
    if cut is not None:
        data = data[: int(cut * len(data))]
    write_msgpack(box, bytes(data) + tail)
    exercise(box, box.step, read_t5x)


# ---- (c) structured msgpack trees ------------------------------------------------------------------
DTYPE_NAMES = ["float32", "bfloat16", "float16", "float64", "int8", "int32", "uint8", "bool", "uint16", "uint32",
               "int64", "complex64", "U3", "S0", "S2", "V0", "V3", "O", "object", "float7", "", "<f4", ">f8",
               "M8", "m8[ns]", "i", "float32,int8"]
dims = st.integers(0, 4) | st.sampled_from([-1, -3, 2**31, 2**40, 2**62, 2**63 - 1, 2**64 - 1])
shapes = st.lists(dims, max_size=3)
scalars = st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=6) | \
    st.binary(max_size=6)


@st.composite
def ext_arrays(draw, code: int):
    shape = draw(shapes) if code == 1 else draw(st.just([]) | shapes)
    name = draw(st.sampled_from(DTYPE_NAMES) | st.text(max_size=4))
    try:
        n = math.prod(shape) * np.dtype(name if name != "bfloat16" else "float16").itemsize
    except Exception:  # noqa: BLE001
        n = draw(st.integers(0, 16))
    if not 0 <= n <= 256 or draw(st.integers(0, 4)) == 0:  # lying size
        n = draw(st.integers(0, 64))
    payload = draw(st.binary(min_size=n, max_size=n))
    obj = [shape, name.encode() if draw(st.booleans()) else name, payload]
    if draw(st.integers(0, 9)) == 0:
        obj = draw(st.lists(scalars | shapes, max_size=4) | scalars)
    return msgpack.ExtType(code, msgpack.packb(obj, use_bin_type=True))


ext_other = st.builds(msgpack.ExtType, st.sampled_from([0, 2, 4, 5, 127]), st.binary(max_size=12))
SPEC_PATHS = [d + "/" for d in ARRAY_DIRS[::7]] + [
    "missing.array/", "hugezarray/", "hugezarray2", "link_out/", "link_out", "link_parent/sentinel/", "chunklink/", "zarraylink/", "slashsep/",
    "../outside/sentinel/", "sub/../../outside/sentinel/", "../../ckpt/checkpoint_1000/" + ARRAY_DIRS[0],
    ABS_SENTINEL + "/", ABS_SENTINEL, "", ".", "./", "/", "..", "a\x00b/", "x" * 300 + "/", "gs://bucket/x/",
    "file:///etc/", "C:/x/", "\\\\server\\share\\x", "..\\outside\\sentinel", "./" + ARRAY_DIRS[1]]
spec_paths = st.sampled_from(SPEC_PATHS) | st.text(max_size=8) | scalars
kvstores = st.fixed_dictionaries(
    {"driver": st.sampled_from(["file", "gcs", "gfile", "memory", "http", "s3", "zip", "ocdbt"]) | scalars},
    optional={"path": spec_paths, "bucket": st.sampled_from(["t5x-dummy-bucket", "evil"]),
              "base_url": st.just("http://127.0.0.1:9/")}) | scalars
spec_shapes = st.sampled_from([[16], [16, 64], [64, 16], [4, 32]]) | shapes | scalars | \
    st.lists(st.text(max_size=2), max_size=2)


@st.composite
def specs(draw):
    spec = {"driver": draw(st.sampled_from(["zarr", "zarr", "zarr", "zarr3", "n5", "array"]) | scalars),
            "kvstore": draw(kvstores),
            "metadata": draw(st.fixed_dictionaries({}, optional={"shape": spec_shapes, "chunks": spec_shapes,
                                                                 "compressor": scalars}) | scalars)}
    if draw(st.booleans()):
        spec["dtype"] = draw(st.sampled_from(["float32", "bfloat16", "uint16", "int8", "float64"]) | scalars)
    if draw(st.integers(0, 4)) == 0:
        spec["path"] = draw(spec_paths)
    if draw(st.integers(0, 4)) == 0:
        del spec["kvstore"]
    return spec


@st.composite
def chunked(draw):
    parts = draw(st.lists(ext_arrays(1), max_size=3))
    return {"__msgpack_chunked_array__": draw(st.just(True) | scalars),
            "shape": draw(st.dictionaries(st.sampled_from(["0", "1", "2"]), dims | scalars, max_size=3) | scalars),
            "chunks": {str(i): p for i, p in enumerate(parts)}}


leaves = scalars | ext_arrays(1) | ext_arrays(3) | ext_other | specs() | chunked()
keys = st.text(max_size=6) | st.sampled_from(["target", "state", "step", "param_states", "v", "kernel", "a/b",
                                              "", ".", "..", "__msgpack_chunked_array__"]) | st.integers(-2, 2**40)
trees = st.recursive(leaves, lambda kids: st.dictionaries(keys, kids, max_size=4) | st.lists(kids, max_size=3),
                     max_leaves=10)
versions = st.sampled_from([3, 3, 3, 2, 1, 4, "3", None, True, 3.0, -1, 2**64 - 1]) | ext_arrays(3) | ext_arrays(1)


def _walk_real(node, prefix):
    if isinstance(node, dict) and "driver" not in node:
        for k, v in node.items():
            yield from _walk_real(v, prefix + (k,))
    else:
        yield prefix, node


REAL_TARGET_LEAVES = list(_walk_real(REAL_TREE["optimizer"]["target"], ()))


def real_target_subset(draw) -> dict:
    """The real target tree (specs of real arrays), a random subset of its leaves kept."""
    flat = REAL_TARGET_LEAVES
    keep = draw(st.lists(st.sampled_from(range(len(flat))), max_size=8, unique=True))
    if draw(st.booleans()):
        keep = range(len(flat))
    tree: dict = {}
    for i in keep:
        path, leaf = flat[i]
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return tree


def set_path(tree: dict, path: list, value) -> None:
    node = tree
    for k in path[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[path[-1]] = value


@st.composite
def checkpoint_trees(draw) -> bytes:
    target = real_target_subset(draw) if draw(st.booleans()) else {}
    for _ in range(draw(st.integers(0 if target else 1, 4))):  # graft generated leaves and subtrees
        path = draw(st.lists(keys, min_size=1, max_size=4) | st.sampled_from([list(p) for p, _ in REAL_TARGET_LEAVES]))
        set_path(target, path, draw(trees))
    optimizer = {"target": target if draw(st.integers(0, 9)) else draw(trees)}
    if draw(st.booleans()):
        optimizer["state"] = draw(st.fixed_dictionaries({}, optional={"step": versions, "param_states": trees})
                                  | trees)
    if draw(st.integers(0, 9)) == 0:
        optimizer[draw(keys)] = draw(trees)
    top = {"version": draw(versions), "optimizer": optimizer}
    if draw(st.integers(0, 9)) == 0:
        del top["version"]
    if draw(st.integers(0, 9)) == 0:
        top[draw(keys)] = draw(trees)
    return msgpack.packb(top, use_bin_type=True)


@FUZZ
@given(data=checkpoint_trees())
def test_t5x_structured_trees(data, box):
    write_msgpack(box, data)
    exercise(box, box.step, read_t5x)


@pytest.mark.parametrize("depth", [100, 900, 1500, 5000, 100_000])
def test_t5x_deeply_nested_tree(depth, box):
    head = b"\x82\xa7version\x03\xa9optimizer\x81\xa6target"
    write_msgpack(box, head + b"\x81\xa1a" * depth + b"\x01")
    exercise(box, box.step, read_t5x)


OUT_PATHS = ["link_out/", "link_parent/sentinel/", "../outside/sentinel/", ABS_SENTINEL + "/", ARRAY_DIRS[0] + "/"]


@pytest.mark.parametrize("driver, path", [("file", p) for p in SPEC_PATHS] +
                         [(d, p) for d in ("gcs", "gfile", "memory", "http") for p in OUT_PATHS])
def test_t5x_spec_paths_never_leave_the_checkpoint(path, driver, box):
    """Every spec path and kvstore driver on a real array's spec: refused or read from inside only."""
    tree = msgpack.unpackb(REAL_MSGPACK, raw=False, strict_map_key=False)
    del tree["optimizer"]["state"]
    node = tree["optimizer"]["target"]["encoder"]["encoder_norm"]["scale"]
    node["kvstore"] = {"driver": driver, "path": path, **({"bucket": "t5x-dummy-bucket"} if driver == "gcs" else {})}
    write_msgpack(box, msgpack.packb(tree, use_bin_type=True))
    exercise(box, box.step, read_t5x)


def real_tree_with(path: str, leaf) -> bytes:
    tree = msgpack.unpackb(REAL_MSGPACK, raw=False, strict_map_key=False)
    del tree["optimizer"]["state"]
    set_path(tree["optimizer"]["target"], path.split("/"), leaf)
    return msgpack.packb(tree, use_bin_type=True)


def ext(code: int, shape, dtype: str, payload: bytes) -> msgpack.ExtType:
    return msgpack.ExtType(code, msgpack.packb([shape, dtype, payload], use_bin_type=True))


@pytest.mark.parametrize("path, leaf", [
    ("encoder/encoder_norm/scale", ext(1, [0, 2**63 - 1], "float32", b"")),  # numpy/torch cannot hold the shape
    ("encoder/encoder_norm/scale", ext(1, [4], "S0", b"")),  # zero itemsize
    ("encoder/encoder_norm/scale", ext(1, [2], "U2", b"\0" * 16)),
    ("encoder/encoder_norm/scale", ext(3, [], "complex64", b"\0" * 8)),
    ("encoder/relpos_bias/rel_embedding", ext(1, [0, 32], "float32", b"")),  # zero heads
    ("token_embedder/embedding", ext(1, [0, 16], "float32", b"")),
    ("encoder/encoder_norm/scale", {"driver": "zarr", "kvstore": {"driver": "file", "path": "slashsep/"},
                                    "metadata": {"shape": [16, 1]}}),  # chunk '0/0' through a linked directory
    ("encoder/encoder_norm/scale", {"driver": "zarr", "kvstore": {"driver": "file", "path": ARRAY_DIRS[3] + "/"},
                                    "metadata": {"shape": 16}}),
    ("encoder/encoder_norm/scale", {"driver": "zarr", "kvstore": {"driver": "file", "path": ARRAY_DIRS[3] + "/"},
                                    "metadata": {"shape": ["x"]}}),
])
def test_t5x_known_hard_leaves(path, leaf, box):
    write_msgpack(box, real_tree_with(path, leaf))
    exercise(box, box.step, read_t5x)


@pytest.mark.parametrize("version", [ext(3, [], "complex64", b"\0" * 8), ext(3, [], "U3", b"\0" * 12),
                                     ext(3, [], "S0", b""), ext(1, [1], "int32", b"\3\0\0\0"), 3.0, True, "3"])
def test_t5x_odd_versions(version, box):
    tree = msgpack.unpackb(REAL_MSGPACK, raw=False, strict_map_key=False)
    tree["version"] = version
    write_msgpack(box, msgpack.packb(tree, use_bin_type=True))
    exercise(box, box.step, read_t5x)


# ---- (d) Orbax _METADATA -------------------------------------------------------------------------
json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6)
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=3) |
                           st.dictionaries(st.text(max_size=6), kids, max_size=3), max_leaves=8)
ENTRIES = sorted(REAL_METADATA["tree_metadata"])
key_values = st.sampled_from(["target", "step", "0", "²", "٣", "..", "/", "a.b", ""]) | json_scalars
key_types = st.sampled_from([1, 2, 0, 3, "2", 2.5, float("inf"), float("nan"), 10**30, True]) | json_scalars
value_types = st.sampled_from(["jax.Array", "np.ndarray", "scalar", "string", "None", "Dict", "List", "Tuple",
                               "weird"]) | json_scalars


@st.composite
def orbax_metadata(draw) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:
        raw = bytearray(json.dumps(REAL_METADATA).encode())
        for pos, value in draw(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                                        max_size=3)):
            raw[int(pos * len(raw))] = value
        return bytes(raw[: int(draw(st.floats(0, 1)) * len(raw))] if draw(st.booleans()) else raw)
    meta = json.loads(json.dumps(REAL_METADATA))
    chosen = draw(st.lists(st.sampled_from(ENTRIES), max_size=6, unique=True))
    meta["tree_metadata"] = {k: meta["tree_metadata"][k] for k in chosen}
    for _ in range(draw(st.integers(0, 4))):
        label = draw(st.sampled_from(chosen) if chosen and draw(st.booleans()) else st.text(max_size=6))
        entry = meta["tree_metadata"].setdefault(label, json.loads(json.dumps(REAL_METADATA["tree_metadata"][
            draw(st.sampled_from(ENTRIES))])))
        what = draw(st.sampled_from(["key", "key_type", "value_type", "keys", "value", "entry", "write_shape"]))
        if not isinstance(entry, dict):
            entry = meta["tree_metadata"][label] = {}
        keys_ = entry.get("key_metadata")
        value = entry.get("value_metadata")
        if what in ("key", "key_type") and isinstance(keys_, list) and keys_ and isinstance(keys_[0], dict):
            keys_[draw(st.integers(0, len(keys_) - 1))][what] = draw(key_values if what == "key" else key_types)
        elif what in ("value_type", "write_shape") and isinstance(value, dict):
            value[what] = draw(value_types if what == "value_type" else json_values)
        elif what == "keys":
            entry["key_metadata"] = draw(json_values | st.lists(st.fixed_dictionaries(
                {"key": key_values, "key_type": key_types}), max_size=4))
        elif what == "value":
            entry["value_metadata"] = draw(json_values)
        else:
            meta["tree_metadata"][label] = draw(json_values)
    for field in ("use_ocdbt", "use_zarr3", "custom_metadata"):
        if draw(st.integers(0, 5)) == 0:
            meta[field] = draw(json_values)
    if draw(st.integers(0, 19)) == 0:
        meta = draw(json_values)
    return json.dumps(meta, allow_nan=True).encode("utf-8", "surrogatepass")


def orbax_edit(label_part: str, edit) -> bytes:
    meta = json.loads(json.dumps(REAL_METADATA))
    label = next(k for k in ENTRIES if label_part in k)
    edit(meta["tree_metadata"][label])
    return json.dumps(meta, allow_nan=True).encode()


def _set(entry, where, value):
    *path, last = where
    for k in path:
        entry = entry[k]
    entry[last] = value


@pytest.mark.parametrize("label, where, value", [
    ("'encoder_norm', 'scale')", ("key_metadata", 0, "key_type"), float("inf")),
    ("'encoder_norm', 'scale')", ("key_metadata", 0, "key_type"), float("nan")),
    ("'encoder_norm', 'scale')", ("key_metadata", 1, "key"), "²"),
    ("'encoder_norm', 'scale')", ("value_metadata", "value_type"), "scalar"),
    ("'token_embedder', 'embedding')", ("value_metadata", "value_type"), "scalar"),
    ("'token_embedder', 'embedding')", ("value_metadata", "value_type"), "string"),
    ("'step')", ("value_metadata", "value_type"), "scalar"),
    ("'step')", ("key_metadata", 1, "key"), "../../step"),
])
def test_orbax_known_hard_entries(label, where, value, box):
    def edit(entry):
        if where[-1] == "key" and value == "²":
            _set(entry, ("key_metadata", 1, "key_type"), 1)
        _set(entry, where, value)

    (box.orbax / "_METADATA").write_bytes(orbax_edit(label, edit))
    exercise(box, box.orbax, read_orbax)


@FUZZ
@given(data=orbax_metadata())
def test_orbax_mutated_metadata(data, box):
    (box.orbax / "_METADATA").write_bytes(data)
    exercise(box, box.orbax, read_orbax)


# ---- controls: the sandbox itself catches what it should ---------------------------------------------
def test_sandbox_control(box):
    """The unmodified copies are accepted, and the planted array really is readable (so a reader that
    followed a path out of the checkpoint would be caught by its values)."""
    write_msgpack(box, REAL_MSGPACK)
    assert load_all(open_checkpoint(box.step)) == 52 + 208
    (box.orbax / "_METADATA").write_bytes((ORBAX_ITEM / "_METADATA").read_bytes())
    assert load_all(open_checkpoint(box.orbax)) == 52 + 208
    got = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(box.sentinel) + "/"}}).result()
    assert (got.read().result() == SENTINEL).all()
    box.violations.clear()
    box.active = True  # the watchers see a read outside and a spec that is not on the local disk
    try:
        (box.sentinel / ".zarray").read_bytes()
        ts.open({"driver": "zarr", "kvstore": {"driver": "memory"}}, create=True, dtype=ts.float32, shape=[1]).result()
    finally:
        box.active = False
    assert len(box.violations) == 2 and "opened outside" in box.violations[0] and "memory" in box.violations[1]
    box.violations.clear()
