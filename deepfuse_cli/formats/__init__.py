"""Format adapters: detect what a path holds and read it into the neutral IR.

Adapters (and torch) are imported when a checkpoint is opened, so that light helpers of this
package (``files``, ``hf_layout``) can be used at start-up without them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError

if TYPE_CHECKING:
    from ..ir import Checkpoint


def open_checkpoint(path: str | Path, step: int | None = None) -> Checkpoint:
    """Open any supported checkpoint lazily (no tensor data is read)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or directory")
    if p.is_dir():
        from . import orbax, t5x

        if t5x.is_t5x_checkpoint(p):  # legacy T5X first: its step directories are unambiguous
            return _with_t5x_config(t5x.read_t5x(p, step=step))
        if orbax.is_orbax_checkpoint(p):
            return _with_t5x_config(orbax.read_orbax(p, step=step))
    if step is not None:
        raise InputError(f"{p}: --step applies to T5X/Orbax checkpoints only")
    from .hf import read_hf

    return read_hf(p)


def _with_t5x_config(ck: Checkpoint) -> Checkpoint:
    """T5X/Orbax checkpoints carry no config: infer a T5 one from the shapes (None for other trees)."""
    from ..architectures.t5x import infer_config

    if ck.config is None:
        ck.config = infer_config({n: r.shape for n, r in ck.tensors.items()}, str(ck.path))
    return ck
