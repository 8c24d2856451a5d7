"""Grouped routing for fused mixture-of-experts models (the router's counterpart of grouped norms).

A fused MoE model has every source's experts, source m's E_m of them after those of the sources
before it, each reading and writing only source m's slice of the hidden state; its config records
``deepfuse_moe_experts`` (E_1..E_n) and ``deepfuse_moe_top_k`` (k_1..k_n). The stock router takes one
softmax and one top-(k_1 + ... + k_n) over all experts: exact when the sources are equal
(self-fusion), approximate otherwise. :class:`GroupedRouter` routes each source among its own
experts, as the source did: softmax over its E_m logits, its top k_m, renormalised when the family
renormalises, each weight divided by n (the experts' output kernels hold n times the source's, see
``ops.expert``). :func:`grouped_norm.apply_grouped_norms` swaps the routers in with the norms.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

MOE_EXPERTS_KEY = "deepfuse_moe_experts"
MOE_TOP_K_KEY = "deepfuse_moe_top_k"


class GroupedRouter(nn.Module):
    """Each source's top-k among its own experts; same parameter (``weight``) as the router it replaces.

    Returns what the transformers top-k routers return: (router logits, top-k weights, top-k expert
    indices), with k = k_1 + ... + k_n; source m's weights are p / n (renormalised to sum 1 / n when
    ``renormalise``)."""

    def __init__(self, original: nn.Module, experts: Sequence[int], top_k: Sequence[int], renormalise: bool):
        super().__init__()
        if len(experts) != len(top_k) or not experts:
            raise ValueError(f"one number of experts and one top-k per source, got {list(experts)} and {list(top_k)}")
        if any(not 0 < k <= e for e, k in zip(experts, top_k, strict=True)):
            raise ValueError(f"each source's top-k must be within its experts: {list(top_k)} of {list(experts)}")
        self.weight = original.weight
        self.experts = [int(e) for e in experts]
        self.group_top_k = [int(k) for k in top_k]
        self.renormalise = bool(renormalise)
        self.top_k = sum(self.group_top_k)
        self.num_experts = sum(self.experts)
        self.hidden_dim = self.weight.shape[1]
        if self.weight.shape[0] != self.num_experts:
            raise ValueError(f"the router has {self.weight.shape[0]} experts, the groups {self.experts} sum to "
                             f"{self.num_experts}")

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)
        n = len(self.experts)
        weights, indices = [], []
        offset = 0
        for e, k in zip(self.experts, self.group_top_k, strict=True):
            probs = torch.softmax(router_logits[:, offset:offset + e].float(), dim=-1)
            top, idx = torch.topk(probs, k, dim=-1)
            if self.renormalise:
                top = top / top.sum(dim=-1, keepdim=True)
            weights.append(top / n)
            indices.append(idx + offset)
            offset += e
        return router_logits, torch.cat(weights, dim=-1), torch.cat(indices, dim=-1)

    def extra_repr(self) -> str:
        return f"experts={self.experts}, top_k={self.group_top_k}, renormalise={self.renormalise}"


def _config_value(config, key: str):
    value = getattr(config, key, None)
    if value is None and hasattr(config, "to_dict"):
        value = config.to_dict().get(key)
    return value


def apply_grouped_routers(model: nn.Module) -> int:
    """Swap every router of a fused MoE ``model`` (its family's ``moe.router`` class) for a
    :class:`GroupedRouter` with the groups its config records; returns how many were swapped (0 for
    a model whose config records no experts per source, or whose family has no experts)."""
    from .errors import DeepfuseError
    from .rules.engine import preset_for_config
    from .rules.expr import evaluate

    config = getattr(model, "config", None)
    experts = _config_value(config, MOE_EXPERTS_KEY) if config is not None else None
    top_k = _config_value(config, MOE_TOP_K_KEY) if config is not None else None
    if not experts or not top_k:
        return 0
    try:
        preset = preset_for_config({"model_type": getattr(config, "model_type", None)}, type(model).__name__)
    except DeepfuseError:
        preset = None
    if preset is None or preset.moe is None:
        raise ValueError(f"{type(model).__name__}'s config records experts per source ({MOE_EXPERTS_KEY}) but its "
                         "family has no known router")
    renormalise = bool(evaluate(preset.moe.renormalise, config.to_dict() if hasattr(config, "to_dict") else {}))
    swapped = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child).__name__ == preset.moe.router:
                setattr(parent, child_name, GroupedRouter(child, experts, top_k, renormalise))
                swapped += 1
    return swapped
