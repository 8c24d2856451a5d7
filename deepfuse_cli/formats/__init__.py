"""Format adapters: detect what a path holds and read it into the neutral IR."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..ir import Checkpoint
from .hf import read_hf


def open_checkpoint(path: str | Path, step: int | None = None) -> Checkpoint:
    """Open any supported checkpoint lazily (no tensor data is read)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or directory")
    if p.is_dir():
        try:
            from . import orbax, t5x
        except ImportError:  # adapters not available
            t5x = orbax = None  # type: ignore[assignment]
        if t5x is not None and t5x.is_t5x_checkpoint(p):
            return t5x.read_t5x(p, step=step)
        if orbax is not None and orbax.is_orbax_checkpoint(p):
            return orbax.read_orbax(p, step=step)
    if step is not None:
        raise InputError(f"{p}: --step applies to T5X/Orbax checkpoints only")
    return read_hf(p)
