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
from ..naming import DESCRIPTIONS

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
#: Tensor namings: the ecosystem whose names (and layouts) a checkpoint's files use.
NAMINGS = {n.value: text for n, text in DESCRIPTIONS.items()}
#: Legacy ``output.scale`` values, as expressions.
LEGACY_SCALES = {"none": "1.0", "t5_decoder": "d_model ** -0.5 if scale_decoder_outputs else 1.0"}


def _known_naming(naming: str) -> str:
    if naming not in NAMINGS:
        raise ValueError(f"unknown naming {naming!r}; known namings: {', '.join(NAMINGS)}")
    return naming


def _escape_template(text: str) -> str:
    return re.escape(text).replace(re.escape(LAYER_TOKEN), LAYER_TOKEN)


def _valid_expression(v: str) -> str:
    from .expr import ExprError, parse

    try:
        parse(v)
    except ExprError as exc:
        raise ValueError(str(exc)) from None
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NamingName(_Strict):
    """A tensor's name in another naming: a plain name with ``{layer}``; None: not stored there
    (a copy of another tensor, dropped on conversion)."""

    name: str | None
    transpose: bool = Field(default=False, description="its layout there is this one's transposed (2-D)")


class Rule(_Strict):
    pattern: str = Field(description="full-name regular expression; {layer} matches a layer number")
    op: str = Field(description="the fusion op (`deepfuse rules show` lists them)")
    axes: list[str] = Field(description="role of every axis of the tensor")
    input_axis: int | None = Field(default=None, description="block_diagonal: which axis is the input space")
    parts: int | None = Field(default=None, ge=2, description="split_fuse_concat: number of parts on the 'qkv' axis")
    optional: bool = Field(default=False, description="the rule may claim nothing in a model (e.g. optional biases)")
    norm: bool = Field(default=False, description="a normalisation scale/bias (grouped in --norm prop)")
    names: dict[str, NamingName] = Field(
        default_factory=dict, description="this tensor's name in other namings (e.g. 't5x'), for conversion")
    note: str | None = None

    @field_validator("names")
    @classmethod
    def _known_namings(cls, v: dict[str, NamingName]) -> dict[str, NamingName]:
        for naming in v:
            _known_naming(naming)
        return v

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
    def template(self) -> str:
        """The pattern as a plain name with ``{layer}`` (rules with other namings must be literal)."""
        text = re.sub(r"\\(.)", r"\1", self.pattern)
        if _escape_template(text) != self.pattern:
            raise ValueError(f"pattern {self.pattern!r} is not a literal name (with {{layer}}): "
                             "a rule naming its tensor in other namings must match exactly one name per layer")
        return text

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
    scale: str = Field(
        default="1.0", description="source-side factor on the output projection, an expression over the config "
        "(e.g. 'd_model ** -0.5 if scale_decoder_outputs else 1.0'), folded into the fused projection")
    transpose: bool = Field(
        default=False, description="the projection is stored [hidden, vocab] while the embedding is [vocab, hidden] (T5X)"
    )


    @field_validator("scale")
    @classmethod
    def _scale(cls, v: str) -> str:
        return _valid_expression(LEGACY_SCALES.get(v, v))


class ConfigSpec(_Strict):
    """How config.json widens: summed widths, fields that must agree, fields set in the output."""

    sum: list[str] = Field(default_factory=list)
    equal: list[str] = Field(default_factory=list)
    set: dict[str, Any] = Field(default_factory=dict)
    write: list[str] = Field(default_factory=list, description="derived fields written explicitly (e.g. head_dim)")
    derived: dict[str, str] = Field(
        default_factory=dict, description="values implied by defaults, as expressions over the config, evaluated in "
        "order (e.g. head_dim: 'head_dim or hidden_size // num_attention_heads'); compared and written like fields")
    widths: dict[str, str] = Field(
        default_factory=dict, description="widened axis role -> its size in one source, as an expression over the "
        "config (e.g. kv: 'num_key_value_heads * head_dim'); checked against every tensor before planning")
    sizes: list[str] = Field(default_factory=list, description="integer size fields (validated as non-negative)")
    width: str | None = Field(default=None, description="legacy: the model-width field (same as widths.hidden)")

    @field_validator("derived", "widths")
    @classmethod
    def _expressions(cls, v: dict[str, str]) -> dict[str, str]:
        for text in v.values():
            _valid_expression(text)
        return v

    @field_validator("widths")
    @classmethod
    def _widened_roles(cls, v: dict[str, str]) -> dict[str, str]:
        for role in v:
            if role not in WIDENED_ROLES:
                raise ValueError(f"widths: {role!r} is not a widened axis role ({', '.join(WIDENED_ROLES)})")
        return v

    def width_expressions(self) -> dict[str, str]:
        out = dict(self.widths)
        if self.width and "hidden" not in out:
            out["hidden"] = self.width
        return out


