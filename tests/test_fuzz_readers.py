"""Property-based fuzzing of the untrusted-input readers: the safetensors header parser and the
sharded-index reader. Any outcome other than a result or a clean refusal (InputError with a
one-line message) is a bug. Bounded (max_examples) so CI stays fast."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from deepfuse_cli.errors import InputError
from deepfuse_cli.formats.hf import SAFE_INDEX, read_hf
from deepfuse_cli.formats.safetensors_io import (
    ST_TO_TORCH,
    read_safetensors_header,
    validate_header,
)

from .corpus.make_corpus import BASE_CONFIG, llama_tensors, safetensors_bytes

# DEEPFUSE_FUZZ_EXAMPLES=5000 for a longer local run
FUZZ = settings(max_examples=int(os.environ.get("DEEPFUSE_FUZZ_EXAMPLES", "150")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
GOOD_TENSORS = llama_tensors(BASE_CONFIG)
GOOD_FILE = safetensors_bytes(GOOD_TENSORS)


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="deepfuse-fuzz-") as d:
        yield Path(d)


def clean_refusal(exc: InputError) -> None:
    assert exc.message and "\n" not in exc.message and "\r" not in exc.message, repr(exc.message)
    assert exc.exit_code == 2


def open_file(path: Path, data: bytes) -> dict | None:
    """read_safetensors_header on ``data``: None for a clean refusal, else the refs (each loaded)."""
    path.write_bytes(data)
    try:
        refs, meta = read_safetensors_header(path)
    except InputError as exc:
        clean_refusal(exc)
        event("refused")
        return None
    event("accepted")
    assert isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    for ref in refs.values():  # whatever was accepted must load as described
        t = ref.load()
        assert tuple(t.shape) == ref.shape and t.dtype == ref.dtype
    return refs


# ---- the header parser on arbitrary bytes ---------------------------------------------------------
@FUZZ
@given(raw=st.binary(max_size=512), data_len=st.integers(min_value=0, max_value=2**20))
def test_validate_header_arbitrary_bytes(raw, data_len):
    try:
        header = validate_header(raw, data_len)
    except ValueError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(header, dict)


json_scalars = st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70) | \
    st.floats(allow_nan=True) | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=4) |
                           st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12)
dtypes = st.sampled_from([*ST_TO_TORCH, "F7", "U16", "C64", "f32", ""]) | json_values
dims = st.integers(min_value=0, max_value=6) | st.integers(min_value=-3, max_value=2**64) | json_scalars
entries = st.fixed_dictionaries(
    {"dtype": dtypes, "shape": st.lists(dims, max_size=3) | json_values,
     "data_offsets": st.lists(st.integers(min_value=-4, max_value=300), min_size=2, max_size=2) | json_values},
    optional={"extra": json_values},
)
names = st.text(st.characters(codec="utf-8"), min_size=0, max_size=12)


@st.composite
def safetensors_files(draw) -> bytes:
    """Plausible-but-lying safetensors files: random headers, random data length and length field."""
    header = draw(st.dictionaries(names, entries, max_size=4))
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=6), st.text(max_size=6) | json_values,
                                                      max_size=2))
    raw = json.dumps(header).encode("utf-8", "surrogatepass")
    raw += b" " * draw(st.integers(min_value=0, max_value=9))
    data = bytes(draw(st.integers(min_value=0, max_value=300)))
    length = draw(st.sampled_from([len(raw), len(raw) - 1, len(raw) + 1, 0, 2**63, 2**64 - 1])
                  | st.integers(min_value=0, max_value=len(raw) + len(data) + 8))
    return struct.pack("<Q", length) + raw + data


@FUZZ
@given(data=safetensors_files())
def test_safetensors_reader_lying_headers(data, workdir):
    open_file(workdir / "lying.safetensors", data)


@st.composite
def consistent_files(draw) -> tuple[bytes, dict]:
    """Valid files from random tensors: must be accepted and read back exactly."""
    tensors = {}
    for name in draw(st.lists(names.filter(lambda n: n != "__metadata__"), max_size=4, unique=True)):
        dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8]))
        shape = tuple(draw(st.lists(st.integers(min_value=0, max_value=4), max_size=3)))
        tensors[name] = (torch.arange(int(torch.tensor(shape).prod()) if shape else 1) % 7).to(dtype).reshape(shape)
    from safetensors.torch import save

    return save(tensors), tensors


@FUZZ
@given(case=consistent_files())
def test_safetensors_reader_accepts_valid_files(case, workdir):
    data, tensors = case
    refs = open_file(workdir / "valid.safetensors", data)
    assert refs is not None and set(refs) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(refs[name].load(), t)


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(min_value=0, max_value=len(GOOD_FILE) - 1), st.integers(0, 255)),
                      min_size=1, max_size=4),
       cut=st.none() | st.integers(min_value=0, max_value=len(GOOD_FILE)),
       tail=st.binary(max_size=16))
def test_safetensors_reader_mutated_file(edits, cut, tail, workdir):
    data = bytearray(GOOD_FILE)
    for pos, value in edits:
        data[pos] = value
    data = bytes(data[:cut]) + tail if cut is not None else bytes(data) + tail
    open_file(workdir / "mutated.safetensors", data)


# ---- the sharded index reader -------------------------------------------------------------------
SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
TENSOR_NAMES = sorted(GOOD_TENSORS)
shard_names = st.sampled_from(SHARDS + ["missing.safetensors", "../good.safetensors", "", ".", "..", "a\x00b",
                                        "sub/x.safetensors", SAFE_INDEX, "config.json", "\udcff"]) | json_scalars
index_names = st.sampled_from(TENSOR_NAMES) | names


@st.composite
def sharded_dirs(draw) -> tuple[dict, dict[str, list[str]]]:
    """A weight_map (mostly plausible, sometimes lying) and which tensors each shard file really holds."""
    holdings = {shard: draw(st.lists(st.sampled_from(TENSOR_NAMES), max_size=6, unique=True)) for shard in SHARDS}
    weight_map = draw(st.dictionaries(index_names, shard_names, max_size=8))
    if draw(st.booleans()):  # the truthful map, perhaps with one change
        weight_map = {n: s for s, ns in holdings.items() for n in ns}
        if weight_map and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(weight_map)))
            weight_map[key] = draw(shard_names)
    index = {"metadata": draw(json_values), "weight_map": weight_map}
    if draw(st.integers(0, 9)) == 0:
        index = draw(json_values)
    return index, holdings


@FUZZ
@given(case=sharded_dirs())
def test_index_reader(case, workdir):
    index, holdings = case
    d = workdir / "sharded"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir()
    (d / "config.json").write_text(json.dumps(BASE_CONFIG))
    for shard, held in holdings.items():
        if held:
            (d / shard).write_bytes(safetensors_bytes({n: GOOD_TENSORS[n] for n in held}))
    (d / SAFE_INDEX).write_text(json.dumps(index, ensure_ascii=True))
    try:
        ck = read_hf(d)
    except InputError as exc:
        clean_refusal(exc)
        event("refused")
        return
    event("accepted")
    # accepted: the index and the shards agree exactly
    weight_map = index["weight_map"]
    assert list(ck.tensors) == list(weight_map)
    for name, ref in ck.tensors.items():
        assert name in holdings[weight_map[name]]
        assert torch.equal(ref.load(), torch.from_numpy(GOOD_TENSORS[name]))
    for shard in set(weight_map.values()):  # every tensor of a shard the index uses is listed for it
        assert all(weight_map.get(n) == shard for n in holdings[shard])


@FUZZ
@given(raw=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_index_reader_arbitrary_index_bytes(raw, workdir):
    d = workdir / "raw-index"
    d.mkdir(exist_ok=True)
    (d / SAFE_INDEX).write_bytes(raw)
    try:
        read_hf(d)
    except InputError as exc:
        clean_refusal(exc)
    else:
        pytest.fail("an index naming no existing shard was accepted")


# ---- PyTorch pickles (weights_only) ---------------------------------------------------------------
def _torch_bytes(legacy: bool) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)}, buf,
               _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


TORCH_FILES = [_torch_bytes(False), _torch_bytes(True)]


@FUZZ
@given(which=st.sampled_from([0, 1]), edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                                                      min_size=1, max_size=4),
       cut=st.none() | st.floats(0, 1))
def test_torch_reader_mutated_file(which, edits, cut, workdir):
    from deepfuse_cli.formats.torch_io import read_torch_file

    data = bytearray(TORCH_FILES[which])
    for pos, value in edits:
        data[int(pos * len(data))] = value
    if cut is not None:
        data = data[: int(cut * len(data))]
    path = workdir / "mutated.bin"
    path.write_bytes(bytes(data))
    try:
        refs = read_torch_file(path)
    except InputError as exc:
        clean_refusal(exc)
        event("refused")
        return
    event("accepted")
    for ref in refs.values():
        assert tuple(ref.load().shape) == ref.shape
