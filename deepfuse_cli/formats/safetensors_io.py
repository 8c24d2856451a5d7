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

import ctypes
import errno
import fcntl
import hashlib
import json
import mmap
import os
import struct
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ..errors import InputError
from ..ir import TensorRef, dtype_size
from .base import OutputTensor, as_bytes

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
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise ValueError(f"header is not valid JSON ({exc})") from None
    except RecursionError:
        raise ValueError("header is not valid JSON (nested too deeply)") from None
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


def _writeback_starter():
    """``start(fd, offset, nbytes)``: ask the kernel to start writing a file range to disk now,
    without waiting (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``); None where unavailable.
    Writing back while later data is still being computed leaves little for the final fsync."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return lambda fd, offset, nbytes: fn(fd, offset, nbytes, 2)  # 2: SYNC_FILE_RANGE_WRITE


_start_writeback = _writeback_starter()
WRITEBACK_BYTES = 32 * 2**20  # page-cache writes: start writeback every this many bytes
DIRECT_IO = True  # write with O_DIRECT (no page cache) where the filesystem supports it
STAGE_BYTES = 8 * 2**20  # one staging buffer: a multiple of the direct-I/O alignment
STAGES = 4
_ALIGN = 4096


class StagedFile:
    """A file written front to back, durably, with an optional sha256 of its bytes.

    Written bytes are copied into a few page-aligned staging buffers; each full buffer is handed
    to a writer thread (``pwrite``, with ``O_DIRECT`` where the filesystem allows it, so the data
    goes to the disk without being copied into the page cache) and to a hashing thread, while the
    caller goes on filling the next buffer. ``close`` writes the rest, fsyncs and closes. A caller
    may reuse what it passed to ``write`` as soon as ``write`` returns.
    """

    def __init__(self, path: Path, sha256: bool = False):
        self.path = Path(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self._direct = False
        fd = None
        if DIRECT_IO and hasattr(os, "O_DIRECT"):
            try:
                fd = os.open(self.path, flags | os.O_DIRECT, 0o666)
                self._direct = True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
        self._fd = os.open(self.path, flags, 0o666) if fd is None else fd
        self._sha = hashlib.sha256() if sha256 else None
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deepfuse-write")
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deepfuse-sha256") if sha256 else None
        self._free: list[np.ndarray] = []
        self._made = 0
        self._pending: deque = deque()  # (buffer, write future, hash future), oldest first
        self._buf: np.ndarray | None = None
        self._fill = 0
        self._size = 0  # bytes handed to the writer thread
        self._synced = 0  # page-cache mode: writeback started up to here
        self._padded = False  # a direct write went past the end: truncate on close
        self._open = True

    def write(self, data) -> None:
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        pos, n = 0, view.nbytes
        while pos < n:
            if self._buf is None:
                self._buf = self._take()
            k = min(n - pos, STAGE_BYTES - self._fill)
            # numpy copies large blocks without holding the GIL: the producer thread keeps going
            self._buf[self._fill:self._fill + k] = np.frombuffer(view[pos:pos + k], dtype=np.uint8)
            self._fill += k
            pos += k
            if self._fill == STAGE_BYTES:
                self._submit()

    def _take(self) -> np.ndarray:
        if self._free:
            return self._free.pop()
        if self._made < STAGES:
            self._made += 1
            return np.frombuffer(mmap.mmap(-1, STAGE_BYTES), dtype=np.uint8)  # page-aligned
        buf, written, hashed = self._pending.popleft()
        written.result()
        if hashed is not None:
            hashed.result()
        return buf

    def _submit(self) -> None:
        buf, length = self._buf, self._fill
        self._buf, self._fill = None, 0
        view = memoryview(buf)
        hashed = self._hasher.submit(self._sha.update, view[:length]) if self._sha is not None else None
        end = length
        if self._direct and length % _ALIGN:  # only the last buffer: pad it, truncate on close
            end = length + (-length) % _ALIGN
            buf[length:end] = 0
            self._padded = True
        self._pending.append((buf, self._io.submit(self._pwrite, view[:end], self._size), hashed))
        self._size += length

    def _pwrite(self, view: memoryview, offset: int) -> None:
        while view.nbytes:
            try:
                n = os.pwrite(self._fd, view, offset)
            except OSError as exc:
                if not (self._direct and exc.errno == errno.EINVAL):
                    raise
                # the filesystem refused direct I/O after all: go through the page cache
                fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                self._direct = False
                continue
            if n <= 0:
                raise OSError(errno.EIO, "short write", str(self.path))
            view, offset = view[n:], offset + n
        if not self._direct and _start_writeback is not None and offset - self._synced >= WRITEBACK_BYTES:
            _start_writeback(self._fd, self._synced, offset - self._synced)
            self._synced = offset

    def _drain(self, raise_errors: bool = True) -> None:
        while self._pending:
            _, written, hashed = self._pending.popleft()
            for job in (written, hashed):
                if job is None:
                    continue
                try:
                    job.result()
                except BaseException:
                    if raise_errors:
                        raise

    def close(self) -> None:
        """Write what is left, wait for the threads, fsync and close."""
        try:
            if self._fill:
                self._submit()
            self._drain()
            if self._padded:
                os.ftruncate(self._fd, self._size)
            os.fsync(self._fd)
        except BaseException:
            self.abort()
            raise
        self._shutdown()

    def abort(self) -> None:
        """Stop: wait for the threads (they use the file descriptor), close without syncing."""
        if self._open:
            self._drain(raise_errors=False)
            self._shutdown()

    def _shutdown(self) -> None:
        if self._open:
            self._open = False
            self._io.shutdown()
            if self._hasher is not None:
                self._hasher.shutdown()
            os.close(self._fd)

    def hexdigest(self) -> str:
        if self._sha is None:
            raise RuntimeError("this file was written without sha256")
        if self._open:
            raise RuntimeError("hexdigest() before close()")
        return self._sha.hexdigest()


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
