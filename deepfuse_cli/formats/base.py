"""What every format adapter provides: a lazy reader and a streaming writer.

Readers return an :class:`~deepfuse_cli.ir.Checkpoint`. Writers are created with the
complete list of output tensors (known from the plan before any byte is written),
then receive each tensor exactly once, in that order, and finally ``finish()``.
A writer writes only inside the directory it is given (a temporary sibling of the
final output; the caller renames it into place) and fsyncs what it wrote.
No adapter knows about fusion.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
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

    @abstractmethod
    def finish(self) -> list[Path]:
        """Flush, fsync and return every file written (relative to ``directory``)."""
