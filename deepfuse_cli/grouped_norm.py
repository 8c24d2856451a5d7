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

Norms over other fused widths take their own groups (``deepfuse_norm_role_groups``, by the role
their family's rules give them: OLMo 2's k_norm spans kv_heads * head_dim). A norm over head_dim
that one [head_dim] scale applies to every head (Qwen3's q_norm/k_norm; rules say ``per_head``)
cannot hold two sources' scales in the stock tensor: the fused checkpoint keeps their weighted
average there (loads anywhere; exact when the sources agree) and writes each head's own scale to
``deepfuse_head_norms.safetensors`` beside the weights, which :func:`apply_grouped_norms` reads
(and :func:`save_head_norms` writes again after training).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .formats.hf import HEAD_NORMS_FILE
from .grouped_router import apply_grouped_routers
from .rules.schema import NormSpec, Rule

GROUPS_KEY = "deepfuse_norm_groups"
#: config.json: groups of norms over other widened roles than the hidden size, e.g.
#: ``{"heads": [32, 32], "kv": [8, 8]}`` (OLMo 2's q_norm/k_norm under grouped-query attention)
ROLE_GROUPS_KEY = "deepfuse_norm_role_groups"
#: config.json: the file beside the weights holding per-head norm scales (Qwen3's q_norm/k_norm)
HEAD_NORMS_KEY = "deepfuse_head_norms"


def _scaled(y: torch.Tensor, weight: torch.Tensor | None, dtype: torch.dtype, cast_before_scale: bool,
            offset: float) -> torch.Tensor:
    """``y`` (normalised, float32) times the scale, in the precision the family's module uses."""
    if weight is None:
        return y.to(dtype)
    if offset:
        return (y * (offset + weight.float())).to(dtype)
    if cast_before_scale:
        return weight * y.to(dtype)
    y = weight * y  # T5: scale in float32 then cast to the weight dtype for half weights
    return y.to(weight.dtype) if weight.dtype in (torch.float16, torch.bfloat16) else y


class GroupedNorm(nn.Module):
    """Normalise each group of the last axis on its own; affine parameters shared with the original.

    ``kind`` is ``"rms"`` (x / sqrt(mean(x^2) + eps), as Llama/Qwen2/Mistral/T5 norms compute it,
    in float32, cast back to the input dtype before the scale for Llama-style norms) or
    ``"layer"`` (mean-centred LayerNorm with optional bias; OLMo's has neither weight nor bias).
    """

    def __init__(self, original: nn.Module, groups: Sequence[int], kind: str, eps: float,
                 cast_before_scale: bool = True, offset: float = 0.0):
        super().__init__()
        self.groups = [int(g) for g in groups]
        self.kind = kind
        self.eps = eps
        self.cast_before_scale = cast_before_scale
        self.offset = offset  # the scale is (offset + weight), in float32 (Gemma: 1 + w)
        self.weight = getattr(original, "weight", None)
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
            y = y.to(dtype) if self.weight is None else y.to(dtype) * self.weight
            return y + self.bias if self.bias is not None else y
        return _scaled(y, self.weight, dtype, self.cast_before_scale, self.offset)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, kind={self.kind}, eps={self.eps}" + (f", offset={self.offset}" if self.offset else "")


def _drop_head_weight(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    state_dict.pop(prefix + "head_weight", None)


class GroupedHeadNorm(nn.Module):
    """A norm over head_dim applied to every head (Qwen3's q_norm/k_norm), with a scale per head.

    The statistics are each head's own, as in the stock module; the scale of head h is row h of
    ``head_weight`` ([heads, head_dim], each source's heads holding that source's scale), where the
    stock module applies one shared ``weight`` to every head. ``head_axis`` is the heads' axis in the
    input (-2: [..., heads, head_dim]; -3: [batch, heads, seq, head_dim]). ``head_weight`` is a
    trainable parameter left out of ``state_dict`` (the checkpoint keeps the stock layout); save it
    with :func:`save_head_norms`. The stock ``weight`` stays (same names), unused.
    """

    def __init__(self, original: nn.Module, head_weight: torch.Tensor, head_axis: int, eps: float,
                 cast_before_scale: bool = True, offset: float = 0.0):
        super().__init__()
        if head_axis > -2:
            raise ValueError(f"head_axis must be -2 or before (the last axis is head_dim), not {head_axis}")
        self.weight = original.weight
        self.head_weight = nn.Parameter(head_weight.detach().to(original.weight.dtype).clone())
        self.head_axis = head_axis
        self.eps = eps
        self.cast_before_scale = cast_before_scale
        self.offset = offset
        self.register_state_dict_post_hook(_drop_head_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if x.shape[self.head_axis] != self.head_weight.shape[0]:
            raise ValueError(f"input has {x.shape[self.head_axis]} heads on axis {self.head_axis}, the per-head "
                             f"norm has {self.head_weight.shape[0]}")
        h = x.to(torch.float32)
        y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        w = self.head_weight.reshape(self.head_weight.shape[0], *([1] * (-self.head_axis - 2)), -1)
        return _scaled(y, w, dtype, self.cast_before_scale, self.offset)

    def extra_repr(self) -> str:
        return (f"heads={self.head_weight.shape[0]}, head_axis={self.head_axis}, eps={self.eps}"
                + (f", offset={self.offset}" if self.offset else ""))


#: Norm modules of models whose family is not known (a user's rules file): the common ones.
GENERIC_NORMS = [NormSpec(module="LayerNorm", kind="layer", eps="eps"),
                 NormSpec(module="T5LayerNorm", kind="rms", eps="variance_epsilon", scale_in_fp32=True),
                 NormSpec(module="*RMSNorm", kind="rms", eps="variance_epsilon|eps")]


def _preset(model: nn.Module):
    from .errors import DeepfuseError
    from .rules.engine import preset_for_config

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        return preset_for_config({"model_type": model_type}, type(model).__name__) if model_type else None
    except DeepfuseError:
        return None


def norm_specs(model: nn.Module) -> list[NormSpec]:
    """The norm modules of ``model``'s family (from its config's model_type), else the common ones."""
    preset = _preset(model)
    return preset.norms if preset is not None and preset.norms else GENERIC_NORMS


def _matches(spec: NormSpec, cls_name: str) -> bool:
    if spec.module.startswith("*"):
        return cls_name.endswith(spec.module[1:])
    return cls_name == spec.module


def _eps(module: nn.Module, spec: NormSpec) -> float | None:
    """Epsilon: the first of the spec's '|'-separated attributes the module has, or a number given
    as such (OLMo's LayerNorm holds none: ``"eps": "1e-5"``)."""
    for a in spec.eps.split("|"):
        if getattr(module, a, None) is not None:
            return getattr(module, a)
        try:
            return float(a)
        except ValueError:
            continue
    return None


def _width(module: nn.Module) -> int | None:
    """The size of the axis the norm normalises: its weight's, or its normalized_shape (weightless)."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.numel() if weight.dim() == 1 else None
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, (tuple, list)) and len(shape) == 1:
        return int(shape[0])
    return None


def head_norms_path(model: nn.Module) -> Path | None:
    """Where the model's per-head norm file would be: beside the weights it was loaded from."""
    config = getattr(model, "config", None)
    where = getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None)
    return Path(where) / HEAD_NORMS_FILE if where else None


def load_head_norms(model: nn.Module) -> dict[str, torch.Tensor]:
    """The per-head norm scales written beside the model's weights (empty when there are none: sources
    that agree need none). A config naming the file when it is missing is an error."""
    from safetensors.torch import load_file

    path = head_norms_path(model)
    named = _config_value(model, HEAD_NORMS_KEY)
    if path is None or not path.is_file():
        if named:
            raise ValueError(f"config.json names per-head norms {named!r}, but {path} does not exist: copy the file "
                             "beside the weights (save it with save_head_norms after save_pretrained)")
        return {}
    return load_file(str(path))


def save_head_norms(model: nn.Module, directory: str | Path) -> Path | None:
    """Write the per-head scales of ``model``'s grouped head norms to ``directory`` (call it after
    ``save_pretrained(directory)``; ``apply_grouped_norms`` reads them back). None if there are none."""
    from safetensors.torch import save_file

    tensors = {f"{name}.weight": m.head_weight.detach().contiguous().cpu()
               for name, m in model.named_modules() if isinstance(m, GroupedHeadNorm)}
    if not tensors:
        return None
    path = Path(directory) / HEAD_NORMS_FILE
    save_file(tensors, str(path))
    return path


def _config_value(model: nn.Module, key: str):
    config = getattr(model, "config", None)
    if config is None:
        return None
    value = getattr(config, key, None)
    if value is None and hasattr(config, "to_dict"):
        value = config.to_dict().get(key)
    return value


def _rule_of(rules: list[Rule], names: Sequence[str]) -> tuple[Rule, str] | tuple[None, None]:
    """The norm rule claiming the module's weight, and that weight's name in the checkpoint."""
    for weight in names:
        rule = next((r for r in rules if r.regex.fullmatch(weight)), None)
        if rule is not None:
            return rule, weight
    return None, None


def apply_grouped_norms(model: nn.Module, groups: Sequence[int] | None = None, *,
                        role_groups: dict[str, Sequence[int]] | None = None,
                        head_norms: dict[str, torch.Tensor] | None = None, routers: bool = True) -> int:
    """Replace every norm over a fused width in ``model`` by a grouped one; returns how many were replaced.

    ``groups`` (the sources' hidden sizes) defaults to ``model.config.deepfuse_norm_groups``;
    ``role_groups`` (norms over other widths, e.g. OLMo 2's k_norm over kv_heads * head_dim) to
    ``deepfuse_norm_role_groups``; ``head_norms`` (per-head scales of norms a [head_dim] weight applies
    to every head, e.g. Qwen3's q_norm) to the file beside the weights the model was loaded from
    (``deepfuse_head_norms.safetensors``). Which groups a norm takes comes from its family's rules (the
    role of the norm tensor's widened axis); norms no rule names (weightless ones, unknown families)
    are grouped by width. Raises ValueError if there are no groups or no norm matched (a model that
    was not fused with ``--norm prop``). A fused mixture-of-experts model also gets grouped routers (each
    source's top-k among its own experts, ``grouped_router``), unless ``routers`` is False (the stock
    routing, e.g. to measure it).
    """
    if groups is None:
        groups = _config_value(model, GROUPS_KEY)
    if not groups:
        raise ValueError(f"no norm groups: pass groups=[d1, d2, ...] or load a model whose config has {GROUPS_KEY}")
    by_role = {"hidden": [int(g) for g in groups]}
    for role, g in (role_groups if role_groups is not None else (_config_value(model, ROLE_GROUPS_KEY) or {})).items():
        by_role[role] = [int(x) for x in g]
    preset = _preset(model)
    specs = preset.norms if preset is not None and preset.norms else GENERIC_NORMS
    rules = [r for r in preset.rules if r.norm] if preset is not None else []
    if head_norms is None:
        head_norms = load_head_norms(model) if any(r.per_head for r in rules) else {}
    by_width: dict[int, list[int] | None] = {}
    for g in by_role.values():  # a width two roles share with different groups is ambiguous: not by width
        w = sum(g)
        by_width[w] = g if by_width.get(w, g) == g else None

    prefix = getattr(model, "base_model_prefix", "") or ""
    replaced = 0
    for name, module in list(model.named_modules()):
        spec = next((s for s in specs if _matches(s, type(module).__name__)), None)
        width = _width(module)
        if spec is None or width is None or isinstance(module, (GroupedNorm, GroupedHeadNorm)):
            continue
        eps = _eps(module, spec)
        if eps is None:
            continue
        # a base model (no head) names its modules without the checkpoint's prefix
        rule, weight = _rule_of(rules, [f"{name}.weight", f"{prefix}.{name}.weight"] if prefix else [f"{name}.weight"])
        fp32 = not spec.scale_in_fp32
        if rule is not None and rule.per_head:
            scales = head_norms.get(weight)
            if scales is None:
                continue  # sources that agree: the stock module is exact
            new: nn.Module = GroupedHeadNorm(module, scales, rule.head_axis_or_default, eps, fp32, spec.offset)
        else:
            g = by_role.get(rule.axes[rule.widened_axes[0]]) if rule is not None and rule.widened_axes else \
                by_width.get(width)
            if g is None or sum(g) != width:
                continue
            new = GroupedNorm(module, g, spec.kind, eps, cast_before_scale=fp32, offset=spec.offset)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        replaced += 1
    if replaced == 0:
        raise ValueError(f"no norm over the hidden size {sum(groups)} was found in {type(model).__name__}")
    if routers:
        replaced += apply_grouped_routers(model)
    return replaced
