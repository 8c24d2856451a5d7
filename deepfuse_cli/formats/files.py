"""Small file helpers every writer shares: durable writes, fsync of files and directories, sha256."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path

#: digests being computed ahead (``prefetch_sha256``): real path -> (stat key when started, digest)
_AHEAD: dict[str, tuple[tuple[int, ...], Future]] = {}
_AHEAD_LOCK = threading.Lock()


def write_file(path: Path, data: bytes) -> None:
    """Write and fsync a small file."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (its entries); best effort where the filesystem refuses."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if Path(path).is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256_now(path: Path) -> str:
    with open(path, "rb") as fh:
        if hasattr(hashlib, "file_digest"):  # Python >= 3.11: one reused buffer, GIL released while hashing
            return hashlib.file_digest(fh, "sha256").hexdigest()
        h = hashlib.sha256()
        buf = bytearray(2**20)
        while n := fh.readinto(buf):
            h.update(memoryview(buf)[:n])
        return h.hexdigest()


def _stat_key(path: str) -> tuple[int, ...]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def sha256_file(path: Path) -> str:
    """The sha256 of a file: the one ``prefetch_sha256`` computed, if the file has not changed since."""
    real = os.path.realpath(path)
    with _AHEAD_LOCK:
        ahead = _AHEAD.get(real)
    if ahead is not None:
        key, digest = ahead
        try:
            if key == _stat_key(real):
                return digest.result()
        except Exception:  # noqa: BLE001 - hashed again below, which reports the error
            pass
    return _sha256_now(Path(path))


def prefetch_sha256(paths: Iterable[Path]) -> None:
    """Start hashing regular files on a background thread, so that ``sha256_file`` finds them done.

    The CLI calls this first thing for the sources of a run: hashing (which releases the GIL) then
    overlaps the import of torch and the planning on the otherwise idle core. The thread is a daemon:
    a run that fails early does not wait for it. Failures are left to ``sha256_file`` to report.
    """
    todo: list[tuple[str, tuple[int, ...], Future]] = []
    with _AHEAD_LOCK:
        for p in paths:
            real = os.path.realpath(p)
            try:
                if not os.path.isfile(real):
                    continue
                key = _stat_key(real)
            except OSError:
                continue
            known = _AHEAD.get(real)
            if known is not None and known[0] == key:
                continue
            future: Future = Future()
            _AHEAD[real] = (key, future)
            todo.append((real, key, future))
    if not todo:
        return

    def run() -> None:
        for real, _key, future in todo:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(_sha256_now(Path(real)))
                except BaseException as exc:  # noqa: BLE001 - handed to whoever asks
                    future.set_exception(exc)

    threading.Thread(target=run, name="deepfuse-sha256-ahead", daemon=True).start()
