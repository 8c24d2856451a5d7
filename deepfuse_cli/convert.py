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

from .architectures import t5x as t5x_arch
from .errors import UsageError
from .formats.adapter import FormatAdapter, Naming
from .formats.base import OutputTensor
from .formats.registry import ADAPTERS, labels


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


def conversion_for(architecture: str | None, names: list[str], output: FormatAdapter) -> Conversion:
    """How tensors named by ``architecture``'s preset reach ``output``'s files."""
    source = Naming.T5X if architecture == "t5x" else Naming.HF  # the preset's naming (family knowledge)
    if source is output.naming:
        return IDENTITY
    if source is Naming.T5X:
        return _table_conversion(names, t5x_arch.t5x_to_hf_name, "T5X", drop=())
    if architecture == "t5":
        return _table_conversion(names, t5x_arch.hf_to_t5x_name, "transformers T5", drop=t5x_arch.HF_EMBEDDING_COPIES)
    targets = labels([a for a in ADAPTERS if a.naming is output.naming])
    raise UsageError(f"--to {output.name}: only T5 models convert to {targets} (this is a {architecture or 'unknown'} model)",
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


def output_config(architecture: str | None, plan_config: dict | None, output: FormatAdapter,
                  origin: str = "the model") -> dict | None:
    """The config the output carries, for the runtime of its naming: config.json fields for a
    Hugging Face naming, the T5X dimensions (written as gin) for a T5X one."""
    if plan_config is None:
        return None
    if output.naming is Naming.HF:
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
