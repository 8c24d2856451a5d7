"""A file written front to back, durably: page-aligned staging buffers, ``O_DIRECT`` writes and sha256
on their own threads. Every large output file (safetensors shards, OCDBT data files) goes through it."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import mmap
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


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
