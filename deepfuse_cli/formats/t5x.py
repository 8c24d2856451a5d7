"""Legacy T5X checkpoints (``t5x/checkpoints.py``, format version 3): lazy reader and streaming writer.

Layout of one step directory ``checkpoint_<step>/``:

* ``checkpoint``: a flax msgpack file ``{'version': 3, 'optimizer': {'state': {'param_states': ...,
  'step': ...}, 'target': ...}}``. Inline arrays are msgpack ext type 1 holding
  ``[shape, dtype_name, raw C-order bytes]`` (ext 3: a numpy scalar, same payload); inline arrays over
  1 GiB are split into ``{'__msgpack_chunked_array__': True, 'shape': {...}, 'chunks': {...}}``.
* one zarr (v2) directory per partitioned leaf, written with tensorstore and named by the leaf's
  '/'-joined tree path with '.' separators (``target.encoder.layers_0.attention.query.kernel``). In the
  msgpack, the leaf is replaced by the tensorstore spec (a dict with ``driver: zarr``, ``dtype``,
  ``kvstore`` and ``metadata``) whose kvstore path is relative to the step directory. Specs written on a
  training job may name a ``gcs`` kvstore (with a bucket, normally ``t5x-dummy-bucket``) or ``gfile``;
  like T5X reading from a local disk, every spec is resolved against the local step directory, and a
  path that would leave it (absolute, ``..``, symlink out) is refused, never followed.

What is inline is decided by T5X's partitioner, not by size: a leaf goes to tensorstore when it has
mesh axes. Every parameter (``target``) has them; of T5X Adafactor's state only ``v`` (when not the
(1,) placeholder) and ``m`` (with momentum) have them; ``step`` and ``v_row``/``v_col`` are inline.
The writer applies that rule: ``target/*`` to tensorstore; ``state/*`` inline when the leaf is
``v_row``/``v_col``, a (1,) placeholder or a scalar, otherwise to tensorstore.

Single-device saves use gzip (level 1) and chunks of at most 64 MiB chosen by T5X's greedy divisor
rule (one chunk for any array up to 64 MiB); multi-device saves use zstd with the per-device shard
as the chunk. The writer writes what a single-host T5X save writes, byte for byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import tensorstore as ts
import torch

from .. import untrusted
from ..errors import InputError
from ..ir import Checkpoint, TensorRef
from .arrays import (NUMPY_TO_TORCH, TORCH_TO_NUMPY, check_chunk_shape, check_fits_memory, numpy_dtype, to_numpy,
                     to_torch, torch_dtype)
from .base import CheckpointWriter, OutputTensor, as_bytes
from .files import fsync_path, sha256_file, write_file

MSGPACK_FILE = "checkpoint"
VERSION = 3
SUPPORTED_VERSIONS = (2, 3)
STEP_DIR = re.compile(r"checkpoint_(\d+)")
#: T5X: "Desired chunk size is 64MiB" (``_DESIRED_CHUNK_SIZE_BYTES``)
DESIRED_CHUNK_BYTES = 64 * 1024 * 1024
#: flax.serialization.MAX_CHUNK_SIZE: inline arrays above it are split into chunks
MSGPACK_MAX_CHUNK = 2**30
#: write_chunks gathers at most this much of an array before writing it (else it stages on disk)
MAX_SLAB_BYTES = 2 * DESIRED_CHUNK_BYTES
#: blocks (each at most one slab) handed to tensorstore and not yet written: gzip compresses one chunk on
#: one thread, so as many blocks as cores are compressed at once, across chunks and across arrays
#: (at most 8: each pending block and its encoded copy are held in memory)
MAX_IN_FLIGHT = min(8, max(2, os.cpu_count() or 1))
CHUNKED_KEY = "__msgpack_chunked_array__"
DEFAULT_COMPRESSION = {"id": "gzip", "level": 1}
COMPRESSORS = ("gzip", "zstd", "zlib", "bz2", "blosc")
KVSTORE_DRIVERS = ("file", "gfile", "gcs")
#: files only an Orbax checkpoint has (older Orbax items may also hold a msgpack 'checkpoint' file)
ORBAX_MARKERS = ("_METADATA", "manifest.ocdbt", "_CHECKPOINT_METADATA")
INLINE_STATE_LEAVES = ("v_row", "v_col")
_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR = 1, 2, 3

_COPY_HINT = "the copy is incomplete or damaged: copy the whole checkpoint_<step> directory again"


# ----------------------------------------------------------------------------------------------
# detection and step selection


def _step_of(name: str) -> int | None:
    m = STEP_DIR.fullmatch(name)
    return int(m.group(1)) if m else None


def _looks_like_msgpack_map(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            first = fh.read(1)
    except OSError:
        return False
    return bool(first) and (0x80 <= first[0] <= 0x8F or first[0] in (0xDE, 0xDF))


def _step_dirs(root: Path) -> dict[int, Path]:
    """``checkpoint_<N>`` children of ``root`` that hold a ``checkpoint`` file (temporary dirs excluded)."""
    found: dict[int, Path] = {}
    try:
        children = sorted(root.iterdir())
    except OSError:
        return found
    for child in children:
        step = _step_of(child.name)
        if step is None or not child.is_dir() or not (child / MSGPACK_FILE).is_file():
            continue
        if step in found:
            raise InputError(f"{root}: both {found[step].name} and {child.name} hold step {step}",
                             "remove or rename one of them")
        found[step] = child
    return found


def is_t5x_checkpoint(path: Path) -> bool:
    """A ``checkpoint_<N>/`` dir holding a ``checkpoint`` file, or a root holding such dirs."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / MSGPACK_FILE).is_file():
        if any((path / marker).exists() for marker in ORBAX_MARKERS):
            return False  # an Orbax item that kept a msgpack 'checkpoint' aggregate file
        # any directory whose 'checkpoint' file is a msgpack map (a TF checkpoint dir's is text)
        return _step_of(path.name) is not None or _looks_like_msgpack_map(path / MSGPACK_FILE)
    try:
        return bool(_step_dirs(path))
    except InputError:
        return True  # ambiguous steps: let read_t5x say so


