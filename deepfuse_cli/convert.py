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

from .architectures import Family
from .errors import UsageError
from .formats.base import OutputTensor
from .ir import Checkpoint
from .rules.engine import RuleSet
from .rules.schema import LAYER_TOKEN, Preset

#: ``--to`` values -> output format
TO_FORMATS = {"safetensors": "hf", "hf": "hf", "t5x": "t5x", "orbax": "orbax"}
#: output format -> the naming its files use
NAMING = {"hf": "hf", "t5x": "t5x", "orbax": "t5x"}


def source_format(ck: Checkpoint) -> str:
    return ck.format if ck.format in ("t5x", "orbax") else "hf"


def naming_of(ck: Checkpoint) -> str:
    """The tensor naming a checkpoint's files use."""
    return NAMING[source_format(ck)]


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


def conversion_for(preset: Preset, names: list[str], output_format: str) -> Conversion:
    """How tensors named in ``preset``'s naming reach ``output_format``'s files: each tensor's name
    there is its rule's column for that naming (layer number carried over), transposed where the
    column says the layout is; a column without a name (a copy of another tensor) is dropped."""
    target = NAMING[output_format]
    if target == preset.naming:
        return IDENTITY
    if target not in preset.namings:
        raise UsageError(f"--to {output_format}: the {preset.name} family has no names in the {target} naming "
                         f"(it has: {', '.join(preset.namings)})", "write a Hugging Face directory (the default) instead")
    rename: dict[str, str] = {}
    transpose: set[str] = set()
    dropped: set[str] = set()
    matches = RuleSet(preset).match_all(names, f"the {preset.name} model")
    for n in names:
        match = matches[n]
        col = match.rule.names.get(target)
        if col is None:
            raise UsageError(f"tensor {n!r} has no counterpart in the {target} naming "
                             f"(rules[{match.index}] {match.rule.pattern!r} names none)",
                             "convert only standard checkpoints of the family; other trees stay in their own format")
        if col.name is None:
            dropped.add(n)
            continue
        rename[n] = col.name.replace(LAYER_TOKEN, match.layer) if match.layer is not None else col.name
        if col.transpose:
            transpose.add(n)
    return Conversion(rename=rename, transpose=frozenset(transpose), drop=frozenset(dropped))


def output_config(family: Family, plan_config: dict | None, output_format: str, source_naming: str,
                  origin: str = "the model") -> dict | None:
    """The output's config in its naming's vocabulary: config.json for a Hugging Face output, the T5X
    dimensions (written as gin) for a T5X/Orbax one."""
    if plan_config is None:
        return None
    return family.naming_config(plan_config, NAMING[output_format], origin, source_naming)


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
