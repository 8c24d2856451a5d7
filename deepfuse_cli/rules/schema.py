"""The rules-file format, validated with pydantic (unknown fields are errors).

A rules file (JSON) describes one architecture family::

    {
      "name": "llama",
      "description": "...",
      "model_types": ["llama", "mistral", "qwen2"],     # config.json model_type values it serves
      "architecture": "llama",                          # built-in config/forward support (optional)
      "output": {"name": "lm_head.weight", "tied_to": "model.embed_tokens.weight"},
      "config": {"sum": [...], "equal": [...], "set": {...}, "write": [...]},
      "rules": [
        {"pattern": "model\\.layers\\.{layer}\\.self_attn\\.q_proj\\.weight",
         "op": "block_diagonal", "axes": ["heads", "hidden"], "input_axis": 1},
        ...
      ]
    }

``pattern`` is a regular expression matched against the *whole* tensor name; ``{layer}``
stands for a layer number. ``axes`` names the role of every axis of the tensor: a widened
role (each source owns a slice of that axis) or a shared one (equal in every source).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .. import ops as fusion_ops

#: Axis roles whose size is summed over the sources (each source owns a slice).
WIDENED_ROLES = {
    "hidden": "the model width (d_model / hidden_size / n_embd)",
    "heads": "query (or all) attention heads, flattened heads-outer (heads * head_dim)",
    "kv": "key/value heads under grouped-query attention, flattened (kv_heads * head_dim)",
    "mlp": "the MLP's intermediate units",
    "head_count": "one entry per attention head (e.g. T5 relative attention bias)",
    "qkv": "a fused projection axis holding several parts (split with 'parts')",
}
#: Axis roles that must be equal in every source.
SHARED_ROLES = {
    "vocab": "vocabulary entries",
    "positions": "learned positions",
    "buckets": "relative-position buckets",
    "features": "input features shared by all sources",
    "classes": "output classes / logits shared by all sources",
    "shared": "any other axis that must match across sources",
}
AXIS_ROLES = {**WIDENED_ROLES, **SHARED_ROLES}

#: Every fusion op a rule may name, with what it does (from the op registry).
OPS = {name: op.description for name, op in fusion_ops.OPS.items()}

LAYER_TOKEN = "{layer}"
LAYER_REGEX = r"(?P<layer>\d+)"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rule(_Strict):
    pattern: str = Field(description="full-name regular expression; {layer} matches a layer number")
    op: str = Field(description="the fusion op (`deepfuse rules show` lists them)")
    axes: list[str] = Field(description="role of every axis of the tensor")
    input_axis: int | None = Field(default=None, description="block_diagonal: which axis is the input space")
    parts: int | None = Field(default=None, ge=2, description="split_fuse_concat: number of parts on the 'qkv' axis")
    optional: bool = Field(default=False, description="the rule may claim nothing in a model (e.g. optional biases)")
    norm: bool = Field(default=False, description="a normalisation scale/bias (grouped in --norm prop)")
    note: str | None = None

    @field_validator("pattern")
    @classmethod
    def _valid_regex(cls, v: str) -> str:
        try:
            re.compile(v.replace(LAYER_TOKEN, LAYER_REGEX))
        except re.error as exc:
            raise ValueError(f"invalid regular expression {v!r}: {exc}") from None
        return v

    @field_validator("axes")
    @classmethod
    def _known_roles(cls, v: list[str]) -> list[str]:
        for role in v:
            if role not in AXIS_ROLES:
                raise ValueError(f"unknown axis role {role!r}; known roles: {', '.join(AXIS_ROLES)}")
        return v

    @field_validator("op")
    @classmethod
    def _known_op(cls, v: str) -> str:
        if v not in fusion_ops.OPS:
            raise ValueError(f"unknown op {v!r}; known ops: {', '.join(fusion_ops.OPS)}")
        return v

    @model_validator(mode="after")
    def _op_fits_axes(self) -> Rule:
        """The op's own checks, and the optional fields only the ops that read them may set."""
        op = self.fusion_op
        if "qkv" in self.axes and not op.takes_parts:
            raise ValueError(f"the 'qkv' role is only valid with op {_ops_that(lambda o: o.takes_parts)}")
        op.check(self)
        if not op.takes_input_axis and self.input_axis is not None:
            takers = _ops_that(lambda o: o.takes_input_axis)
            raise ValueError(f"input_axis is only meaningful for {takers}, not {op.name}")
        if not op.takes_parts and self.parts is not None:
            raise ValueError(f"parts is only meaningful for {_ops_that(lambda o: o.takes_parts)}")
        return self

    @property
    def fusion_op(self) -> fusion_ops.FusionOp:
        """The registered op this rule names."""
        return fusion_ops.get(self.op)

    @property
    def widened_axes(self) -> list[int]:
        return [i for i, r in enumerate(self.axes) if r in WIDENED_ROLES]

    @property
    def regex(self) -> re.Pattern[str]:
        return re.compile(self.pattern.replace(LAYER_TOKEN, LAYER_REGEX))


def _ops_that(has: Callable[[fusion_ops.FusionOp], bool]) -> str:
    return " / ".join(name for name, op in fusion_ops.OPS.items() if has(op))


class OutputSpec(_Strict):
    """The projection to logits, and the embedding it may be tied to."""

    name: str = Field(description="tensor name of the output projection, e.g. lm_head.weight")
    tied_to: str | None = Field(default=None, description="embedding it is tied to when absent from the files")
    scale: Literal["none", "t5_decoder"] = Field(
        default="none", description="source-side output rescale folded into the fused projection"
    )
    transpose: bool = Field(
        default=False, description="the projection is stored [hidden, vocab] while the embedding is [vocab, hidden] (T5X)"
    )


class ConfigSpec(_Strict):
    """How config.json widens: summed widths, fields that must agree, fields set in the output."""

    sum: list[str] = Field(default_factory=list)
    equal: list[str] = Field(default_factory=list)
    set: dict[str, Any] = Field(default_factory=dict)
    write: list[str] = Field(default_factory=list, description="derived fields written explicitly (e.g. head_dim)")
    width: str | None = Field(default=None, description="the model-width field (norm groups)")


class Preset(_Strict):
    name: str
    description: str = ""
    model_types: list[str] = Field(default_factory=list)
    architecture: str | None = None
    output: OutputSpec | None = None
    config: ConfigSpec | None = None
    rules: list[Rule]

    @field_validator("rules")
    @classmethod
    def _nonempty(cls, v: list[Rule]) -> list[Rule]:
        if not v:
            raise ValueError("a rules file needs at least one rule")
        return v