def _resolve_step_dir(path: Path, step: int | None) -> tuple[Path, str]:
    if (path / MSGPACK_FILE).is_file():
        return path, "step"
    steps = _step_dirs(path)
    if not steps:
        raise InputError(f"{path}: not a T5X checkpoint (no 'checkpoint' file and no checkpoint_<step>/ directories)",
                         "pass a T5X model directory or one of its checkpoint_<step> directories")
    if step is None:
        return steps[max(steps)], "root"
    if step not in steps:
        listed = ", ".join(str(s) for s in sorted(steps))
        raise InputError(f"{path}: no checkpoint for step {step} (steps found: {listed})",
                         "pass one of the steps found with --step, or omit --step for the latest")
    return steps[step], "root"


# ----------------------------------------------------------------------------------------------
# msgpack decoding (flax.serialization's encoding, without flax)


@dataclass(frozen=True)
class _Inline:
    """An array stored in the msgpack file: decoded only when loaded."""

    shape: tuple[int, ...]
    dtype: np.dtype
    data: bytes
    scalar: bool = False

    def array(self) -> np.ndarray:
        return np.frombuffer(self.data, dtype=self.dtype).reshape(self.shape).copy()


class _BadMsgpack(Exception):
    pass


def _decode_ndarray(data: bytes, scalar: bool) -> _Inline:
    try:
        shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
        name = dtype_name.decode("ascii") if isinstance(dtype_name, bytes) else str(dtype_name)
        dtype = numpy_dtype(name)
        shape = tuple(int(s) for s in shape)
    except Exception as exc:  # noqa: BLE001 - any malformed payload
        raise _BadMsgpack(f"malformed array payload ({exc})") from None
    if dtype.hasobject or any(s < 0 for s in shape):
        raise _BadMsgpack(f"unsupported array payload (dtype {dtype}, shape {shape})")
    if len(buffer) != math.prod(shape) * dtype.itemsize:
        raise _BadMsgpack(f"array payload of shape {shape} {dtype} holds {len(buffer)} bytes")
    try:  # e.g. a zero itemsize, or dims numpy cannot represent (0 x 2**63)
        np.frombuffer(buffer, dtype=dtype).reshape(shape)
    except Exception as exc:  # noqa: BLE001
        raise _BadMsgpack(f"unsupported array payload (dtype {dtype}, shape {shape}: {exc})") from None
    return _Inline(shape, dtype, bytes(buffer), scalar)


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_NDARRAY:
        return _decode_ndarray(data, scalar=False)
    if code == _EXT_NPSCALAR:
        return _decode_ndarray(data, scalar=True)
    if code == _EXT_COMPLEX:
        real, imag = msgpack.unpackb(data)
        return complex(real, imag)
    raise _BadMsgpack(f"unknown msgpack extension type {code}")


def _parse_msgpack(path: Path) -> dict:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        tree = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except _BadMsgpack as exc:
        raise InputError(f"{path}: not a valid T5X checkpoint file: {exc}", _COPY_HINT) from None
    except Exception as exc:  # noqa: BLE001 - msgpack raises many types on garbage
        raise InputError(f"{path}: not a valid T5X checkpoint file (msgpack: {type(exc).__name__}: "
                         f"{_one_line(exc)})", _COPY_HINT) from None
    if not isinstance(tree, dict):
        raise InputError(f"{path}: not a valid T5X checkpoint file (top level is not a map)", _COPY_HINT)
    return tree


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _is_spec(node: Any) -> bool:
    return isinstance(node, dict) and "driver" in node and ("kvstore" in node or "path" in node) \
        and "metadata" in node


def _is_chunked(node: Any) -> bool:
    return isinstance(node, dict) and node.get(CHUNKED_KEY) is True


def _walk(node: Any, prefix: str):
    """(path, leaf) in sorted key order; specs and chunked arrays are leaves, as are empty dicts."""
    if isinstance(node, dict) and not _is_spec(node) and not _is_chunked(node) and node:
        for key in sorted(node, key=str):
            yield from _walk(node[key], f"{prefix}/{key}" if prefix else str(key))
    else:
        yield prefix, node


# ----------------------------------------------------------------------------------------------
# tensorstore arrays


