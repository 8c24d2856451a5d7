"""Output formats and the name/layout conversion between them.

A plan is computed in the sources' naming (the rules preset's). The output format decides the
naming the file needs: a Hugging Face directory needs transformers names, T5X and Orbax
checkpoints need T5X names. When the two differ (T5X T5 <-> transformers T5), a
:class:`Conversion` renames each tensor and transposes kernels on the way to the writer, and
the output config is built for the target runtime (``config.json`` or ``fused.gin``).

``deepfuse convert`` is a plan over one source with every op the identity, written through
the same conversion: the same adapters without fusion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .architectures import t5x as t5x_arch
from .errors import UsageError
from .formats.base import OutputTensor
from .ir import Checkpoint

#: ``--to`` values -> output format
TO_FORMATS = {"safetensors": "hf", "hf": "hf", "t5x": "t5x", "orbax": "orbax"}
#: output format -> the naming its files use
NAMING = {"hf": "hf", "t5x": "t5x", "orbax": "t5x"}


def source_format(ck: Checkpoint) -> str:
    return ck.format if ck.format in ("t5x", "orbax") else "hf"


def resolve_output_format(to: str | None, first: Checkpoint) -> str:
    if to is None:
        return source_format(first)
    key = to.lower()
    if key not in TO_FORMATS:
        raise UsageError(f"--to {to!r}: choose one of safetensors, t5x, orbax")
    return TO_FORMATS[key]


@dataclass(frozen=True)
class Conversion:
    """Renames (and transposes) planned tensors into the output format's naming."""

    rename: dict[str, str] = field(default_factory=dict)
    transpose: frozenset[str] = frozenset()
    drop: frozenset[str] = frozenset()

    def out_name(self, name: str) -> str:
        return self.rename.get(name, name)

    def out_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(reversed(shape)) if name in self.transpose else tuple(shape)

    def apply(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
        if name in self.transpose:
            tensor = tensor.t().contiguous()
        return self.out_name(name), tensor

    def outputs(self, entries) -> list[OutputTensor]:
        return [OutputTensor(self.out_name(e.name), self.out_shape(e.name, e.shape), e.dtype)
                for e in entries if e.name not in self.drop]

    def to_json(self) -> dict[str, Any]:
        return {"renamed": len(self.rename), "transposed": sorted(self.transpose), "dropped": sorted(self.drop)}


IDENTITY = Conversion()


def conversion_for(architecture: str | None, names: list[str], output_format: str) -> Conversion:
    """How tensors named by ``architecture``'s preset reach ``output_format``'s files."""
    target = NAMING[output_format]
    if architecture == "t5x":
        if target == "t5x":
            return IDENTITY
        return _table_conversion(names, t5x_arch.t5x_to_hf_name, "T5X", drop=())
    if target == "hf":
        return IDENTITY
    if architecture == "t5":
        return _table_conversion(names, t5x_arch.hf_to_t5x_name, "transformers T5", drop=t5x_arch.HF_EMBEDDING_COPIES)
    raise UsageError(f"--to {output_format}: only T5 models convert to T5X/Orbax (this is a {architecture or 'unknown'} model)",
                     "write a Hugging Face directory (the default) instead")


def _table_conversion(names: list[str], lookup, what: str, drop) -> Conversion:
    rename: dict[str, str] = {}
    transpose: set[str] = set()
    dropped = {n for n in names if n in drop}
    for n in names:
        if n in dropped:
            continue
        hit = lookup(n)
        if hit is None:
            raise UsageError(f"tensor {n!r} has no counterpart outside {what} naming",
                             "convert only standard T5 checkpoints; other trees stay in their own format")
        rename[n], tr = hit
        if tr:
            transpose.add(n)
    return Conversion(rename=rename, transpose=frozenset(transpose), drop=frozenset(dropped))


def output_config(architecture: str | None, plan_config: dict | None, output_format: str,
                  origin: str = "the model") -> dict | None:
    """config.json for an HF output; for T5X/Orbax outputs the T5X dimensions (written as gin)."""
    if plan_config is None:
        return None
    if output_format == "hf":
        if architecture == "t5x":
            out = t5x_arch.hf_config(plan_config)
            for key in ("deepfuse_norm_mode", "deepfuse_norm_groups"):
                if key in plan_config:
                    out[key] = plan_config[key]
            return out
        return plan_config
    if architecture == "t5":
        return t5x_arch.config_from_hf(plan_config, origin)
    return plan_config


def writer_metadata(output_format: str, first: Checkpoint) -> dict:
    """Layout facts for the T5X/Orbax writers, mirroring the first source where it is of that format."""
    import numpy as np

    same = first.format == output_format
    meta = first.metadata if same else {}
    step = first.metadata.get("step")
    if output_format == "t5x":
        out = {"step": int(step or 0), "layout": meta.get("layout", "root")}
        if meta.get("compression"):
            out["compression"] = meta["compression"]
        return out
    out: dict[str, Any] = {"step": None if step is None else int(step), "layout": meta.get("layout", "item"),
                           "item": meta.get("item") or "default", "zarr_format": meta.get("zarr_format", 2)}
    if same:  # the same tree structure, leaf types and shardings as the source
        for key in ("tree_keys", "value_types", "custom_metadata", "sharding"):
            if meta.get(key) is not None:
                out[key] = meta[key]
        out["extra_leaves"] = dict(meta.get("other_leaves") or {})
    elif step is not None and first.format == "t5x":  # a T5X train state keeps its step
        out["extra_leaves"] = {"state/step": np.int32(step)}
    return out