class RuntimeSpec(_Strict):
    """Where the family runs for function-level verification."""

    model_class: str = Field(description="transformers class (e.g. AutoModelForCausalLM, T5ForConditionalGeneration), "
                             "or 'builtin' for a forward pass in the family module")
    inputs: Literal["causal", "seq2seq", "features"] = Field(
        default="causal", description="probe inputs: token ids (causal), encoder+decoder ids, or feature vectors")
    # verify's reading of the function, not how the fusion runs: left out of the preset's dumps (manifests,
    # digests), so that declaring it changes no fused checkpoint
    expected_deviation: str | None = Field(
        default=None, exclude=True, description="why the fused logits are not exactly the weighted average of the sources' in "
        "exact modes (e.g. 'final logit softcapping'): a deviation there is reported as expected, the hidden "
        "states still held exact")
    expected_deviation_when: str | None = Field(
        default=None, exclude=True, description="config.json field that must be set (not null, not false) for expected_deviation "
        "to apply, e.g. final_logit_softcapping; none: always")


class NormSpec(_Strict):
    """A norm module class of the family, for grouped norms (--norm prop)."""

    module: str = Field(description="module class name (exact), e.g. LlamaRMSNorm, or a suffix with '*' (e.g. *RMSNorm)")
    kind: Literal["rms", "layer"]
    eps: str = Field(default="eps", description="attribute holding epsilon (first found of a '|'-separated list)")
    scale_in_fp32: bool = Field(default=False, description="scale applied in float32 before casting back (T5)")
    offset: float = Field(default=0.0, description="the scale is (offset + weight), e.g. 1.0 for Gemma")


class Preset(_Strict):
    name: str
    description: str = ""
    model_types: list[str] = Field(
        default_factory=list, description="config.json model_type values served; with --rules, a source of another "
        "model_type is refused (empty: any)")
    architecture: str | None = Field(default=None, description="module of code hooks in deepfuse_cli.architectures")
    naming: str = Field(default="hf", description="the naming the patterns are written in")
    runtime: RuntimeSpec | None = None
    norms: list[NormSpec] = Field(default_factory=list)
    output: OutputSpec | None = None
    config: ConfigSpec | None = None
    rules: list[Rule]

    @field_validator("naming")
    @classmethod
    def _naming(cls, v: str) -> str:
        return _known_naming(v)

    @property
    def namings(self) -> list[str]:
        """Every naming this preset can be read and written in."""
        others = {n for r in self.rules for n in r.names}
        return [self.naming, *sorted(others - {self.naming})]

    def for_naming(self, naming: str) -> Preset:
        """This preset in another naming: each rule's pattern becomes its name there, its axes are
        reversed where the layout is transposed, and the names of this naming become the rule's
        column for conversion back."""
        if naming == self.naming:
            return self
        if naming not in self.namings:
            raise ValueError(f"preset {self.name!r} has no names in the {naming!r} naming "
                             f"(it has: {', '.join(self.namings)})")
        rules = []
        for r in self.rules:
            col = r.names.get(naming)
            if col is None or col.name is None:
                continue  # not stored in that naming
            back = {self.naming: NamingName(name=r.template, transpose=col.transpose)}
            for other, c in r.names.items():
                if other != naming:
                    back[other] = NamingName(name=c.name, transpose=c.transpose != col.transpose)
            axes, input_axis = list(r.axes), r.input_axis
            if col.transpose:
                axes = axes[::-1]
                input_axis = None if input_axis is None else len(axes) - 1 - input_axis
            rules.append(r.model_copy(update={"pattern": _escape_template(col.name), "axes": axes,
                                              "input_axis": input_axis, "names": back}))
        output = self.output
        if output is not None:
            out_rule = self._rule_named(output.name)
            emb_rule = self._rule_named(output.tied_to) if output.tied_to else None
            out_col = out_rule.names.get(naming) if out_rule else None
            emb_col = emb_rule.names.get(naming) if emb_rule else None
            if out_col is None or out_col.name is None:
                raise ValueError(f"preset {self.name!r}: the output {output.name!r} has no {naming!r} name")
            output = output.model_copy(update={
                "name": out_col.name,
                "tied_to": emb_col.name if emb_col is not None else None,
                "transpose": output.transpose ^ out_col.transpose ^ (emb_col.transpose if emb_col else False),
            })
        return self.model_copy(update={"naming": naming, "rules": rules, "output": output})

    def _rule_named(self, name: str) -> Rule | None:
        return next((r for r in self.rules if r.regex.fullmatch(name)), None)

    @field_validator("rules")
    @classmethod
    def _nonempty(cls, v: list[Rule]) -> list[Rule]:
        if not v:
            raise ValueError("a rules file needs at least one rule")
        return v
