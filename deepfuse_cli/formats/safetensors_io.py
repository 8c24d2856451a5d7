"""safetensors files: lazy reader (one tensor at a time) and a streaming writer.

Reading goes through the ``safetensors`` library (``safe_open``), which validates the
header (offsets in bounds, no overlap, sizes matching shape x dtype) before anything is
mapped. Writing does not use ``save_file``: that builds the whole file in memory. Since the
plan knows every output shape and dtype before any data exists, the writer emits the
header first and then streams each tensor's bytes straight to the file, producing the
layout the safetensors specification defines (8-byte little-endian header length, JSON
header padded with spaces to a multiple of 8, then the data buffer).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import InputError
from .. import untrusted
from ..ir import TensorRef, dtype_size
from .base import OutputTensor, as_bytes
from .staged_file import StagedFile

# safetensors dtype names <-> torch dtypes
ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_ST = {v: k for k, v in ST_TO_TORCH.items()}

HEADER_LIMIT = 100_000_000  # the safetensors library refuses larger headers too


def _describe(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"name {key!r} appears twice")
        out[key] = value
    return out


def _show(value: object, limit: int = 80) -> str:
    """A JSON value as one short line, for messages."""
    try:
        text = json.dumps(value)
    except (ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate_header(raw: bytes, data_len: int) -> dict[str, dict]:
    """Check a safetensors JSON header against the spec and the data it describes.

    ``raw``: the header bytes (after the 8-byte length); ``data_len``: the bytes that follow it.
    Returns ``{name: {"dtype", "shape", "data_offsets"}}`` (``__metadata__`` included, str -> str).
    Raises ValueError naming the first problem: not UTF-8 / JSON, duplicate names, unknown or
    unsupported dtype, bad shape, offsets out of bounds, overlapping, leaving gaps, or not
    matching shape x dtype. Pure: reads nothing, allocates nothing proportional to the data.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"header is not valid UTF-8 (byte {exc.start})") from None
    try:
        header = untrusted.loads(text, object_pairs_hook=_no_duplicates)
    except untrusted.InvalidJSON as exc:
        raise ValueError(f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"header is a JSON {type(header).__name__}, not an object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError("__metadata__ must map strings to strings")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"tensor {name!r}: expected exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in ST_TO_TORCH:
            raise ValueError(f"tensor {name!r} has unknown or unsupported dtype {_show(dtype, 40)} "
                             f"(supported: {', '.join(ST_TO_TORCH)})")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"tensor {name!r}: shape {_show(shape)} is not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"tensor {name!r}: data_offsets {_show(offsets)} are not [begin, end] with begin <= end")
        numel = 1
        for d in shape:
            numel *= d
        need = numel * dtype_size(ST_TO_TORCH[dtype])
        if offsets[1] > data_len:
            raise ValueError(f"tensor {name!r}: data_offsets {offsets} extend past the end of the data "
                             f"({data_len} bytes; the file is truncated or the header lies)")
        if offsets[1] - offsets[0] != need:
            raise ValueError(f"tensor {name!r}: shape {shape} of {dtype} needs {need} bytes, "
                             f"data_offsets {offsets} span {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    pos, prev = 0, None
    for begin, end, name in spans:
        if begin < pos:
            raise ValueError(f"tensor {name!r}: data_offsets [{begin}, {end}] overlap tensor {prev!r}")
        if begin > pos:
            raise ValueError(f"tensor {name!r}: data_offsets [{begin}, {end}] leave a gap after byte {pos}")
        pos, prev = end, name
    if pos != data_len:
        raise ValueError(f"the tensors cover {pos} data bytes but the file holds {data_len} (truncated or padded)")
    return header


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """Open ``path`` and return its tensors (lazy) and its ``__metadata__``.

    The header is read (at most ``HEADER_LIMIT`` bytes, never more than the file holds) and
    validated against the spec and the file size by :func:`validate_header`, then again by the
    safetensors library; nothing large is allocated. Each TensorRef's loader reopens the file
    and reads that one tensor.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputError(f"{path}: cannot read file ({exc.strerror})") from None
    if size < 8:
        raise InputError(
            f"{path}: not a safetensors file ({size} bytes; a safetensors file starts with an 8-byte header length)",
            "check the path, or re-save the checkpoint with save_pretrained",
        )
    try:
        with open(path, "rb") as fh:
            (hlen,) = struct.unpack("<Q", fh.read(8))
            raw = fh.read(hlen) if hlen <= min(HEADER_LIMIT, size - 8) else b""
    except OSError as exc:
        raise InputError(f"{path}: cannot read file ({exc.strerror})", "check the file's permissions") from None
    if hlen > min(HEADER_LIMIT, size - 8):
        what = (f"declares a {hlen}-byte header, over the {HEADER_LIMIT}-byte limit" if hlen <= size - 8 else
                f"declares {hlen} header bytes, file has {size - 8} after the length")
        raise InputError(
            f"{path}: corrupt safetensors header ({what})",
            "the file is truncated or not a safetensors file; re-download or re-save it",
        )
    try:
        validate_header(raw, size - 8 - hlen)
    except ValueError as exc:
        raise InputError(f"{path}: invalid safetensors file: {exc}",
                         "the file is corrupt or truncated; re-download or re-save it") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            refs: dict[str, TensorRef] = {}
            for name in f.keys():
                sl = f.get_slice(name)
                st_dtype = sl.get_dtype()
                if st_dtype not in ST_TO_TORCH:
                    raise InputError(f"{path}: tensor {name!r} has unsupported dtype {st_dtype}")
                refs[name] = TensorRef(
                    name=name,
                    shape=tuple(int(s) for s in sl.get_shape()),
                    dtype=ST_TO_TORCH[st_dtype],
                    loader=_loader(path, name),
                    source=str(path),
                )
    except InputError:
        raise
    except Exception as exc:  # the library's SafetensorError and friends
        raise InputError(
            f"{path}: invalid safetensors file: {_describe(exc)}",
            "the file is corrupt or truncated; re-download or re-save it",
        ) from None
    return refs, dict(metadata)


def _loader(path: Path, name: str):
    def load() -> torch.Tensor:
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(name)
        except Exception as exc:
            raise InputError(f"{path}: cannot read tensor {name!r}: {_describe(exc)}") from None

    return load


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    t = tensor.detach().contiguous()
    if t.dim() == 0:
        t = t.reshape(1)
    return memoryview(t.view(-1).view(torch.uint8).numpy())


def build_header(tensors: list[OutputTensor], metadata: dict[str, str] | None) -> tuple[bytes, list[int]]:
    """The header bytes (length prefix included) and each tensor's data offset, in order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offsets = []
    pos = 0
    for t in tensors:
        n = 1
        for s in t.shape:
            n *= s
        nbytes = n * dtype_size(t.dtype)
        header[t.name] = {"dtype": TORCH_TO_ST[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + nbytes]}
        offsets.append(pos)
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


class SafetensorsFileWriter:
    """Writes one safetensors file: header first (from the planned tensors), then data in order.

    A tensor comes whole (``write``) or as consecutive pieces of its bytes (``write_chunks``, e.g.
    row blocks): pieces go straight to the file, the tensor is never assembled. With ``sha256``
    the file's digest is computed while writing (``hexdigest()`` after ``close()``)."""

    def __init__(self, path: Path, tensors: list[OutputTensor], metadata: dict[str, str] | None = None,
                 sha256: bool = False):
        self.path = Path(path)
        self.tensors = list(tensors)
        self._next = 0
        header, _ = build_header(self.tensors, metadata)
        self.fh = StagedFile(self.path, sha256=sha256)
        self._emit(memoryview(header))

    def _emit(self, data: memoryview) -> None:
        self.fh.write(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.tensors[self._next]
        if name != expected.name or tuple(tensor.shape) != expected.shape or tensor.dtype != expected.dtype:
            raise RuntimeError(
                f"internal error: writer expected {expected.name} {expected.shape} {expected.dtype}, "
                f"got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        self._emit(tensor_bytes(tensor))
        self._next += 1

    def write_chunks(self, name: str, chunks: Iterable) -> None:
        """The next tensor as consecutive pieces of its row-major bytes (tensors of its dtype or
        bytes-like); each piece is written (and hashed) as it comes."""
        expected = self.tensors[self._next]
        if name != expected.name:
            raise RuntimeError(f"internal error: writer expected {expected.name}, got {name}")
        size = dtype_size(expected.dtype)
        for s in expected.shape:
            size *= s
        done = 0
        for chunk in chunks:
            data = as_bytes(chunk, expected.dtype)
            if done + data.nbytes > size:
                raise RuntimeError(f"internal error: more than the {size} bytes of {name} were given")
            self._emit(data)
            done += data.nbytes
        if done != size:
            raise RuntimeError(f"internal error: {done} of the {size} bytes of {name} were given")
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.tensors):
            missing = self.tensors[self._next].name
            self.fh.abort()
            raise RuntimeError(f"internal error: {self.path} closed before tensor {missing} was written")
        self.fh.close()

    def abort(self) -> None:
        self.fh.abort()

    def hexdigest(self) -> str:
        return self.fh.hexdigest()
