"""The JAX train-state formats: legacy T5X (:mod:`.t5x`) and Orbax (:mod:`.orbax`).

Both hold the parameters under T5X names (and possibly the optimizer state), at a training step,
as compressed zarr arrays; neither carries a model config, so a ``fused.gin`` beside the output
gives T5X the new widths.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .adapter import FormatAdapter, Naming, OutputInfo, write_sidecar

if TYPE_CHECKING:
    from ..ir import Checkpoint
    from .base import CheckpointWriter, OutputTensor

GIN_NAME = "fused.gin"


class _TrainStateAdapter(FormatAdapter):
    """What legacy T5X and Orbax share: T5X naming, steps, compressed arrays, optimizer state, gin."""

    naming: ClassVar[Naming] = Naming.T5X
    stepped: ClassVar[bool] = True
    compressed: ClassVar[bool] = True
    carries_optimizer_state: ClassVar[bool] = True

    def _layout_source(self, first: Checkpoint) -> dict[str, Any]:
        """The first source's format facts when it is of this format (then the output mirrors it)."""
        return first.metadata if first.format in self.reads else {}

    def write_sidecars(self, directory: Path, info: OutputInfo) -> dict[str, str]:
        """``fused.gin``: the family's gin overrides for the new widths (T5: T5X's T5 network, and,
        when the optimizer state was dropped, how to restore without it)."""
        if info.config_text is None:
            return {}
        return write_sidecar(directory, GIN_NAME, info.config_text.encode())


class T5XAdapter(_TrainStateAdapter):
    """Legacy T5X checkpoints: ``checkpoint_<step>/checkpoint`` (msgpack) plus zarr array directories."""

    name: ClassVar[str] = "t5x"
    label: ClassVar[str] = "T5X"
    description: ClassVar[str] = "a legacy T5X checkpoint"
    reads: ClassVar[tuple[str, ...]] = ("t5x",)

    def detect(self, path: Path) -> bool:
        from .t5x import is_t5x_checkpoint

        return path.is_dir() and is_t5x_checkpoint(path)

    def read(self, path: Path, step: int | None = None) -> Checkpoint:
        from .t5x import read_t5x

        return read_t5x(path, step=step)

    def writer_metadata(self, first: Checkpoint, max_shard_size: int | str) -> dict[str, Any]:
        """The source's step (0 for a source without one); its layout and compression when it is T5X."""
        meta = self._layout_source(first)
        out: dict[str, Any] = {"step": int(first.metadata.get("step") or 0), "layout": meta.get("layout", "root")}
        if meta.get("compression"):
            out["compression"] = meta["compression"]
        return out

    def writer(self, directory: Path, outputs: list[OutputTensor], metadata: dict[str, Any]) -> CheckpointWriter:
        from .t5x import T5XWriter

        return T5XWriter(directory, outputs, metadata)

    def writer_memory(self, shape: tuple[int, ...], itemsize: int, whole: bool) -> int:
        """Slabs of whole chunk rows, up to ``MAX_IN_FLIGHT`` of them pending in tensorstore with as
        many encoded copies, plus the slab being gathered (none when the tensor arrives whole)."""
        from .t5x import MAX_IN_FLIGHT, block_bytes

        block = min(math.prod(shape) * itemsize, block_bytes(shape, itemsize))
        return (2 * MAX_IN_FLIGHT + (0 if whole else 1)) * block


class OrbaxAdapter(_TrainStateAdapter):
    """Orbax (OCDBT) checkpoints: an item directory, a step directory, or a CheckpointManager root."""

    name: ClassVar[str] = "orbax"
    label: ClassVar[str] = "Orbax"
    description: ClassVar[str] = "an Orbax checkpoint"
    reads: ClassVar[tuple[str, ...]] = ("orbax",)

    def detect(self, path: Path) -> bool:
        from .orbax import is_orbax_checkpoint

        return path.is_dir() and is_orbax_checkpoint(path)

    def read(self, path: Path, step: int | None = None) -> Checkpoint:
        from .orbax import read_orbax

        return read_orbax(path, step=step)

    def writer_metadata(self, first: Checkpoint, max_shard_size: int | str) -> dict[str, Any]:
        """The source's step; from an Orbax source also its layout, tree structure, leaf types and
        shardings; a train state from another format (T5X) keeps its step as a leaf."""
        import numpy as np

        meta = self._layout_source(first)
        step = first.metadata.get("step")
        out: dict[str, Any] = {"step": None if step is None else int(step), "layout": meta.get("layout", "item"),
                               "item": meta.get("item") or "default", "zarr_format": meta.get("zarr_format", 2)}
        if first.format in self.reads:  # the same tree structure, leaf types and shardings as the source
            for key in ("tree_keys", "value_types", "custom_metadata", "sharding"):
                if meta.get(key) is not None:
                    out[key] = meta[key]
            out["extra_leaves"] = dict(meta.get("other_leaves") or {})
        elif step is not None and first.format in T5XAdapter.reads:
            out["extra_leaves"] = {"state/step": np.int32(step)}
        return out

    def writer(self, directory: Path, outputs: list[OutputTensor], metadata: dict[str, Any]) -> CheckpointWriter:
        from .orbax import OrbaxWriter

        return OrbaxWriter(directory, outputs, metadata)

    def writer_memory(self, shape: tuple[int, ...], itemsize: int, whole: bool) -> int:
        """The fused tensor gathered (unless it arrives whole) and its encoded chunk (up to its size,
        plus 1/128) next to it, and one piece of the encoded value being copied out of tensorstore."""
        from .orbax import VALUE_PIECE_BYTES

        nbytes = math.prod(shape) * itemsize
        return (0 if whole else nbytes) + nbytes + nbytes // 128 + VALUE_PIECE_BYTES


T5X_LEGACY = T5XAdapter()
ORBAX = OrbaxAdapter()
