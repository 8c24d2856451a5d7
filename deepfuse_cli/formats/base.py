"""What every format adapter provides: a lazy reader and a streaming writer.

Readers return an :class:`~deepfuse_cli.ir.Checkpoint`. Writers are created with the
complete list of output tensors (known from the plan before any byte is written),
then receive each tensor exactly once, in that order, and finally ``finish()``. A tensor
arrives whole (``write``) or as consecutive pieces of its bytes (``write_chunks``: every writer
accepts it: safetensors writes the pieces as they come, T5X gathers slabs of chunk rows, the default
gathers the whole tensor).
A writer writes only inside the directory it is given (a temporary sibling of the
final output; the caller renames it into place) and fsyncs what it wrote.
No adapter knows about fusion.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


class CheckpointWriter(ABC):
    """Streaming writer: ``write`` each planned tensor in plan order, then ``finish``."""

    def __init__(self, directory: Path, tensors: list[OutputTensor], metadata: dict[str, Any] | None = None):
        self.directory = Path(directory)
        self.tensors = list(tensors)
        self.metadata = dict(metadata or {})

    @abstractmethod
    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor (must be the next one in ``self.tensors``)."""

    def write_chunks(self, name: str, chunks: Iterable[Any]) -> None:
        """Write one tensor (the next one in ``self.tensors``) given as consecutive pieces of its
        row-major bytes: CPU tensors of its dtype (e.g. row blocks) or bytes-like objects.

        A piece may be reused by its producer once the piece after the next one is requested: a
        writer must be done with piece k (written, hashed) before it asks for piece k + 2.
        This default gathers the pieces into one tensor and calls ``write``."""
        planned = self._planned(name)
        self.write(name, gather(chunks, name, planned.shape, planned.dtype))

    def _planned(self, name: str) -> OutputTensor:
        index = self.__dict__.get("_planned_index")
        if index is None:
            index = self.__dict__["_planned_index"] = {t.name: t for t in self.tensors}
        if name not in index:
            raise RuntimeError(f"internal error: {name} is not a planned output tensor")
        return index[name]

    def abort(self) -> None:
        """Stop after an error: close what is open (the caller removes the directory)."""

    @abstractmethod
    def finish(self) -> list[Path]:
        """Flush, fsync and return every file written (relative to ``directory``)."""


def gather(chunks: Iterable[Any], name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """One tensor of ``shape`` and ``dtype`` from consecutive pieces of its row-major bytes (pieces as
    ``write_chunks`` takes them), which must add up to exactly its size."""
    size = dtype.itemsize
    for s in shape:
        size *= s
    data = bytearray(size)
    pos = 0
    for chunk in chunks:
        view = as_bytes(chunk, dtype)
        if pos + view.nbytes > size:
            raise RuntimeError(f"internal error: more than the {size} bytes of {name} were given")
        data[pos:pos + view.nbytes] = view
        pos += view.nbytes
    if pos != size:
        raise RuntimeError(f"internal error: {pos} of the {size} bytes of {name} were given")
    tensor = torch.frombuffer(data, dtype=dtype) if size else torch.empty(0, dtype=dtype)
    return tensor.reshape(shape)


def as_bytes(chunk: Any, dtype: torch.dtype | None = None) -> memoryview:
    """The bytes of one piece given to ``write_chunks`` (no copy for a contiguous tensor)."""
    if isinstance(chunk, torch.Tensor):
        if dtype is not None and chunk.dtype != dtype:
            raise RuntimeError(f"internal error: a piece of dtype {chunk.dtype} for a {dtype} tensor")
        t = chunk.detach().contiguous().reshape(-1)
        return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
    return memoryview(chunk).cast("B")
