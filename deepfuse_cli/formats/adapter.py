"""What a format adapter is: everything the rest of the program needs to know about one on-disk format.

One :class:`FormatAdapter` per format family (a Hugging Face directory, a legacy T5X checkpoint, an
Orbax checkpoint) says how to recognise it, read it, write it (a streaming writer and its sidecar
files), how much memory its writer holds, and what its CLI name is. The core looks adapters up in
:mod:`.registry` and never compares format names. An output format *is* an adapter; a
:class:`~deepfuse_cli.ir.Checkpoint` records the name its reader gave it (``Checkpoint.format``),
which the registry maps back to its adapter.

This module is light (no torch, numpy or tensorstore): the CLI lists the adapters at start-up.
Adapters import their readers and writers when they are used.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..naming import Naming
from .files import write_file

if TYPE_CHECKING:
    from ..ir import Checkpoint
    from .base import CheckpointWriter, OutputTensor


@dataclass(frozen=True)
class OutputInfo:
    """What an adapter's sidecar files may say about the checkpoint just written."""

    config: dict[str, Any] | None  # the config the output carries (its naming's: config.json fields or T5X widths)
    first: Checkpoint  # the first source (its extra files, its layout)
    provenance: str  # e.g. "Deep Fusion of 2 models by deepfuse 0.5.0", for comments in sidecars
    optimizer_state: bool  # the output carries the (fused or converted) optimizer state
    #: the family's config for runtimes configured beside the checkpoint (T5X: gin text), if it has one
    config_text: str | None = None


class FormatAdapter(ABC):
    """One on-disk format family: detection, reading, writing, sidecars, memory model, CLI name.

    Class attributes say what the format is; methods do what only it knows. No adapter knows about
    fusion: writers receive planned tensors, sidecars receive the finished config.
    """

    #: the registered name: ``--to`` value, recorded as ``output_format`` in plans and manifests
    name: ClassVar[str]
    #: further ``--to`` spellings accepted for it
    aliases: ClassVar[tuple[str, ...]] = ()
    #: short display name ("T5X"), for tables, summaries and messages
    label: ClassVar[str]
    #: what it is, for ``--help`` and notes ("a Hugging Face directory")
    description: ClassVar[str]
    #: the tensor naming its files use
    naming: ClassVar[Naming]
    #: the values its reader puts in ``Checkpoint.format``
    reads: ClassVar[tuple[str, ...]]
    #: a checkpoint holds several steps (``--step`` chooses one)
    stepped: ClassVar[bool] = False
    #: tensors are decoded from a compressed copy (the memory estimate counts the copy)
    compressed: ClassVar[bool] = False
    #: its files can hold a (fused or converted) optimizer state
    carries_optimizer_state: ClassVar[bool] = False
    #: claims every path no other adapter claims (its reader then says what is missing)
    fallback: ClassVar[bool] = False
    #: its output directories carry a Hugging Face Hub model card (README.md)
    model_card: ClassVar[bool] = False

    @property
    def spellings(self) -> tuple[str, ...]:
        """Every ``--to`` value that selects this adapter."""
        return (self.name, *self.aliases)

    @abstractmethod
    def detect(self, path: Path) -> bool:
        """Whether ``path`` (which exists) holds a checkpoint of this format. Reads names and markers only."""

    @abstractmethod
    def read(self, path: Path, step: int | None = None) -> Checkpoint:
        """Open the checkpoint lazily (no tensor data is read)."""

    @abstractmethod
    def writer_metadata(self, first: Checkpoint, max_shard_size: int | str) -> dict[str, Any]:
        """The layout facts its writer takes, mirroring the first source where that is of this format
        (step, layout, compression, tree structure); ``max_shard_size`` is the user's bound on one
        file, for formats that shard."""

    @abstractmethod
    def writer(self, directory: Path, outputs: list[OutputTensor], metadata: dict[str, Any]) -> CheckpointWriter:
        """A streaming writer into ``directory`` for ``outputs`` (see :mod:`.base`)."""

    def writer_memory(self, shape: tuple[int, ...], itemsize: int, whole: bool) -> int:
        """Bytes the writer holds for one tensor beyond the row blocks it is given (the plan's
        memory estimate). ``whole``: the tensor arrives in one piece (a transposing conversion
        gathered it), not as row blocks. Default: nothing (the writer streams the blocks)."""
        return 0

    @abstractmethod
    def write_sidecars(self, directory: Path, info: OutputInfo) -> dict[str, str]:
        """Write the files that travel with the tensors (config, copied extras) into ``directory``;
        return each one's name (relative to ``directory``) -> sha256."""

    def summary(self, files: dict[str, str]) -> str:
        """How the written files are described in the CLI's closing line."""
        return f"a {self.label} checkpoint ({len(files)} files)"

    def runtime_loadable(self, ck: Checkpoint) -> bool:
        """Whether a runtime (transformers, the MLP forward) can run ``ck``: as stored, or through
        its conversion to a Hugging Face directory. Default: yes."""
        return True

    def __repr__(self) -> str:
        return f"<format {self.name}>"


def write_sidecar(directory: Path, name: str, data: bytes) -> dict[str, str]:
    """Write one small sidecar file durably; return ``{name: sha256}``."""
    write_file(directory / name, data)
    return {name: hashlib.sha256(data).hexdigest()}
