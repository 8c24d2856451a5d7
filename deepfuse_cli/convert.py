"""The name/layout conversion between the namings of output formats.

A plan is computed in the sources' naming (the rules preset's). The output format (an adapter of
:mod:`.formats.registry`) decides the naming the file needs: a Hugging Face directory needs
transformers names, T5X and Orbax checkpoints need T5X names. When the two differ (T5X T5 <->
transformers T5), a :class:`Conversion` renames each tensor and transposes kernels on the way to
the writer, and the output config is built for the target runtime (``config.json`` or ``fused.gin``).

``deepfuse convert`` is a plan over one source with every op the identity, written through
the same conversion: the same adapters without fusion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .architectures import Family
from .errors import UsageError
from .formats.adapter import FormatAdapter
from .formats.base import OutputTensor
from .rules.engine import RuleSet
from .rules.schema import LAYER_TOKEN, Preset


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


def conversion_for(preset: Preset, names: list[str], output: FormatAdapter) -> Conversion:
    """How tensors named in ``preset``'s naming reach ``output``'s files: each tensor's name there is
    its rule's column for that naming (layer number carried over), transposed where the column says
    the layout is; a column without a name (a copy of another tensor) is dropped."""
    target = output.naming.value
    if target == preset.naming:
        return IDENTITY
    if target not in preset.namings:
        raise UsageError(f"--to {output.name}: the {preset.name} family has no names in the {target} naming "
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


def output_config(family: Family, plan_config: dict | None, output: FormatAdapter, source_naming: str,
                  origin: str = "the model") -> dict | None:
    """The output's config in its naming's vocabulary: config.json fields for a Hugging Face output,
    the T5X dimensions (written as gin) for a T5X/Orbax one."""
    if plan_config is None:
        return None
    return family.naming_config(plan_config, output.naming.value, origin, source_naming)
