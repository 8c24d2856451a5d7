"""The neutral checkpoint: the only thing that crosses from formats to the rest.

A reader turns an on-disk checkpoint into a :class:`Checkpoint`: ordered tensor names,
each a lazy :class:`TensorRef` (shape, dtype, and a way to load just that tensor),
plus the model config and format metadata. Nothing here knows about fusion.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .untrusted import resolve


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorRef:
    """One tensor of a checkpoint, not yet loaded."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    loader: Callable[[], torch.Tensor] = field(repr=False, compare=False)
    source: str = ""  # the file that holds it, for error messages

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_size(self.dtype)

    def load(self) -> torch.Tensor:
        """Load this tensor only (CPU). The result may share memory with a mmap: treat as read-only."""
        return self.loader()


@dataclass
class Checkpoint:
    """A checkpoint as the rest of the program sees it."""

    path: Path
    format: str  # what its reader read; formats.registry.for_checkpoint gives the adapter
    tensors: dict[str, TensorRef]
    config: dict[str, Any] | None = None  # Hugging Face config.json, when there is one
    metadata: dict[str, Any] = field(default_factory=dict)  # format-specific facts
    weight_files: list[Path] = field(default_factory=list)  # files holding the tensors (digests)
    extra_files: list[Path] = field(default_factory=list)  # tokenizer, generation config... copied as-is

    def __iter__(self) -> Iterator[TensorRef]:
        return iter(self.tensors.values())

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorRef:
        return self.tensors[name]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def weight_file_names(self) -> dict[str, Path]:
        """Each weight file under the name a manifest records it by: relative to a directory
        checkpoint, or the real path of a single-file one."""
        if self.path.is_dir():
            return {Path(f).relative_to(self.path).as_posix(): Path(f) for f in self.weight_files}
        return {str(resolve(Path(f))): Path(f) for f in self.weight_files}
