"""Orbax checkpoints (orbax-checkpoint 0.12, OCDBT + zarr), read and written with tensorstore only.

An Orbax *item* directory holds ``_METADATA`` (JSON: ``tree_metadata`` maps each leaf to its
``key_metadata`` -- the tree keys, ``key_type`` 1 = sequence index, 2 = dict key -- and its
``value_metadata`` -- ``value_type`` ``jax.Array`` / ``np.ndarray`` / ``scalar`` / ``string`` or an
empty container; plus ``use_zarr3``) and one OCDBT database (``manifest.ocdbt``, ``d/`` and, as
orbax writes it, ``ocdbt.process_*/`` whose data files the root manifest references). Each array
leaf is a zarr (v2) or zarr3 array under the key ``<keys joined by '.'>/`` of that database;
``string`` leaves live in ``_strings.json``. Three layouts are accepted:

* ``item``: the directory holding ``_METADATA`` (what ``StandardCheckpointer.save`` writes);
* ``step``: a directory holding one item directory (``<step>/<item>/``; the v1 API's
  ``save`` writes ``<dir>/state/``);
* ``root``: a ``CheckpointManager`` directory holding ``<step>/<item>/`` (item ``default``).

Reading is lazy: shapes and dtypes come from the zarr metadata stored in the database; loading a
tensor reads that one array. Writing streams: each array is encoded by tensorstore's zarr driver (in
memory, one array at a time, with the codecs orbax uses) and its chunks are appended to the data
files of a new OCDBT database as it arrives; ``finish`` writes the B+tree node, the manifest,
``_METADATA`` and the ``_CHECKPOINT_METADATA`` a ``CheckpointManager`` needs to list and restore a step.

Determinism: the output is byte-reproducible. tensorstore's own OCDBT writer names data files
with random ids and stamps commit times, so the database is written here (:class:`OcdbtWriter`,
following the documented format): content-named data files, one version with commit time 0,
uncompressed B+tree node. ``_CHECKPOINT_METADATA`` is written without timestamps (orbax accepts
null). Checkpoints *written by orbax* are not reproducible (random file names, timestamps).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import tensorstore as ts
import torch

from .. import untrusted
from ..errors import InputError
from ..ir import Checkpoint, TensorRef
from .arrays import (NUMPY_TO_TORCH, TORCH_TO_NUMPY, check_chunk_shape, check_fits_memory, numpy_dtype, to_numpy,
                     to_torch, torch_dtype)
from .base import CheckpointWriter, OutputTensor
from .files import fsync_path, write_file
from .staged_file import StagedFile

METADATA = "_METADATA"
STRINGS = "_strings.json"
SHARDING = "_sharding"
CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"
MANIFEST = "manifest.ocdbt"
DEFAULT_ITEM = "default"
#: the handler CheckpointManager / StandardCheckpointer record for an item holding a pytree
STANDARD_HANDLER = "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"
#: arrays larger than this are split into several chunks (orbax's OCDBT target data file size)
CHUNK_BYTES = 2**31
ARRAY_TYPES = ("jax.Array", "np.ndarray")
EMPTY_TYPES = {"None": None, "Dict": {}, "List": [], "Tuple": ()}
KEY_SEQUENCE, KEY_DICT = 1, 2
#: no cache for array chunks (each tensor is read once), a small one for OCDBT b-tree nodes
_CONTEXT = {"cache_pool": {"total_bytes_limit": 0}, "cache_pool#ocdbt": {"total_bytes_limit": 64 * 2**20}}
_TMP_MARKER = ".orbax-checkpoint-tmp"
_STEP_NAME = re.compile(r"^(?:.*_)?(\d+)$")


# ----------------------------------------------------------------------------------------------
# helpers


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def _kvstore_spec(item_dir: Path, path: str = "") -> dict[str, Any]:
    base = {"driver": "file", "path": f"{untrusted.resolve(item_dir)}/"}  # not a URL: no percent-decoding
    spec: dict[str, Any] = {"driver": "ocdbt", "base": base, "cache_pool": "cache_pool#ocdbt"}
    if path:
        spec["path"] = path
    return spec


def _dtype_from_zarr(meta: dict[str, Any], zarr_format: int) -> np.dtype:
    name = meta.get("dtype") if zarr_format == 2 else meta.get("data_type")
    if not isinstance(name, str):
        raise ValueError(f"no dtype in zarr metadata: {meta!r}")
    if name == "bfloat16":
        return numpy_dtype(name)
    return np.dtype(name).newbyteorder("=")  # tensorstore returns native byte order


def _chunk_shapes(meta: dict[str, Any], zarr_format: int) -> list[tuple[int, ...]]:
    """Every chunk shape zarr metadata declares: zarr 2 ``chunks``; zarr 3 the chunk grid's and, for
    sharded arrays, the inner chunks of each ``sharding_indexed`` codec."""
    if zarr_format == 2:
        return [tuple(int(c) for c in meta["chunks"])]
    found = [tuple(int(c) for c in meta["chunk_grid"]["configuration"]["chunk_shape"])]
    codecs = list(meta.get("codecs") or [])
    while codecs:
        codec = codecs.pop()
        if isinstance(codec, dict) and codec.get("name") == "sharding_indexed":
            found.append(tuple(int(c) for c in codec["configuration"]["chunk_shape"]))
            codecs += list(codec["configuration"].get("codecs") or [])
    return found


def _zarr2_dtype(dtype: np.dtype) -> str:
    return "bfloat16" if dtype == np.dtype(ml_dtypes.bfloat16) else dtype.str


def _zarr3_dtype(dtype: np.dtype) -> str:
    return "bfloat16" if dtype == np.dtype(ml_dtypes.bfloat16) else dtype.name


def _is_item_dir(p: Path) -> bool:
    return (p / METADATA).is_file()


def _items_in(step_dir: Path) -> list[str]:
    try:
        return sorted(c.name for c in step_dir.iterdir() if c.is_dir() and _is_item_dir(c))
    except OSError:
        return []


def _steps_in(root: Path) -> dict[int, Path]:
    steps: dict[int, Path] = {}
    try:
        children = list(root.iterdir())
    except OSError:
        return steps
    for c in children:
        if not c.is_dir() or _TMP_MARKER in c.name:
            continue
        m = _STEP_NAME.match(c.name)
        if m and _items_in(c):
            steps[int(m.group(1))] = c
    return steps


def _step_of_dir(p: Path) -> int | None:
    return int(p.name) if p.name.isdecimal() else None


def is_orbax_checkpoint(path: Path) -> bool:
    """An item dir with ``_METADATA``, a step dir holding item dirs, or a CheckpointManager root."""
    p = Path(path)
    if not p.is_dir():
        return False
    if (p / METADATA).is_file():
        return True
    return bool(_items_in(p)) or bool(_steps_in(p))


# ----------------------------------------------------------------------------------------------
# reader


def _locate(path: Path, step: int | None) -> tuple[Path, str, str | None, int | None]:
    """(item dir, layout, item name, step from the directory name)."""
    if (path / METADATA).is_file():
        return path, "item", None, _step_of_dir(untrusted.resolve(path).parent)
    items = _items_in(path)
    if items:
        if len(items) > 1:
            raise InputError(f"{path}: holds several Orbax items ({', '.join(items)})",
                             "pass the item directory to read, e.g. " + str(path / items[0]))
        return path / items[0], "step", items[0], _step_of_dir(path)
    steps = _steps_in(path)
    if not steps:
        raise InputError(f"{path}: not an Orbax checkpoint (no {METADATA} in it or its subdirectories)",
                         "pass an item directory holding _METADATA, a <step>/ directory or a CheckpointManager root")
    found = ", ".join(str(s) for s in sorted(steps))
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise InputError(f"{path}: no step {step} in this Orbax checkpoint (steps found: {found})",
                         "choose one of the steps found with --step")
    step_dir = steps[step]
    items = _items_in(step_dir)
    if len(items) > 1:
        raise InputError(f"{step_dir}: holds several Orbax items ({', '.join(items)})",
                         "pass the item directory to read, e.g. " + str(step_dir / items[0]))
    return step_dir / items[0], "root", items[0], step


def _read_json(path: Path, what: str) -> Any:
    return untrusted.read_json(path, what=what, hint="the checkpoint is damaged; re-save it with orbax-checkpoint",
                               expect=None)


def _parse_tree_metadata(meta_path: Path, data: Any) -> list[tuple[list[tuple[str, int]], dict[str, Any]]]:
    """[(keys, value_metadata)] sorted in tree order."""
    hint = "the checkpoint is damaged or not written by orbax-checkpoint; re-save it"
    if not isinstance(data, dict) or not isinstance(data.get("tree_metadata"), dict):
        raise InputError(f"{meta_path}: no 'tree_metadata' object", hint)
    leaves = []
    for label, entry in data["tree_metadata"].items():
        try:
            keys = [(str(k["key"]), int(k["key_type"])) for k in entry["key_metadata"]]
            value = entry["value_metadata"]
            if not keys or not isinstance(value, dict) or not isinstance(value["value_type"], str):
                raise ValueError
        except (KeyError, TypeError, ValueError, OverflowError):
            raise InputError(f"{meta_path}: malformed tree_metadata entry {label!r}", hint) from None
        leaves.append((keys, value))
    leaves.sort(key=lambda kv: _sort_key(kv[0]))
    return leaves


def _sort_key(keys: list[tuple[str, int]]) -> tuple:
    return tuple((0, int(k), "") if t == KEY_SEQUENCE and k.isdecimal() else (1, 0, k) for k, t in keys)


class _Database:
    """One OCDBT database opened read-only, with a shared tensorstore context."""

    def __init__(self, item_dir: Path, zarr_format: int):
        self.item_dir = item_dir
        self.zarr_format = zarr_format
        self.driver = "zarr3" if zarr_format == 3 else "zarr"
        self.meta_key = "zarr.json" if zarr_format == 3 else ".zarray"
        self.context = ts.Context(_CONTEXT)

    def kvstore(self) -> ts.KvStore:
        try:
            return ts.KvStore.open(_kvstore_spec(self.item_dir), context=self.context).result()
        except Exception as exc:  # noqa: BLE001 - tensorstore raises ValueError and friends
            raise InputError(f"{self.item_dir / MANIFEST}: cannot open the OCDBT database ({_one_line(exc)})",
                             "the checkpoint is damaged or incomplete; re-copy or re-save it") from None

    def read_array(self, storage: str, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        check_fits_memory(shape, dtype.itemsize, f"{self.item_dir}: array {name!r}")
        spec = {"driver": self.driver, "kvstore": _kvstore_spec(self.item_dir, storage + "/")}
        try:
            store = ts.open(spec, open=True, read=True, context=self.context).result()
            data = store.read().result()
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{self.item_dir}: cannot read array {name!r} from the OCDBT database ({_one_line(exc)})",
                             "the checkpoint is damaged or incomplete; re-copy or re-save it") from None
        if tuple(data.shape) != tuple(shape) or data.dtype != dtype:
            raise InputError(f"{self.item_dir}: array {name!r} holds {data.dtype}{list(data.shape)}, "
                             f"its metadata says {dtype}{list(shape)}", "the checkpoint is damaged; re-save it")
        return data


def read_orbax(path: Path, step: int | None = None) -> Checkpoint:
    """Read an Orbax checkpoint lazily (see the module docstring for the layouts)."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: not an Orbax checkpoint directory")
    item_dir, layout, item, dir_step = _locate(path, step)
    meta_path = item_dir / METADATA
    root = untrusted.resolve(item_dir)
    _require_inside(meta_path, item_dir, root)
    meta = _read_json(meta_path, "the Orbax metadata")
    leaves = _parse_tree_metadata(meta_path, meta)
    if meta.get("use_ocdbt", True) is False:
        raise InputError(f"{meta_path}: checkpoint written without OCDBT (one tensorstore directory per array)",
                         "only OCDBT checkpoints (the orbax default since 0.5) are supported; re-save with use_ocdbt=True")
    if not (item_dir / MANIFEST).is_file():
        raise InputError(f"{item_dir}: no {MANIFEST} next to {METADATA} (the OCDBT database is missing)",
                         "the checkpoint is incomplete; re-copy or re-save it")
    zarr_format = 3 if meta.get("use_zarr3") else 2
    database = _database_files(item_dir, root)  # checked before tensorstore opens any of them
    db = _Database(item_dir, zarr_format)

    names: list[str] = []
    tree_keys: dict[str, list[list]] = {}
    value_types: dict[str, str] = {}
    storage: dict[str, str] = {}
    for keys, value in leaves:
        name = "/".join(k for k, _ in keys)
        if name in tree_keys:
            raise InputError(f"{meta_path}: two leaves are both named {name!r}", "tree keys must not contain '/'")
        names.append(name)
        tree_keys[name] = [[k, t] for k, t in keys]
        value_types[name] = value["value_type"]
        storage[name] = ".".join(k for k, _ in keys)

    stored = [n for n in names if value_types[n] in ARRAY_TYPES or value_types[n] == "scalar"]
    kv = db.kvstore()
    try:
        futures = {n: kv.read(f"{storage[n]}/{db.meta_key}") for n in stored}
        raw = {n: f.result() for n, f in futures.items()}
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{item_dir}: cannot read the OCDBT database ({_one_line(exc)})",
                         "the checkpoint is damaged or incomplete; re-copy or re-save it") from None
    arrays: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    for n in stored:
        r = raw[n]
        if r.state != "value":
            raise InputError(f"{item_dir}: array {n!r} is listed in {METADATA} but missing from the OCDBT database",
                             "the checkpoint is incomplete (interrupted save?); re-save it")
        try:
            zmeta = untrusted.loads(bytes(r.value))
            shape = tuple(int(s) for s in zmeta["shape"])
            dtype = _dtype_from_zarr(zmeta, zarr_format)
            chunk_shapes = _chunk_shapes(zmeta, zarr_format)
            if any(s < 0 for s in shape):
                raise ValueError(f"negative shape {list(shape)}")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"{item_dir}: invalid zarr metadata for array {n!r} ({_one_line(exc)})",
                             "the checkpoint is damaged; re-save it") from None
        for chunks in chunk_shapes:
            check_chunk_shape(shape, chunks, f"{item_dir}: array {n!r}", "the checkpoint is damaged; re-save it")
        arrays[n] = (shape, dtype)

    files: list[Path] = [meta_path]
    other: dict[str, Any] = {}
    strings: dict[str, Any] | None = None
    for n in names:
        vt = value_types[n]
        if vt in EMPTY_TYPES:
            other[n] = EMPTY_TYPES[vt]
        elif vt == "string":
            if strings is None:
                _require_inside(item_dir / STRINGS, item_dir, root)
                strings = _read_json(item_dir / STRINGS, "the string leaves")
                files.append(item_dir / STRINGS)
                if not isinstance(strings, dict):
                    raise InputError(f"{item_dir / STRINGS}: expected a JSON object")
            if storage[n] not in strings:
                raise InputError(f"{item_dir / STRINGS}: string leaf {n!r} is missing", "re-save the checkpoint")
            other[n] = strings[storage[n]]
        elif vt == "scalar":
            shape, dtype = arrays[n]
            if any(s != 1 for s in shape):
                raise InputError(f"{meta_path}: leaf {n!r} is listed as a scalar but holds an array of shape "
                                 f"{list(shape)}", "the checkpoint is damaged; re-save it")
            other[n] = db.read_array(storage[n], n, shape, dtype).item()
        elif vt not in ARRAY_TYPES:
            raise InputError(f"{meta_path}: leaf {n!r} has a value type orbax-checkpoint 0.12 does not write ({vt!r})",
                             "only arrays, scalars, strings and empty containers are supported")

    array_names = [n for n in names if value_types[n] in ARRAY_TYPES]
    step_name = None
    for cand in ("state/step", "step"):
        if cand in arrays and arrays[cand][0] == () and (cand not in array_names or arrays[cand][1].kind in "iu"):
            step_name = cand
            break
    if step_name is not None and step_name in array_names:
        shape, dtype = arrays[step_name]
        other[step_name] = db.read_array(storage[step_name], step_name, shape, dtype)
        array_names.remove(step_name)

    top = {n.split("/", 1)[0] for n in array_names}
    prefix = "target/" if "target" in top else "params/" if "params" in top else ""
    params = [n for n in array_names if n.startswith(prefix)]
    rest = [n for n in array_names if not n.startswith(prefix)]

    def ref(n: str) -> TensorRef:
        shape, dtype = arrays[n]
        return TensorRef(name=n, shape=shape, dtype=torch_dtype(dtype, f"{item_dir}: array {n!r}"),
                         loader=lambda: to_torch(db.read_array(storage[n], n, shape, dtype)), source=str(item_dir))

    tensors = {n: ref(n) for n in params}
    if not tensors:
        raise InputError(f"{item_dir}: the checkpoint holds no arrays", "is this the right directory?")

    ckpt_step: int | None = None
    if step_name is not None:
        v = other[step_name]
        ckpt_step = int(v.item() if isinstance(v, np.ndarray) else v)
    elif dir_step is not None:
        ckpt_step = dir_step
    if step is not None and layout != "root" and ckpt_step is not None and ckpt_step != step:
        raise InputError(f"{path}: holds step {ckpt_step}, not step {step}",
                         "pass the CheckpointManager root directory to choose among steps")

    sharding = None
    if (item_dir / SHARDING).is_file():
        _require_inside(item_dir / SHARDING, item_dir, root)
        sharding = _read_sharding(item_dir / SHARDING, {st: n for n, st in storage.items()})
        files.append(item_dir / SHARDING)
    files += database
    step_meta_dir = item_dir.parent if layout in ("step", "root") else item_dir
    checkpoint_metadata = None
    step_meta = step_meta_dir / CHECKPOINT_METADATA
    if step_meta.is_file() and untrusted.resolves_inside(step_meta, untrusted.resolve(step_meta_dir)):
        try:
            checkpoint_metadata = untrusted.loads(step_meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            checkpoint_metadata = None  # informational only; never needed to read the arrays
    metadata = {
        "step": ckpt_step,
        "layout": layout,
        "item": item,
        "zarr_format": zarr_format,
        "optimizer_state": {n: ref(n) for n in rest},
        "other_leaves": other,
        "tree_keys": tree_keys,
        "value_types": value_types,
        "custom_metadata": meta.get("custom_metadata"),
        "sharding": sharding,
        "checkpoint_metadata": checkpoint_metadata,
        "item_dir": str(item_dir),
    }
    return Checkpoint(path=path, format="orbax", tensors=tensors, config=None, metadata=metadata, weight_files=files)


def _read_sharding(path: Path, names: dict[str, str]) -> dict[str, str]:
    """``_sharding``: base64 of each array's stored name -> its JAX sharding (a JSON string)."""
    data = _read_json(path, "the array shardings")
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object", "the checkpoint is damaged; re-save it")
    out = {}
    for key, value in data.items():
        try:
            stored = base64.b64decode(key, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise InputError(f"{path}: invalid entry {key!r}", "the checkpoint is damaged; re-save it") from None
        if stored in names and isinstance(value, str):
            out[names[stored]] = value
    return out


def _database_files(item_dir: Path, root: Path) -> list[Path]:
    """The OCDBT database: the root manifest, its data files and the per-process databases it references.
    Every one of them, and every directory on the way, must stay inside the item directory (``root``,
    resolved): a ``d/`` linked elsewhere is refused, as the T5X reader refuses an array directory that
    is, rather than read (and hashed) outside the checkpoint."""
    files = [item_dir / MANIFEST]
    _require_inside(files[0], item_dir, root)
    for sub in sorted(item_dir.iterdir()):
        if sub.name == "d" or sub.name.startswith("ocdbt.process_"):
            _require_inside(sub, item_dir, root)
            if not sub.is_dir():
                continue
            found = []
            for top, dirs, names in os.walk(sub):  # links are not followed, but each one is checked
                for entry in dirs + names:
                    _require_inside(Path(top) / entry, item_dir, root)
                found += [Path(top) / f for f in names if (Path(top) / f).is_file()]
            files += sorted(found)
    return files


def _require_inside(path: Path, item_dir: Path, root: Path) -> None:
    untrusted.require_inside(path, root, where=str(item_dir), shown=os.path.relpath(path, item_dir),
                             hint="an Orbax checkpoint's files must live inside its directory; refusing to follow the link")


# ----------------------------------------------------------------------------------------------
# writer


def _chunk_shape(shape: tuple[int, ...], itemsize: int, limit: int = CHUNK_BYTES) -> list[int]:
    """The whole array as one chunk, or leading-axis slabs of at most ``limit`` bytes."""
    chunk = [max(1, s) for s in shape]
    for axis in range(len(chunk)):
        n = itemsize
        for s in chunk:
            n *= s
        if n <= limit:
            break
        rest = n // chunk[axis]
        chunk[axis] = max(1, limit // rest)
    return chunk


def _leaf_value(name: str, value: Any) -> tuple[str, Any]:
    """(orbax value type, normalised value) for an extra leaf."""
    if value is None:
        return "None", None
    if isinstance(value, dict) and not value:
        return "Dict", None
    if isinstance(value, (list, tuple)) and not value:
        return ("List" if isinstance(value, list) else "Tuple"), None
    if isinstance(value, str):
        return "string", value
    if isinstance(value, (bool, int, float)):
        return "scalar", value
    if isinstance(value, torch.Tensor):
        value = to_numpy(value)
    if isinstance(value, (np.ndarray, np.generic)):
        arr = np.asarray(value)
        if arr.dtype.name not in NUMPY_TO_TORCH:
            raise InputError(f"extra leaf {name!r}: unsupported dtype {arr.dtype}",
                             "use a float, integer or bool array")
        return "np.ndarray", arr
    raise InputError(f"extra leaf {name!r}: cannot store a {type(value).__name__} in an Orbax checkpoint",
                     "extra leaves must be arrays, numbers, strings, None or empty containers")


# ----------------------------------------------------------------------------------------------
# a deterministic OCDBT database writer
#
# tensorstore's own OCDBT writer names data files with random ids and stamps commit times, so
# its output differs on every run. The format is documented
# (https://google.github.io/tensorstore/kvstore/ocdbt/index.html) and simple for a database written
# once: values go to content-named data files as they arrive, then one B+tree leaf node (keys sorted,
# small values inline) and a manifest with a single version (generation 1, commit time 0). Nodes are
# stored uncompressed (compression format 0), which the format allows; array chunks themselves are
# zstd-compressed by the zarr codecs, exactly as orbax writes them.

_MANIFEST_MAGIC = 0x0CDB3A2A
_BTREE_MAGIC = 0x0CDB20DE
_VERSION_TREE_ARITY_LOG2 = 4


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    table = _CRC32C
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _prefix_split(items: list[bytes]) -> tuple[list[int], list[bytes]]:
    """OCDBT prefix compression of a sorted list: the length each item shares with the one before
    (one per item after the first) and what remains of each item."""
    prefixes = [_common_prefix(items[i], items[i + 1]) for i in range(len(items) - 1)]
    return prefixes, [items[i][prefixes[i - 1]:] if i else items[i] for i in range(len(items))]


def _data_file_table(paths: list[bytes]) -> bytes:
    """Prefix-compressed table of data file paths (relative to the database; no base paths)."""
    out = bytearray(_varint(len(paths)))
    prefixes, suffixes = _prefix_split(paths)
    for p in prefixes:
        out += _varint(p)
    for sfx in suffixes:
        out += _varint(len(sfx))
    for _ in paths:
        out += _varint(0)  # base_path_length
    for sfx in suffixes:
        out += sfx
    return bytes(out)


def _encode_node(magic: int, body: bytes) -> bytes:
    """Outer header (magic, length, format version 0, uncompressed), body, crc32c footer."""
    length = 4 + 8 + 1 + 1 + len(body) + 4
    data = magic.to_bytes(4, "big") + length.to_bytes(8, "little") + _varint(0) + _varint(0) + body
    return data + crc32c(data).to_bytes(4, "little")


#: encoded chunks are copied out of tensorstore's in-memory store this many bytes at a time
VALUE_PIECE_BYTES = 16 * 2**20


def _value_size(kv: ts.KvStore, key: bytes) -> int:
    """The length of a stored value, found with one-byte range reads (the key-value API reports no sizes
    and reading the value whole would copy it): doubling, then bisection; ~2 log2(size) tiny reads."""

    def has(pos: int) -> bool:
        try:
            kv.read(key, byte_range=slice(pos, pos + 1)).result()
            return True
        except ValueError:  # OUT_OF_RANGE
            return False

    if not has(0):
        return 0
    lo, hi = 0, 1  # has(lo), and hi is to be found with not has(hi)
    while has(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if has(mid) else (lo, mid)
    return hi


class OcdbtWriter:
    """Write one OCDBT database (single version) into ``directory``, byte-reproducibly.

    ``put(key, value)`` in any order (keys unique); values larger than ``max_inline`` are appended
    to data files ``d/<sha256[:32]>`` of at most ``target_file_size`` bytes (a value is never split);
    ``finish()`` writes the B+tree node and ``manifest.ocdbt``. ``digests`` maps each written
    file (relative to ``directory``) to its sha256.
    """

    def __init__(self, directory: Path, max_inline: int = 1024, max_node_bytes: int = 100000000,
                 target_file_size: int = CHUNK_BYTES):
        self.directory = Path(directory)
        self.max_inline = max_inline
        self.max_node_bytes = max_node_bytes
        self.target_file_size = target_file_size
        self.entries: dict[bytes, tuple] = {}  # key -> ("inline", bytes) | ("file", file index, offset, length)
        self.files: list[str] = []  # final relative paths of closed data files, by index
        self.digests: dict[str, str] = {}
        self._fh = None
        self._tmp: Path | None = None
        self._size = 0

    def put(self, key: bytes, value: bytes) -> None:
        if len(value) <= self.max_inline:
            if key in self.entries:
                raise ValueError(f"duplicate key {key!r}")
            self.entries[key] = ("inline", bytes(value))
            return
        self.put_pieces(key, len(value), [value])

    def put_pieces(self, key: bytes, size: int, pieces: Iterable[bytes]) -> None:
        """A value of ``size`` bytes given as consecutive pieces, appended to the current data file."""
        if key in self.entries:
            raise ValueError(f"duplicate key {key!r}")
        if size <= self.max_inline:
            self.put(key, b"".join(pieces))
            return
        if self._fh is not None and self._size and self._size + size > self.target_file_size:
            self._close_file()
        if self._fh is None:
            (self.directory / "d").mkdir(parents=True, exist_ok=True)
            self._tmp = self.directory / "d" / f".partial-{len(self.files)}"
            self._fh = StagedFile(self._tmp, sha256=True)  # written and hashed on its own threads
            self._size = 0
        done = 0
        for piece in pieces:
            self._fh.write(piece)
            done += len(piece)
        if done != size:
            raise RuntimeError(f"internal error: value {key!r} has {done} bytes, {size} announced")
        self.entries[key] = ("file", len(self.files), self._size, size)
        self._size += size

    def _close_file(self) -> None:
        fh, self._fh = self._fh, None
        fh.close()  # the rest written, fsynced
        digest = fh.hexdigest()
        rel = f"d/{digest[:32]}"
        os.replace(self._tmp, self.directory / rel)
        self.files.append(rel)
        self.digests[rel] = digest

    def _write(self, rel: str, data: bytes) -> None:
        path = self.directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, data)
        self.digests[rel] = hashlib.sha256(data).hexdigest()

    def finish(self) -> list[str]:
        if self._fh is not None:
            self._close_file()
        keys = sorted(self.entries)
        names = sorted({self.files[self.entries[k][1]] for k in keys if self.entries[k][0] == "file"})
        index = {i: names.index(f) for i, f in enumerate(self.files) if f in names}  # equal files share a name
        body = bytearray(b"\x00")  # height 0: a leaf
        body += _data_file_table([f.encode() for f in names])
        body += _varint(len(keys))
        prefixes, suffixes = _prefix_split(keys)
        for p in prefixes:
            body += _varint(p)
        for sfx in suffixes:
            body += _varint(len(sfx))
        for sfx in suffixes:
            body += sfx
        indirect = [self.entries[k] for k in keys if self.entries[k][0] == "file"]
        for k in keys:
            e = self.entries[k]
            body += _varint(len(e[1]) if e[0] == "inline" else e[3])
        for k in keys:
            body += _varint(0 if self.entries[k][0] == "inline" else 1)
        for e in indirect:
            body += _varint(index[e[1]])
        for e in indirect:
            body += _varint(e[2])
        for k in keys:
            if self.entries[k][0] == "inline":
                body += self.entries[k][1]
        if len(body) > self.max_node_bytes:
            raise InputError(f"{self.directory}: {len(keys)} keys do not fit one OCDBT node "
                             f"({len(body)} > {self.max_node_bytes} bytes)", "write fewer arrays per checkpoint")
        node = _encode_node(_BTREE_MAGIC, bytes(body))
        node_digest = hashlib.sha256(node).hexdigest()
        node_rel = f"d/{node_digest[:32]}"
        self._write(node_rel, node)

        manifest = bytearray(bytes.fromhex(node_digest[32:64]))  # database uuid, derived from the content
        manifest += b"\x00"  # manifest kind: single
        manifest += _varint(self.max_inline) + _varint(self.max_node_bytes)
        manifest += bytes([_VERSION_TREE_ARITY_LOG2]) + _varint(0)  # no compression
        manifest += _data_file_table([node_rel.encode()])
        indirect_bytes = sum(e[3] for e in indirect)
        manifest += _varint(1)  # one version
        manifest += _varint(1) + b"\x00" + _varint(0) + _varint(0) + _varint(len(node))
        manifest += _varint(len(keys)) + _varint(len(node)) + _varint(indirect_bytes)
        manifest += (0).to_bytes(8, "little")  # commit time
        manifest += _varint(0)  # no version tree nodes
        self._write(MANIFEST, _encode_node(_MANIFEST_MAGIC, bytes(manifest)))
        return [*sorted(set(self.files)), node_rel, MANIFEST]

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.abort()
            self._fh = None
            try:
                self._tmp.unlink()
            except OSError:
                pass


class OrbaxWriter(CheckpointWriter):
    """Stream tensors into an Orbax (OCDBT) checkpoint that orbax-checkpoint restores.

    ``metadata``: ``layout`` (``item``: the item is ``directory``; ``step``: ``directory/<item>/``;
    ``root``: ``directory/<step>/<item>/`` as CheckpointManager writes), ``step`` (int; required
    for ``root``), ``item`` (default ``default``), ``zarr_format`` (2 or 3, default 2),
    ``extra_leaves`` (name -> array / number / string / None, written alongside), and optionally
    ``tree_keys`` / ``value_types`` / ``custom_metadata`` / ``sharding`` as :func:`read_orbax`
    returns them, so a checkpoint is written back with the same tree structure, leaf types and
    (for names it shares with the source) JAX shardings in ``_sharding``. Without a sharding,
    ``StandardCheckpointer().restore(path)`` returns numpy arrays for those leaves, and restoring
    them as JAX arrays needs a target tree (as after any change of model shape).
    """

    def __init__(self, directory: Path, tensors: list[OutputTensor], metadata: dict[str, Any] | None = None):
        super().__init__(directory, tensors, metadata)
        md = self.metadata
        self.layout = md.get("layout") or "item"
        self.item = md.get("item") or DEFAULT_ITEM
        self.step = md.get("step")
        self.zarr_format = int(md.get("zarr_format") or 2)
        if self.layout not in ("item", "step", "root"):
            raise InputError(f"{self.directory}: unknown Orbax layout {self.layout!r}", "use item, step or root")
        if self.zarr_format not in (2, 3):
            raise InputError(f"{self.directory}: zarr_format must be 2 or 3, not {self.zarr_format}")
        if self.step is not None and (isinstance(self.step, bool) or not isinstance(self.step, (int, np.integer))):
            raise InputError(f"{self.directory}: step must be an integer, not {self.step!r}")
        if self.layout == "root" and (self.step is None or int(self.step) < 0):
            raise InputError(f"{self.directory}: writing a CheckpointManager root needs a step >= 0",
                             "pass the training step of the output checkpoint")
        if not isinstance(self.item, str) or not self.item or "/" in self.item or self.item in (".", ".."):
            raise InputError(f"{self.directory}: invalid Orbax item name {self.item!r}")
        if self.layout == "root":
            self.step_dir: Path | None = self.directory / str(int(self.step))
            self.item_dir = self.step_dir / self.item
        elif self.layout == "step":
            self.step_dir = self.directory
            self.item_dir = self.directory / self.item
        else:
            self.step_dir = None
            self.item_dir = self.directory
        self.tree_keys: dict[str, list] = dict(md.get("tree_keys") or {})
        self.value_types: dict[str, str] = dict(md.get("value_types") or {})
        self.extra = {name: _leaf_value(name, v) for name, v in (md.get("extra_leaves") or {}).items()}

        self._leaves: dict[str, tuple[list[tuple[str, int]], dict[str, Any]]] = {}
        self._storage: dict[str, str] = {}
        for t in self.tensors:
            vt = self.value_types.get(t.name, "jax.Array")
            if vt not in ARRAY_TYPES:
                vt = "jax.Array"
            self._add_leaf(t.name, vt, tuple(t.shape))
            if t.dtype not in TORCH_TO_NUMPY:
                raise InputError(f"{self.directory}: tensor {t.name!r} has dtype {t.dtype}, which Orbax cannot store here",
                                 "convert it to a float, integer or bool dtype")
        for name, (vt, _value) in self.extra.items():
            if vt == "np.ndarray" and self.value_types.get(name) in ARRAY_TYPES:
                vt = self.value_types[name]
            shape = tuple(np.shape(_value)) if vt in ARRAY_TYPES else None
            self._add_leaf(name, vt, shape)
            self.extra[name] = (vt, _value)
        self._pos = 0
        self._db: OcdbtWriter | None = None
        self.digests: dict[str, str] = {}

    # -- tree bookkeeping
    def _add_leaf(self, name: str, value_type: str, shape: tuple[int, ...] | None) -> None:
        if name in self._leaves:
            raise InputError(f"{self.directory}: leaf {name!r} is given twice (a tensor and an extra leaf?)")
        given = self.tree_keys.get(name)
        if given:
            keys = [(str(k), int(t)) for k, t in given]
            if "/".join(k for k, _ in keys) != name:
                raise InputError(f"{self.directory}: tree keys {given!r} do not spell leaf {name!r}")
        else:
            parts = name.split("/")
            if any(not p for p in parts):
                raise InputError(f"{self.directory}: leaf name {name!r} has an empty tree key", "names are '/'-joined keys")
            keys = [(p, KEY_DICT) for p in parts]
        storage = ".".join(k for k, _ in keys)
        for other, st in self._storage.items():
            if st == storage:
                raise InputError(f"{self.directory}: leaves {other!r} and {name!r} would both be stored as {storage!r}",
                                 "tree keys must not contain '.'")
        value: dict[str, Any] = {"value_type": value_type, "skip_deserialize": value_type in EMPTY_TYPES}
        if value_type == "jax.Array" and shape is not None:
            value["write_shape"] = list(shape)
        self._leaves[name] = (keys, value)
        self._storage[name] = storage

    # -- array writing
    def _array_spec(self, storage: str, array: np.ndarray) -> dict[str, Any]:
        chunks = _chunk_shape(array.shape, array.dtype.itemsize, CHUNK_BYTES)
        if self.zarr_format == 2:
            meta = {"shape": list(array.shape), "chunks": chunks, "compressor": {"id": "zstd", "level": 1},
                    "dtype": _zarr2_dtype(array.dtype), "fill_value": None}
            driver = "zarr"
        else:
            meta = {"shape": list(array.shape),
                    "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunks}},
                    "codecs": [{"name": "sharding_indexed", "configuration": {
                        "chunk_shape": chunks,
                        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                                   {"name": "zstd", "configuration": {"level": 3}}],
                        "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
                        "index_location": "end"}}],
                    "data_type": _zarr3_dtype(array.dtype)}
            driver = "zarr3"
        return {"driver": driver, "kvstore": {"driver": "memory", "path": storage + "/"}, "metadata": meta,
                "store_data_equal_to_fill_value": True}

    def _write_array(self, name: str, array: np.ndarray) -> None:
        """Encode one array with tensorstore's zarr driver in memory, then add its keys to the database."""
        if self._db is None:
            self.item_dir.mkdir(parents=True, exist_ok=True)
            self._db = OcdbtWriter(self.item_dir)
        ctx = ts.Context({"cache_pool": {"total_bytes_limit": 0}})  # a fresh in-memory key-value store
        try:
            store = ts.open(self._array_spec(self._storage[name], array), create=True, context=ctx).result()
            # the array is not touched until the write is done: tensorstore may encode it without a copy
            store.write(array, can_reference_source_data_indefinitely=True).result()
            del store
            kv = ts.KvStore.open({"driver": "memory"}, context=ctx).result()
            for key in sorted(kv.list().result()):
                size = _value_size(kv, key)
                if size <= self._db.max_inline:
                    self._db.put(bytes(key), bytes(kv.read(key).result().value))
                else:  # streamed in pieces: the encoded chunk is never copied whole into Python
                    self._db.put_pieces(bytes(key), size, (
                        kv.read(key, byte_range=slice(pos, min(pos + VALUE_PIECE_BYTES, size))).result().value
                        for pos in range(0, size, VALUE_PIECE_BYTES)))
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - tensorstore and OS errors
            raise InputError(f"{self.item_dir}: cannot write array {name!r} ({_one_line(exc)})",
                             "check free disk space and permissions") from None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._pos >= len(self.tensors) or self.tensors[self._pos].name != name:
            expected = self.tensors[self._pos].name if self._pos < len(self.tensors) else "nothing"
            raise RuntimeError(f"internal error: got tensor {name!r}, expected {expected!r}")
        planned = self.tensors[self._pos]
        if tuple(tensor.shape) != tuple(planned.shape) or tensor.dtype != planned.dtype:
            raise InputError(f"{self.item_dir}: tensor {name!r} is {tensor.dtype}{list(tensor.shape)}, "
                             f"planned {planned.dtype}{list(planned.shape)}")
        self._write_array(name, to_numpy(tensor))
        self._pos += 1

    def finish(self) -> list[Path]:
        if self._pos != len(self.tensors):
            raise RuntimeError(f"internal error: {len(self.tensors) - self._pos} planned tensors were never written")
        strings: dict[str, str] = {}
        for name, (vt, value) in self.extra.items():
            if vt in ARRAY_TYPES:
                self._write_array(name, value)
            elif vt == "scalar":
                self._write_array(name, np.asarray(value, dtype=np.bool_ if isinstance(value, bool)
                                                    else np.int64 if isinstance(value, int) else np.float64))
            elif vt == "string":
                strings[self._storage[name]] = value
        if self._db is None:
            self.item_dir.mkdir(parents=True, exist_ok=True)
            self._db = OcdbtWriter(self.item_dir)
        try:
            self._db.finish()
        except OSError as exc:
            raise InputError(f"{self.item_dir}: cannot write the OCDBT database ({_one_line(exc)})",
                             "check free disk space and permissions") from None
        prefix = self.item_dir.relative_to(self.directory).as_posix()
        for rel, digest in self._db.digests.items():
            self.digests[rel if prefix == "." else f"{prefix}/{rel}"] = digest

        tree = {str(tuple(k for k, _ in keys)): {"key_metadata": [{"key": k, "key_type": t} for k, t in keys],
                                                   "value_metadata": value}
                for keys, value in sorted(self._leaves.values(), key=lambda kv: _sort_key(kv[0]))}
        meta = {"tree_metadata": tree, "use_ocdbt": True, "use_zarr3": self.zarr_format == 3,
                "store_array_data_equal_to_fill_value": True,
                "custom_metadata": self.metadata.get("custom_metadata")}
        self._write_small(self.item_dir / METADATA, json.dumps(meta).encode())
        if strings:
            self._write_small(self.item_dir / STRINGS, json.dumps(strings, sort_keys=True).encode())
        sharding = self.metadata.get("sharding") or {}
        shards = {base64.b64encode(self._storage[n].encode()).decode(): sharding[n]
                  for keys, value in sorted(self._leaves.values(), key=lambda kv: _sort_key(kv[0]))
                  for n in ["/".join(k for k, _ in keys)]
                  if value["value_type"] == "jax.Array" and isinstance(sharding.get(n), str)}
        if shards:
            self._write_small(self.item_dir / SHARDING, json.dumps(shards, separators=(",", ":")).encode())
        handler = self._handler()
        step_meta = {"item_handlers": handler if self.step_dir is None else {self.item: handler},
                     "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": None,
                     "commit_timestamp_nsecs": None, "custom_metadata": {}}
        self._write_small((self.step_dir or self.item_dir) / CHECKPOINT_METADATA, json.dumps(step_meta).encode())

        files = sorted(Path(rel) for rel in self.digests)
        for d in sorted({(self.directory / f).parent for f in files} | {self.directory},
                        key=lambda q: len(q.parts), reverse=True):
            fsync_path(d)
        return files

    def _handler(self) -> str:
        """The source's checkpoint handler for its item (as read), else StandardCheckpointHandler."""
        handlers = (self.metadata.get("checkpoint_metadata") or {}).get("item_handlers")
        if isinstance(handlers, dict):
            handlers = handlers.get(self.metadata.get("item") or DEFAULT_ITEM)
        if not (isinstance(handlers, str) and handlers.startswith("orbax.checkpoint.") and handlers.endswith("Handler")):
            return STANDARD_HANDLER
        if self.layout == "root" and ".v1." in handlers:  # CheckpointManager cannot resolve v1 handlers alone
            return STANDARD_HANDLER
        return handlers

    def _write_small(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, data)
        self.digests[path.relative_to(self.directory).as_posix()] = hashlib.sha256(data).hexdigest()

    def abort(self) -> None:
        """Stop writing (closes the open data file); the caller removes the (temporary) directory."""
        if self._db is not None:
            self._db.abort()
            self._db = None
