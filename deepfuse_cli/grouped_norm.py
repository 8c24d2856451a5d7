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

GROUPS_KEY = "deepfuse_norm_groups"


class GroupedNorm(nn.Module):
    """Normalise each group of the last axis on its own; affine parameters shared with the original.

    ``kind`` is ``"rms"`` (x / sqrt(mean(x^2) + eps), as Llama/Qwen2/Mistral/T5 norms compute it,
    in float32, cast back to the input dtype before the scale for Llama-style norms) or
    ``"layer"`` (mean-centred LayerNorm with optional bias).
    """

    def __init__(self, original: nn.Module, groups: Sequence[int], kind: str, eps: float,
                 cast_before_scale: bool = True):
        super().__init__()
        self.groups = [int(g) for g in groups]
        self.kind = kind
        self.eps = eps
        self.cast_before_scale = cast_before_scale
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
        if self.kind == "layer":
            y = y.to(dtype) * self.weight
            return y + self.bias if self.bias is not None else y
        if self.cast_before_scale:
            return self.weight * y.to(dtype)
        y = self.weight * y  # T5: scale in float32 then cast to the weight dtype for half weights
        return y.to(self.weight.dtype) if self.weight.dtype in (torch.float16, torch.bfloat16) else y

    def extra_repr(self) -> str:
        return f"groups={self.groups}, kind={self.kind}, eps={self.eps}"


def _grouped(module: nn.Module, groups: Sequence[int]) -> GroupedNorm | None:
    width = sum(groups)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.numel() != width:
        return None
    name = type(module).__name__
    if isinstance(module, nn.LayerNorm):
        return GroupedNorm(module, groups, "layer", module.eps)
    if name == "T5LayerNorm":
        return GroupedNorm(module, groups, "rms", module.variance_epsilon, cast_before_scale=False)
    if name.endswith("RMSNorm"):
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if eps is None:
            return None
        return GroupedNorm(module, groups, "rms", eps)
    return None


def apply_grouped_norms(model: nn.Module, groups: Sequence[int] | None = None) -> int:
    """Replace every hidden-size norm in ``model`` by a grouped one; returns how many were replaced.

    ``groups`` defaults to ``model.config.deepfuse_norm_groups``. Raises ValueError if there are
    no groups or no norm matched (a model that was not fused with ``--norm prop``).
    """
    if groups is None:
        config = getattr(model, "config", None)
        groups = getattr(config, GROUPS_KEY, None) if config is not None else None
        if groups is None and config is not None and hasattr(config, "to_dict"):
            groups = config.to_dict().get(GROUPS_KEY)
    if not groups:
        raise ValueError(f"no norm groups: pass groups=[d1, d2, ...] or load a model whose config has {GROUPS_KEY}")
    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            new = _grouped(child, groups)
            if new is not None:
                setattr(parent, child_name, new)
                replaced += 1
    if replaced == 0:
        raise ValueError(f"no norm over the hidden size {sum(groups)} was found in {type(model).__name__}")
    return replaced
