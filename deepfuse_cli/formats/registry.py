"""The format registry: every on-disk format deepfuse reads and writes, as one adapter each.

To add a format: write its reader and writer (a module of this package), an adapter for it (a
:class:`~.adapter.FormatAdapter`), and list the adapter in :data:`ADAPTERS`. The CLI's ``--to``
choices, detection, the plan's memory model, the writer and the sidecar files follow from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UsageError
from .adapter import FormatAdapter, Naming
from .hf_adapter import HUGGING_FACE
from .jax_adapters import ORBAX, T5X_LEGACY

if TYPE_CHECKING:
    from ..ir import Checkpoint

#: Every format, in the order the CLI lists them. Detection asks them in this order, except that a
#: fallback adapter (Hugging Face: its reader says what a path lacks) is asked last. Legacy T5X comes
#: before Orbax: its step directories are unambiguous.
ADAPTERS: tuple[FormatAdapter, ...] = (HUGGING_FACE, T5X_LEGACY, ORBAX)

_BY_SPELLING = {s: a for a in ADAPTERS for s in a.spellings}
_BY_READ = {f: a for a in ADAPTERS for f in a.reads}
__all__ = ["ADAPTERS", "HUGGING_FACE", "FormatAdapter", "Naming", "detect", "for_checkpoint", "get", "labels",
           "output_for", "spellings"]


def spellings() -> list[str]:
    """Every accepted ``--to`` value, adapter by adapter (the registered name, then its aliases)."""
    return list(_BY_SPELLING)


def get(name: str) -> FormatAdapter:
    """The adapter a ``--to`` value (or a recorded ``output_format``) names; any case, any alias."""
    adapter = _BY_SPELLING.get(name.lower())
    if adapter is None:
        raise UsageError(f"--to {name!r}: choose one of {', '.join(spellings())}")
    return adapter


def for_checkpoint(ck: Checkpoint) -> FormatAdapter:
    """The adapter whose reader produced ``ck``."""
    adapter = _BY_READ.get(ck.format)
    if adapter is None:  # only a reader outside this registry could produce one
        raise RuntimeError(f"internal error: no format adapter reads {ck.format!r} checkpoints")
    return adapter


def output_for(to: str | None, first: Checkpoint) -> FormatAdapter:
    """The output format: the one ``to`` names, else the first source's own."""
    return for_checkpoint(first) if to is None else get(to)


def detect(path: Path) -> FormatAdapter:
    """The adapter that claims ``path`` (which exists): specific adapters first, then the fallback."""
    for adapter in sorted(ADAPTERS, key=lambda a: a.fallback):
        if adapter.detect(path):
            return adapter
    raise RuntimeError("internal error: no fallback format adapter")  # unreachable: Hugging Face claims any path


def labels(adapters: list[FormatAdapter] | tuple[FormatAdapter, ...]) -> str:
    """Display names joined for a message: ``T5X/Orbax``."""
    return "/".join(a.label for a in adapters)


def naming_of(ck: Checkpoint) -> str:
    """The tensor naming a checkpoint's files use (its format adapter's)."""
    return for_checkpoint(ck).naming.value
