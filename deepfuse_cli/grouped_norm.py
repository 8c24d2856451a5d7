"""Fusion-property norms for Hugging Face models (DESIGN section 3, paper section 3.2).

A model fused with ``--norm prop`` records its per-source widths in ``config.json``
(``deepfuse_norm_groups``). Its norms must normalise each source's slice of the hidden state
separately. :func:`apply_grouped_norms` swaps every RMSNorm / T5LayerNorm / LayerNorm over the
hidden size of a loaded transformers model for a grouped one that keeps the same parameters
(same names, same tensors), so the model trains and saves as usual::

    from transformers import AutoModelForCausalLM
    from deepfuse_cli.grouped_norm import apply_grouped_norms

    model = AutoModelForCausalLM.from_pretrained("fused/")
    apply_grouped_norms(model)            # groups read from model.config

Saved again with ``save_pretrained``, the checkpoint is unchanged in layout; call
``apply_grouped_norms`` after every load.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .grouped_router import apply_grouped_routers
from .rules.schema import NormSpec

GROUPS_KEY = "deepfuse_norm_groups"


class GroupedNorm(nn.Module):
    """Normalise each group of the last axis on its own; affine parameters shared with the original.

    ``kind`` is ``"rms"`` (x / sqrt(mean(x^2) + eps), as Llama/Qwen2/Mistral/T5 norms compute it,
    in float32, cast back to the input dtype before the scale for Llama-style norms) or
    ``"layer"`` (mean-centred LayerNorm with optional bias).
    """

    def __init__(self, original: nn.Module, groups: Sequence[int], kind: str, eps: float,
                 cast_before_scale: bool = True, offset: float = 0.0):
        super().__init__()
        self.groups = [int(g) for g in groups]
        self.kind = kind
        self.eps = eps
        self.cast_before_scale = cast_before_scale
        self.offset = offset  # the scale is (offset + weight), in float32 (Gemma: 1 + w)
        self.weight = original.weight
        self.bias = getattr(original, "bias", None) if kind == "layer" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        parts = torch.split(x.to(torch.float32), self.groups, dim=-1)
        normed = []
        for p in parts:
            if self.kind == "layer":
                p = p - p.mean(-1, keepdim=True)
            normed.append(p * torch.rsqrt(p.pow(2).mean(-1, keepdim=True) + self.eps))
        y = torch.cat(normed, dim=-1)
        if self.offset:
            return (y * (self.offset + self.weight.float())).to(dtype)
        if self.kind == "layer":
            y = y.to(dtype) * self.weight
            return y + self.bias if self.bias is not None else y
        if self.cast_before_scale:
            return self.weight * y.to(dtype)
        y = self.weight * y  # T5: scale in float32 then cast to the weight dtype for half weights
        return y.to(self.weight.dtype) if self.weight.dtype in (torch.float16, torch.bfloat16) else y

    def extra_repr(self) -> str:
        return f"groups={self.groups}, kind={self.kind}, eps={self.eps}" + (f", offset={self.offset}" if self.offset else "")


#: Norm modules of models whose family is not known (a user's rules file): the common ones.
GENERIC_NORMS = [NormSpec(module="LayerNorm", kind="layer", eps="eps"),
                 NormSpec(module="T5LayerNorm", kind="rms", eps="variance_epsilon", scale_in_fp32=True),
                 NormSpec(module="*RMSNorm", kind="rms", eps="variance_epsilon|eps")]


def norm_specs(model: nn.Module) -> list[NormSpec]:
    """The norm modules of ``model``'s family (from its config's model_type), else the common ones."""
    from .errors import DeepfuseError
    from .rules.engine import preset_for_config

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        preset = preset_for_config({"model_type": model_type}, type(model).__name__) if model_type else None
    except DeepfuseError:
        preset = None
    return preset.norms if preset is not None and preset.norms else GENERIC_NORMS


def _matches(spec: NormSpec, cls_name: str) -> bool:
    if spec.module.startswith("*"):
        return cls_name.endswith(spec.module[1:])
    return cls_name == spec.module


def _grouped(module: nn.Module, groups: Sequence[int], specs: Sequence[NormSpec]) -> GroupedNorm | None:
    width = sum(groups)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.numel() != width:
        return None
    name = type(module).__name__
    spec = next((s for s in specs if _matches(s, name)), None)
    if spec is None:
        return None
    eps = next((getattr(module, a) for a in spec.eps.split("|") if getattr(module, a, None) is not None), None)
    if eps is None:
        return None
    return GroupedNorm(module, groups, spec.kind, eps, cast_before_scale=not spec.scale_in_fp32, offset=spec.offset)


def apply_grouped_norms(model: nn.Module, groups: Sequence[int] | None = None, *, routers: bool = True) -> int:
    """Replace every hidden-size norm in ``model`` by a grouped one; returns how many modules were replaced.

    ``groups`` defaults to ``model.config.deepfuse_norm_groups``. Raises ValueError if there are
    no groups or no norm matched (a model that was not fused with ``--norm prop``). A fused
    mixture-of-experts model also gets grouped routers (each source's top-k among its own experts,
    ``grouped_router``), unless ``routers`` is False (the stock routing, e.g. to measure it).
    """
    if groups is None:
        config = getattr(model, "config", None)
        groups = getattr(config, GROUPS_KEY, None) if config is not None else None
        if groups is None and config is not None and hasattr(config, "to_dict"):
            groups = config.to_dict().get(GROUPS_KEY)
    if not groups:
        raise ValueError(f"no norm groups: pass groups=[d1, d2, ...] or load a model whose config has {GROUPS_KEY}")
    replaced = 0
    specs = norm_specs(model)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            new = _grouped(child, groups, specs)
            if new is not None:
                setattr(parent, child_name, new)
                replaced += 1
    if replaced == 0:
        raise ValueError(f"no norm over the hidden size {sum(groups)} was found in {type(model).__name__}")
    if routers:
        replaced += apply_grouped_routers(model)
    return replaced