def _spec_rel_parts(spec: dict, msg_file: Path, name: str) -> list[str]:
    """The array directory as path components relative to the step directory (never escaping it)."""
    kv = spec.get("kvstore")
    where = f"{msg_file}: array {name!r}"
    if kv is None:
        kv = {}
    if not isinstance(kv, dict):
        raise InputError(f"{where}: unsupported tensorstore kvstore {kv!r}",
                         "T5X specs name a 'file', 'gfile' or 'gcs' kvstore with a relative path")
    driver = kv.get("driver", "file")
    if driver not in KVSTORE_DRIVERS:
        raise InputError(f"{where}: unsupported tensorstore kvstore driver {driver!r}",
                         "T5X specs name a 'file', 'gfile' or 'gcs' kvstore with a relative path")
    pieces = [p for p in (kv.get("path"), spec.get("path")) if p not in (None, "")]
    if not pieces or not all(isinstance(p, str) for p in pieces):
        raise InputError(f"{where}: the tensorstore spec has no path", _COPY_HINT)
    parts: list[str] = []
    for piece in pieces:
        if piece.startswith(("/", "\\")) or "://" in piece or re.match(r"^[A-Za-z]:", piece):
            raise InputError(f"{where}: tensorstore path {piece!r} is absolute",
                             "a T5X spec path must be relative to the checkpoint directory; refusing to follow it")
        for part in piece.replace("\\", "/").split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                raise InputError(f"{where}: tensorstore path {piece!r} leaves the checkpoint directory",
                                 "a T5X spec path must stay inside the checkpoint directory; refusing to follow it")
            if "\x00" in part:
                raise InputError(f"{where}: tensorstore path {piece!r} is not a valid file name", _COPY_HINT)
            parts.append(part)
    if not parts:
        raise InputError(f"{where}: the tensorstore spec has an empty path", _COPY_HINT)
    return parts


def _zarr_dtype(value: Any, where: str) -> np.dtype:
    if value == "bfloat16":
        return numpy_dtype("bfloat16")
    try:
        dt = np.dtype(value)
    except TypeError:
        raise InputError(f"{where}: unsupported zarr dtype {value!r}") from None
    return dt.newbyteorder("=") if dt.byteorder in "<>" else dt  # tensorstore reads into native order


def _chunk_keys(shape: tuple[int, ...], chunks: tuple[int, ...], sep: str) -> list[str]:
    if not shape:
        return ["0"]
    grid = [(s + c - 1) // c for s, c in zip(shape, chunks)]
    if any(g == 0 for g in grid):
        return []
    keys = []
    for idx in np.ndindex(*grid):
        keys.append(sep.join(str(i) for i in idx))
    return keys


def _first_missing_chunk(directory: Path, grid: list[int], sep: str, limit: int) -> str | None:
    """The first of the first ``limit`` chunk keys (C order) with no file, without listing the others."""
    idx = [0] * len(grid)
    for _ in range(limit):
        key = sep.join(str(i) for i in idx)
        if not (directory / key).is_file():
            return key
        for axis in reversed(range(len(grid))):
            idx[axis] += 1
            if idx[axis] < grid[axis]:
                break
            idx[axis] = 0
    return None


@dataclass
class _ZarrArray:
    name: str
    directory: Path  # absolute, inside the step directory
    rel: str  # as shown in messages
    shape: tuple[int, ...]
    dtype: np.dtype
    compressor: dict | None
    files: list[Path]  # .zarray and every chunk file
    msg_file: Path

    def check_files(self) -> None:
        missing = [f for f in self.files if not f.is_file()]
        if missing:
            what = "array directory" if not self.directory.is_dir() else f"file {missing[0].name!r} of"
            raise InputError(f"{self.msg_file}: array {self.name!r} is missing on disk ({what} {self.rel}/ not found)",
                             _COPY_HINT)

    def load(self) -> torch.Tensor:
        self.check_files()
        check_fits_memory(self.shape, self.dtype.itemsize, f"{self.msg_file}: array {self.name!r} in {self.rel}/")
        try:
            store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(self.directory) + "/"}},
                            open=True, read=True).result()
            arr = store.read().result()
        except Exception as exc:  # noqa: BLE001 - tensorstore raises ValueError and friends
            raise InputError(f"{self.msg_file}: array {self.name!r} in {self.rel}/ cannot be read: {_one_line(exc)}",
                             _COPY_HINT) from None
        if tuple(arr.shape) != self.shape or arr.dtype != self.dtype:
            raise InputError(f"{self.msg_file}: array {self.name!r} in {self.rel}/ changed while reading "
                             f"({arr.dtype}{list(arr.shape)} instead of {self.dtype}{list(self.shape)})", _COPY_HINT)
        return _torch(np.asarray(arr), self.shape)


def _int_tuple(value: Any) -> tuple[int, ...] | None:
    try:
        return tuple(int(s) for s in value)
    except (TypeError, ValueError, OverflowError):
        return None


