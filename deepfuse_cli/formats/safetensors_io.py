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
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import InputError
from ..ir import TensorRef, dtype_size
from .base import OutputTensor

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


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """Open ``path`` and return its tensors (lazy) and its ``__metadata__``.

    The header is parsed and validated by the safetensors library; nothing large is
    allocated. Each TensorRef's loader reopens the file and reads that one tensor.
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
    with open(path, "rb") as fh:
        (hlen,) = struct.unpack("<Q", fh.read(8))
    if hlen > min(HEADER_LIMIT, size - 8):
        raise InputError(
            f"{path}: corrupt safetensors header (declares {hlen} header bytes, file has {size - 8} after the length)",
            "the file is truncated or not a safetensors file; re-download or re-save it",
        )
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
    """Writes one safetensors file: header first (from the planned tensors), then data in order."""

    def __init__(self, path: Path, tensors: list[OutputTensor], metadata: dict[str, str] | None = None,
                 wrap=None):
        self.path = Path(path)
        self.tensors = list(tensors)
        self._next = 0
        header, _ = build_header(self.tensors, metadata)
        self._raw = open(self.path, "wb")
        self.fh = wrap(self._raw) if wrap else self._raw
        self.fh.write(header)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.tensors[self._next]
        if name != expected.name or tuple(tensor.shape) != expected.shape or tensor.dtype != expected.dtype:
            raise RuntimeError(
                f"internal error: writer expected {expected.name} {expected.shape} {expected.dtype}, "
                f"got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        self.fh.write(tensor_bytes(tensor))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.tensors):
            missing = self.tensors[self._next].name
            self._raw.close()
            raise RuntimeError(f"internal error: {self.path} closed before tensor {missing} was written")
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()

    def abort(self) -> None:
        self._raw.close()
