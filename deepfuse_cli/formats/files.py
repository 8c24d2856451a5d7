"""Small file helpers every writer shares: durable writes, fsync of files and directories, sha256."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(16 * 2**20):
            h.update(chunk)
    return h.hexdigest()