def _torch(arr: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    # arrays.to_torch goes through np.ascontiguousarray, which turns a 0-d array into shape (1,)
    return to_torch(arr).reshape(shape)


_INSIDE_HINT = "a T5X array must live inside its checkpoint directory; refusing to follow the link"


def _open_spec(spec: dict, step_dir: Path, msg_file: Path, name: str, version: int) -> _ZarrArray:
    where = f"{msg_file}: array {name!r}"
    if spec.get("driver") != "zarr":
        raise InputError(f"{where}: unsupported tensorstore driver {spec.get('driver')!r}",
                         "legacy T5X checkpoints store arrays with the 'zarr' driver")
    parts = _spec_rel_parts(spec, msg_file, name)
    rel = "/".join(parts)
    directory = step_dir.joinpath(*parts)
    root = untrusted.resolve(step_dir)
    untrusted.require_inside(directory, root, where=where, shown=f"{rel}/", hint=_INSIDE_HINT)
    zarray = directory / ".zarray"
    untrusted.require_inside(zarray, root, where=where, shown=f"{rel}/.zarray", hint=_INSIDE_HINT)  # before reading
    try:
        found = zarray.is_file()
    except OSError as exc:  # e.g. a name too long
        raise InputError(f"{where}: cannot open {rel}/ ({exc.strerror or exc})", _COPY_HINT) from None
    if not found:
        what = "array directory" if not directory.is_dir() else "zarr metadata"
        raise InputError(f"{where} is missing on disk ({what} {rel}/{'' if what.startswith('array') else '.zarray'} "
                         "not found)", _COPY_HINT)
    try:
        meta = untrusted.loads(zarray.read_text(encoding="utf-8"))
        shape = tuple(int(s) for s in meta["shape"])
        chunks = tuple(int(c) for c in meta["chunks"])
        dtype = _zarr_dtype(meta["dtype"], where)
        sep = meta.get("dimension_separator") or "."
        compressor = meta.get("compressor")
        if any(s < 0 for s in shape) or sep not in (".", "/"):
            raise ValueError("negative shape or unknown dimension_separator")
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{where}: invalid zarr metadata in {rel}/.zarray ({_one_line(exc)})", _COPY_HINT) from None
    check_chunk_shape(shape, chunks, f"{where}: {rel}/.zarray", _COPY_HINT)
    spec_dtype = spec.get("dtype")
    if spec_dtype == "uint16" and version < 3:
        raise InputError(f"{where}: version-2 checkpoint stores bfloat16 as uint16",
                         "re-save it with a current T5X (format version 3)")
    if spec_dtype is not None and spec_dtype != dtype.name:
        raise InputError(f"{where}: the spec says dtype {spec_dtype} but {rel}/.zarray says {dtype.name}", _COPY_HINT)
    spec_shape = spec.get("metadata", {}).get("shape") if isinstance(spec.get("metadata"), dict) else None
    if spec_shape is not None and _int_tuple(spec_shape) != shape:
        raise InputError(f"{where}: the spec says shape {spec_shape!r} but {rel}/.zarray says {list(shape)}",
                         _COPY_HINT)
    grid = [-(-s // c) for s, c in zip(shape, chunks)]
    n_chunks = math.prod(grid)
    held = sum(len(ds) + len(fs) for _, ds, fs in os.walk(directory)) if n_chunks > 1 else 0
    if n_chunks > 1 and n_chunks >= held:  # some chunk is missing: never list all the keys of a lying .zarray
        key = _first_missing_chunk(directory, grid, sep, held)
        raise InputError(f"{where} is missing on disk (file {key!r} of {rel}/ not found)", _COPY_HINT)
    files = [zarray] + [directory / key for key in _chunk_keys(shape, chunks, sep)]
    for f in files:  # the chunk itself or a directory on its way ('/' separator) may be a link out
        untrusted.require_inside(f, root, where=where, shown=f"{rel}/{f.relative_to(directory).as_posix()}",
                                 hint=_INSIDE_HINT)
    arr = _ZarrArray(name, directory, rel, shape, dtype, compressor, files, msg_file)
    arr.check_files()
    return arr


# ----------------------------------------------------------------------------------------------
# reader


def _inline_from_chunked(node: dict, msg_file: Path, name: str) -> _Inline:
    try:
        shape_d, chunks_d = node["shape"], node["chunks"]
        shape = tuple(int(shape_d[str(i)]) for i in range(len(shape_d)))
        parts = [chunks_d[str(i)] for i in range(len(chunks_d))]
        if not parts or not all(isinstance(p, _Inline) for p in parts):
            raise ValueError("chunks are not arrays")
        dtype = parts[0].dtype
        if any(p.dtype != dtype for p in parts):
            raise ValueError("chunks of different dtypes")
        data = b"".join(p.data for p in parts)
        if len(data) != math.prod(shape) * dtype.itemsize:
            raise ValueError("chunks do not add up to the shape")
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{msg_file}: array {name!r}: malformed chunked array ({_one_line(exc)})", _COPY_HINT) from None
    return _Inline(shape, dtype, data)


def _tensor_ref(name: str, leaf: Any, step_dir: Path, msg_file: Path, version: int,
                files: list[Path], compressors: list) -> TensorRef | None:
    """A lazy TensorRef for an array leaf, or None when the leaf is not an array."""
    if _is_chunked(leaf):
        leaf = _inline_from_chunked(leaf, msg_file, name)
    if isinstance(leaf, _Inline):
        dtype = torch_dtype(leaf.dtype.name, f"{msg_file}: array {name!r}")
        return TensorRef(name=name, shape=leaf.shape, dtype=dtype, source=str(msg_file),
                         loader=lambda leaf=leaf: _torch(leaf.array(), leaf.shape))
    if _is_spec(leaf):
        arr = _open_spec(leaf, step_dir, msg_file, name, version)
        files.extend(arr.files)
        compressors.append(arr.compressor)
        dtype = torch_dtype(arr.dtype.name, f"{msg_file}: array {name!r}")
        return TensorRef(name=name, shape=arr.shape, dtype=dtype, loader=arr.load, source=str(arr.directory))
    return None


def _plain(value: Any) -> Any:
    """A python value for a non-array leaf (arrays nested in it decoded to numpy)."""
    if isinstance(value, _Inline):
        return value.array()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def read_t5x(path: Path, step: int | None = None) -> Checkpoint:
    """A legacy T5X checkpoint (root holding ``checkpoint_<N>/`` dirs, or one such dir), lazily."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: not a T5X checkpoint directory",
                         "pass a T5X model directory or one of its checkpoint_<step> directories")
    step_dir, layout = _resolve_step_dir(path, step)
    msg_file = step_dir / MSGPACK_FILE
    untrusted.require_inside(msg_file, untrusted.resolve(step_dir), where=str(step_dir), shown=MSGPACK_FILE,
                             hint="a T5X checkpoint file must live inside its checkpoint directory; refusing to follow the link")
    tree = _parse_msgpack(msg_file)
    version = tree.get("version")
    if isinstance(version, _Inline):
        integral = version.shape in ((), (1,)) and version.dtype.kind in "iu"
        version = int(version.array().reshape(())) if integral else None
    if not isinstance(version, int) or isinstance(version, bool) or version not in SUPPORTED_VERSIONS:
        raise InputError(f"{msg_file}: unsupported T5X checkpoint format version {version!r} "
                         f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))})",
                         "re-save the checkpoint with a current T5X")
    optimizer = tree.get("optimizer")
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("target"), dict) or not optimizer["target"]:
        raise InputError(f"{msg_file}: no 'optimizer/target' parameters in the checkpoint", _COPY_HINT)

    files: list[Path] = [msg_file]
    compressors: list = []
    tensors: dict[str, TensorRef] = {}
    state_refs: dict[str, TensorRef] = {}
    other: dict[str, Any] = {}
    for key in tree:
        if key not in ("version", "optimizer"):
            other[str(key)] = _plain(tree[key])
    for sub in sorted(optimizer, key=str):
        if sub not in ("target", "state"):
            for name, leaf in _walk(optimizer[sub], str(sub)):
                ref = _tensor_ref(name, leaf, step_dir, msg_file, version, files, compressors)
                other[name] = ref if ref is not None else _plain(leaf)
    for name, leaf in _walk(optimizer["target"], "target"):
        ref = _tensor_ref(name, leaf, step_dir, msg_file, version, files, compressors)
        if ref is None:
            other[name] = _plain(leaf)
        else:
            tensors[name] = ref
    ckpt_step = None
    state = optimizer.get("state")
    if state is not None:
        if not isinstance(state, dict):
            raise InputError(f"{msg_file}: 'optimizer/state' is not a map", _COPY_HINT)
        for name, leaf in _walk(state, "state"):
            if name == "state/step":
                ckpt_step = _step_value(leaf, msg_file)
                continue
            if _unsupported_inline(leaf):  # e.g. a uint32 counter of some optimizer: kept, not refused
                other[name] = leaf.array()
                continue
            ref = _tensor_ref(name, leaf, step_dir, msg_file, version, files, compressors)
            if ref is None:
                other[name] = _plain(leaf)
            else:
                state_refs[name] = ref
    dir_step = _step_of(step_dir.name)
    resolved_step = ckpt_step if ckpt_step is not None else dir_step
    if layout == "step" and step is not None and step != resolved_step:
        raise InputError(f"{path}: this checkpoint is step {resolved_step}, not {step}",
                         "pass the model directory holding the checkpoint_<step> directories, or drop --step")
    compression = next((dict(c) for c in compressors if isinstance(c, dict)), None)
    metadata = {
        "step": resolved_step,
        "layout": layout,
        "step_dir": step_dir,
        "version": version,
        "compression": compression,
        "optimizer_state": state_refs,
        "other_leaves": other,
    }
    return Checkpoint(path=path, format="t5x", tensors=tensors, config=None, metadata=metadata, weight_files=files)


def _unsupported_inline(leaf: Any) -> bool:
    return isinstance(leaf, _Inline) and leaf.dtype.name not in NUMPY_TO_TORCH


def _step_value(leaf: Any, msg_file: Path) -> int:
    if isinstance(leaf, bool):
        raise InputError(f"{msg_file}: 'optimizer/state/step' is not an integer", _COPY_HINT)
    if isinstance(leaf, int):
        return leaf
    if isinstance(leaf, _Inline) and leaf.shape in ((), (1,)) and leaf.dtype.kind in "iu":
        return int(leaf.array().reshape(()))
    raise InputError(f"{msg_file}: 'optimizer/state/step' is not an integer scalar", _COPY_HINT)


# ----------------------------------------------------------------------------------------------
# writer


def block_bytes(shape: tuple[int, ...], itemsize: int) -> int:
    """Bytes of one block the writer hands to tensorstore for an array of ``shape``: a slab of whole
    chunk rows when it fits ``MAX_SLAB_BYTES``, else one chunk (for the memory estimate)."""
    if not shape:
        return itemsize
    chunks = choose_chunk_shape(tuple(shape), DESIRED_CHUNK_BYTES // itemsize)
    slab = chunks[0] * math.prod(shape[1:]) * itemsize
    return slab if slab <= MAX_SLAB_BYTES else math.prod(chunks) * itemsize


def choose_chunk_shape(shape: tuple[int, ...], target_elements: int) -> list[int]:
    """T5X's chunk shape: divisors of each axis, shrinking the largest axis first until small enough."""
    target_elements = max(1, int(target_elements))
    factors = [_divisors(s) for s in shape]
    while math.prod(f[-1] for f in factors) > target_elements:
        i = max(range(len(shape)), key=lambda k: (factors[k][-1], -k))
        if factors[i][-1] <= 1:
            break
        factors[i].pop()
    return [f[-1] for f in factors]


def _divisors(n: int) -> list[int]:
    if n <= 0:
        return [1]
    small, large = [], []
    for i in range(1, math.isqrt(n) + 1):
        if n % i == 0:
            small.append(i)
            if i != n // i:
                large.append(n // i)
    return small + large[::-1]


def _read_block(fd: int, shape: tuple[int, ...], dtype: np.dtype, index: tuple[slice, ...]) -> np.ndarray:
    """One block of a row-major array stored raw in a file, read with positioned reads (no mmap)."""
    starts = [sl.start for sl in index]
    sizes = [sl.stop - sl.start for sl in index]
    partial = [i for i in range(len(shape)) if sizes[i] != shape[i]]
    axis = partial[-1] if partial else 0  # runs are contiguous from this axis on
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    run = sizes[axis] * strides[axis] * dtype.itemsize
    out = np.empty(sizes, dtype=dtype)
    buf = memoryview(out.reshape(-1).view(np.uint8))
    pos = 0
    for lead in np.ndindex(*sizes[:axis]):
        offset = sum((starts[i] + lead[i]) * strides[i] for i in range(axis)) + starts[axis] * strides[axis]
        got = os.preadv(fd, [buf[pos:pos + run]], offset * dtype.itemsize)
        if got != run:
            raise OSError(f"short read from the staging file ({got} of {run} bytes)")
        pos += run
    return out


def _pack_ndarray(arr: np.ndarray) -> bytes:
    # not np.ascontiguousarray: it turns a 0-d array (the step) into shape (1,)
    return msgpack.packb((tuple(int(s) for s in arr.shape), arr.dtype.name, arr.tobytes("C")), use_bin_type=True)


def _ext_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return msgpack.ExtType(_EXT_NDARRAY, _pack_ndarray(obj))
    if isinstance(obj, np.generic):
        return msgpack.ExtType(_EXT_NPSCALAR, _pack_ndarray(np.asarray(obj)))
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def _chunk_inline(arr: np.ndarray) -> Any:
    """flax's chunking of inline arrays above 1 GiB."""
    if arr.size * arr.dtype.itemsize <= MSGPACK_MAX_CHUNK:
        return arr
    per = max(1, int(MSGPACK_MAX_CHUNK / arr.dtype.itemsize))
    flat = arr.reshape(-1)
    chunks = [flat[i:i + per] for i in range(0, flat.size, per)]
    return {CHUNKED_KEY: True, "shape": {str(i): int(s) for i, s in enumerate(arr.shape)},
            "chunks": {str(i): c for i, c in enumerate(chunks)}}


def is_inline(name: str, shape: tuple[int, ...]) -> bool:
    """Whether T5X keeps this leaf in the msgpack file (no mesh axes) rather than in tensorstore."""
    if name.startswith("target/"):
        return False
    leaf = name.rsplit("/", 1)[-1]
    return leaf in INLINE_STATE_LEAVES or tuple(shape) in ((), (1,))


class T5XWriter(CheckpointWriter):
    """A legacy T5X checkpoint, each array written as it arrives (only the msgpack tree is held).

    ``write_chunks`` streams an array through slabs of whole zarr chunk rows (see there).

    Writes are pipelined: each block goes to tensorstore without waiting for it (at most
    ``MAX_IN_FLIGHT`` blocks pending, so chunks are compressed on every core while the next tensor is
    computed); an array's files are fsynced and hashed once all its blocks are written, in order.

    ``metadata``: ``step`` (int, required), ``layout`` (``"root"``: write ``directory/checkpoint_<step>/``;
    ``"step"``: write into ``directory`` itself; default ``"root"``), ``compression`` (zarr compressor,
    default gzip level 1 as a single-device T5X save writes). Tensor names are ``target/...`` and,
    optionally, ``state/param_states/...``; without state tensors the msgpack has no ``param_states``.
    """


    def __init__(self, directory: Path, tensors: list[OutputTensor], metadata: dict[str, Any] | None = None):
        super().__init__(directory, tensors, metadata)
        step = self.metadata.get("step")
        if isinstance(step, np.integer):
            step = int(step)
        if not isinstance(step, int) or isinstance(step, bool) or step < 0 or step > np.iinfo(np.int32).max:
            raise InputError(f"T5X output: step {step!r} is not a non-negative int32",
                             "give the step of the source checkpoint (or --step)")
        self.step = step
        layout = self.metadata.get("layout") or "root"
        if layout not in ("root", "step"):
            raise InputError(f"T5X output: unknown layout {layout!r}", "use 'root' or 'step'")
        self.layout = layout
        self.compression = self._compression(self.metadata.get("compression"))
        self.step_dir = self.directory / f"checkpoint_{step}" if layout == "root" else self.directory
        self._prefix = Path(f"checkpoint_{step}") if layout == "root" else Path()
        self._plan: list[tuple[OutputTensor, bool, str]] = []
        self._check_names()
        self._tree: dict[str, Any] = {}
        self._pos = 0
        self._files: list[Path] = []
        self.digests: dict[str, str] = {}
        self._aborted = False
        self._staging: Path | None = None
        self._in_flight: deque = deque()  # (array seq, target, write future, source array kept alive)
        self._to_close: deque = deque()  # (array seq, dirname, target, store), in write order
        self._seq = 0

    @staticmethod
    def _compression(value: Any) -> dict:
        if value is None:
            return dict(DEFAULT_COMPRESSION)
        hint = "use {'id': 'gzip', 'level': 1} (single-device T5X) or {'id': 'zstd', 'level': 1}"
        if not isinstance(value, dict) or value.get("id") not in COMPRESSORS:
            raise InputError(f"T5X output: unsupported compression {value!r}", hint)
        try:  # tensorstore's normal form (defaults filled in), as T5X's ts.Spec(...).to_json() stores it
            spec = ts.Spec({"driver": "zarr", "metadata": {"compressor": dict(value)}}).to_json()
            normal = spec["metadata"]["compressor"]
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"T5X output: invalid compression {value!r} ({_one_line(exc)})", hint) from None
        return {k: normal[k] for k in sorted(normal)}

    def _check_names(self) -> None:
        seen_dirs: dict[str, str] = {}
        leaves: set[tuple[str, ...]] = set()
        for t in self.tensors:
            parts = tuple(t.name.split("/"))
            if parts[0] not in ("target", "state") or len(parts) < 2 or any(p in ("", ".", "..") for p in parts):
                raise InputError(f"T5X output: tensor name {t.name!r} is not a T5X tree path",
                                 "names are 'target/<param path>' or 'state/param_states/<param path>/<leaf>'")
            if t.name == "state/step":
                raise InputError("T5X output: 'state/step' is written from the step, not as a tensor",
                                 "drop it from the tensors; pass the step in the writer metadata")
            if t.dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                               torch.int16, torch.int8, torch.uint8, torch.bool):
                raise InputError(f"T5X output: tensor {t.name!r} has unsupported dtype {t.dtype}")
            if parts in leaves:
                raise InputError(f"T5X output: tensor {t.name!r} is given twice")
            leaves.add(parts)
            inline = is_inline(t.name, t.shape)
            dirname = t.name.replace("/", ".")
            if not inline:
                if dirname in seen_dirs:
                    raise InputError(f"T5X output: tensors {seen_dirs[dirname]!r} and {t.name!r} would share the "
                                     f"array directory {dirname!r}", "rename one of them")
                seen_dirs[dirname] = t.name
            self._plan.append((t, inline, dirname))
        for parts in leaves:
            for i in range(1, len(parts)):
                if parts[:i] in leaves:
                    raise InputError(f"T5X output: {'/'.join(parts[:i])!r} is both a tensor and a subtree "
                                     f"(of {'/'.join(parts)!r})", "rename one of them")

    def _insert(self, name: str, value: Any) -> None:
        parts = name.split("/")
        node = self._tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value

    def _next(self, name: str) -> tuple[OutputTensor, bool, str]:
        if self._pos >= len(self._plan):
            raise RuntimeError(f"internal error: unplanned tensor {name!r} written to the T5X writer")
        planned, inline, dirname = self._plan[self._pos]
        if name != planned.name:
            raise RuntimeError(f"internal error: T5X writer got {name!r}, expected {planned.name!r}")
        if self._pos == 0:
            self.step_dir.mkdir(parents=True, exist_ok=True)
        return planned, inline, dirname

    def write(self, name: str, tensor: torch.Tensor) -> None:
        planned, inline, dirname = self._next(name)
        if tuple(tensor.shape) != tuple(planned.shape) or tensor.dtype != planned.dtype:
            raise RuntimeError(f"internal error: {name!r} is {tensor.dtype}{list(tensor.shape)}, planned "
                               f"{planned.dtype}{list(planned.shape)}")
        arr = to_numpy(tensor)
        if inline:
            self._insert(name, _chunk_inline(np.array(arr, copy=True)))
        else:
            spec, store, target = self._create(dirname, arr.shape, arr.dtype)
            # a copy: the caller may reuse the tensor once this returns, tensorstore writes later
            self._write_block(store, target, (), np.array(arr, copy=True))
            self._array_done(dirname, target, store)
            self._insert(name, spec)
        self._pos += 1

    def write_chunks(self, name: str, chunks: Iterable[Any]) -> None:
        """Stream a tensor given as consecutive pieces of its row-major bytes, every zarr chunk written once.

        When a row of zarr chunks spans whole array rows (the usual case: T5X's chunking splits the
        largest axis first), pieces are gathered into one slab of ``chunks[0]`` array rows (at most
        the 64 MiB of one chunk) and each slab is written when complete. Otherwise (e.g. a
        [d_model, vocab] kernel whose chunks split the vocab axis) the bytes are staged in a
        temporary file beside the array and copied chunk by chunk, so memory stays at one chunk.
        """
        planned, inline, dirname = self._next(name)
        shape = tuple(planned.shape)
        if inline or not shape or math.prod(shape) == 0:
            return super().write_chunks(name, chunks)  # small or empty: gathered, then ``write``
        np_dtype = numpy_dtype(TORCH_TO_NUMPY[planned.dtype])
        spec, store, target = self._create(dirname, shape, np_dtype)
        pieces = self._pieces(name, chunks, math.prod(shape) * np_dtype.itemsize, planned.dtype)
        slab_rows = spec["metadata"]["chunks"][0]
        row_bytes = math.prod(shape[1:]) * np_dtype.itemsize
        try:
            if slab_rows * row_bytes <= MAX_SLAB_BYTES:
                self._write_by_slabs(store, target, pieces, shape, np_dtype, slab_rows, row_bytes)
            else:
                self._write_staged(store, target, pieces, shape, np_dtype, spec["metadata"]["chunks"])
        except BaseException:
            self._drain()
            raise
        self._array_done(dirname, target, store)
        self._insert(name, spec)
        self._pos += 1

    @staticmethod
    def _pieces(name: str, chunks: Iterable[Any], total: int, dtype: torch.dtype):
        given = 0
        for piece in chunks:
            view = as_bytes(piece, dtype)
            given += view.nbytes
            if given > total:
                raise RuntimeError(f"internal error: more than the {total} bytes of {name} were given")
            yield view
        if given != total:
            raise RuntimeError(f"internal error: {given} of the {total} bytes of {name} were given")

    def _write_by_slabs(self, store, target: Path, pieces, shape, dtype, slab_rows: int, row_bytes: int) -> None:
        slab = bytearray(slab_rows * row_bytes)
        fill = row = 0
        for view in pieces:
            pos = 0
            while pos < view.nbytes:
                take = min(view.nbytes - pos, len(slab) - fill)
                slab[fill:fill + take] = view[pos:pos + take]
                fill, pos = fill + take, pos + take
                if fill == len(slab):
                    arr = np.frombuffer(slab, dtype=dtype).reshape((slab_rows, *shape[1:]))
                    self._write_block(store, target, (slice(row, row + slab_rows),), arr)
                    row, fill = row + slab_rows, 0
                    if row < shape[0]:  # the slab belongs to tensorstore until written: a new one
                        slab = bytearray(slab_rows * row_bytes)

    def _write_staged(self, store, target: Path, pieces, shape, dtype, chunk_shape) -> None:
        staging = target.parent / f".{target.name}.staging"
        self._staging = staging
        try:
            with open(staging, "wb") as fh:
                for view in pieces:
                    fh.write(view)
            grid = [s // c for s, c in zip(shape, chunk_shape)]  # T5X chunk shapes divide the shape
            fd = os.open(staging, os.O_RDONLY)
            try:
                for pos in np.ndindex(*grid):
                    index = tuple(slice(i * c, (i + 1) * c) for i, c in zip(pos, chunk_shape))
                    self._write_block(store, target, index, _read_block(fd, shape, dtype, index))
            finally:
                os.close(fd)
        finally:
            staging.unlink(missing_ok=True)
            self._staging = None

    def _write_block(self, store, target: Path, index: tuple, arr: np.ndarray) -> None:
        """Hand one block to tensorstore without waiting for it; ``arr`` must not change afterwards."""
        while len(self._in_flight) >= MAX_IN_FLIGHT:
            self._wait_oldest()
        try:
            future = store[index].write(arr, can_reference_source_data_indefinitely=True)
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{target}: cannot write array ({_one_line(exc)})") from None
        self._in_flight.append((self._seq, target, future, arr))

    def _wait_oldest(self) -> None:
        _seq, target, future, _arr = self._in_flight.popleft()
        try:
            future.result()
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{target}: cannot write array ({_one_line(exc)})") from None
        self._close_written()

    def _array_done(self, dirname: str, target: Path, store) -> None:
        """Every block of the array is handed over: close it once they are written."""
        self._to_close.append((self._seq, dirname, target, store))
        self._seq += 1
        self._close_written()

    def _close_written(self) -> None:
        """fsync and hash, in write order, the arrays none of whose blocks are still pending."""
        pending = self._in_flight[0][0] if self._in_flight else self._seq
        while self._to_close and self._to_close[0][0] < pending:
            _seq, dirname, target, _store = self._to_close.popleft()
            self._close_array(dirname, target)

    def _drain(self) -> None:
        """After a failure: wait for every pending write (errors ignored), so nothing keeps writing."""
        while self._in_flight:
            _seq, _target, future, _arr = self._in_flight.popleft()
            with contextlib.suppress(Exception):  # the first error is already being raised
                future.result()
        self._to_close.clear()

    def _spec(self, dirname: str, shape: tuple[int, ...], dtype: np.dtype) -> dict:
        """The spec T5X stores (tensorstore's normalised JSON of ``_get_spec``)."""
        chunks = choose_chunk_shape(shape, DESIRED_CHUNK_BYTES // dtype.itemsize)
        return {"driver": "zarr", "dtype": dtype.name,
                "kvstore": {"driver": "file", "path": dirname + "/"},
                "metadata": {"chunks": [int(c) for c in chunks], "compressor": dict(self.compression),
                             "shape": [int(s) for s in shape]}}

    def _create(self, dirname: str, shape: tuple[int, ...], dtype: np.dtype):
        spec = self._spec(dirname, shape, dtype)
        target = self.step_dir / dirname
        if target.exists():
            raise InputError(f"{target}: already exists", "write into an empty directory")
        absolute = dict(spec, kvstore={"driver": "file", "path": str(target) + "/"})
        try:
            store = ts.open(absolute, create=True, open=False).result()
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{target}: cannot create array ({_one_line(exc)})") from None
        return spec, store, target

    def _close_array(self, dirname: str, target: Path) -> None:
        """fsync the array's files and record their digests."""
        for p in sorted(p for p in target.iterdir() if p.is_file()):
            fsync_path(p)
            rel = self._prefix / dirname / p.name
            self.digests[rel.as_posix()] = sha256_file(p)
            self._files.append(rel)
        fsync_path(target)

    def finish(self) -> list[Path]:
        if self._pos != len(self._plan):
            raise RuntimeError(f"internal error: {len(self._plan) - self._pos} planned tensors were never written")
        while self._in_flight:
            self._wait_oldest()
        self._close_written()
        self.step_dir.mkdir(parents=True, exist_ok=True)
        state: dict[str, Any] = {}
        if "state" in self._tree:
            state.update(self._tree["state"])
        state["step"] = np.asarray(self.step, dtype=np.int32)  # T5X stores the step as a 0-d int32 array
        optimizer = {"state": state, "target": self._tree.get("target", {})}
        # flax to_bytes({'version': 3, 'optimizer': ...}): the top level in insertion order, the state
        # dict as jax's tree_unflatten rebuilt it (keys sorted)
        payload = msgpack.packb({"version": VERSION, "optimizer": _sorted_tree(optimizer)},
                                default=_ext_default, strict_types=True)
        write_file(self.step_dir / MSGPACK_FILE, payload)
        rel = self._prefix / MSGPACK_FILE
        self.digests[rel.as_posix()] = hashlib.sha256(payload).hexdigest()
        self._files.append(rel)
        fsync_path(self.step_dir)
        if self.layout == "root":
            fsync_path(self.directory)
        return list(self._files)

    def abort(self) -> None:
        """Wait for pending writes (nothing keeps writing into the directory), remove a staging file."""
        self._aborted = True
        self._tree = {}
        self._drain()
        if self._staging is not None:
            self._staging.unlink(missing_ok=True)
            self._staging = None


def _sorted_tree(node: Any) -> Any:
    if isinstance(node, dict) and not (CHUNKED_KEY in node):
        return {k: _sorted_tree(node[k]) for k in sorted(node)}
    return node
