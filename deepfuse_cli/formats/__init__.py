"""Format adapters: detect what a path holds and read it into the neutral IR.

Each on-disk format is one adapter in :mod:`.registry`. Readers, writers (and torch) are imported
when a checkpoint is opened or written, so that the registry and the light helpers of this package
(``files``, ``hf_layout``) can be used at start-up without them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError
from . import registry

if TYPE_CHECKING:
    from ..ir import Checkpoint


def open_checkpoint(path: str | Path, step: int | None = None) -> Checkpoint:
    """Open any supported checkpoint lazily (no tensor data is read): the first adapter that
    claims the path (in the registry's detection order) reads it."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or directory")
    adapter = registry.detect(p)
    if step is not None and not adapter.stepped:
        stepped = [a for a in registry.ADAPTERS if a.stepped]
        raise InputError(f"{p}: --step applies to {registry.labels(stepped)} checkpoints only")
    return adapter.read(p, step)
