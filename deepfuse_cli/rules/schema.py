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
stands for a layer number, ``{expert}`` for a mixture-of-experts expert's number (such a rule's
tensors are renumbered: the fused model has every source's experts, in source order). ``axes`` names the role of every axis of the tensor: a widened
role (each source owns a slice of that axis) or a shared one (equal in every source).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, ClassVar, Literal

from pydantic import (BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, field_validator, model_serializer,
                      model_validator)

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
    "proj": "the embedding's own width where it differs from the hidden size (OPT's word_embed_proj_dim)",
    "experts": "mixture-of-experts experts, one entry each (a router's output axis)",
}
#: Axis roles that must be equal in every source.
SHARED_ROLES = {
    "vocab": "vocabulary entries",
    "positions": "learned positions",
    "buckets": "relative-position buckets",
    "features": "input features shared by all sources",
    "classes": "output classes / logits shared by all sources",
    "shared": "any other axis that must match across sources",
    "expert_mlp": "an expert's intermediate units (equal in every source: the fused model has more experts, not wider ones)",
}
AXIS_ROLES = {**WIDENED_ROLES, **SHARED_ROLES}

#: Every fusion op a rule may name, with what it does (from the op registry).
OPS = {name: op.description for name, op in fusion_ops.OPS.items()}

LAYER_TOKEN = "{layer}"
LAYER_REGEX = r"(?P<layer>\d+)"
#: In a pattern, an expert's number: the fused model's experts are every source's, in source order
#: (source m's expert j becomes expert E_1 + ... + E_{m-1} + j)
EXPERT_TOKEN = "{expert}"
EXPERT_REGEX = r"(?P<expert>\d+)"
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


class _AddedFields(_Strict):
    """A model some of whose fields were added after presets were first recorded: those fields
    (``ADDED``) are dumped only when set, so a preset that does not use them keeps its JSON, digest
    and recorded manifest bytes."""

    ADDED: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_unset_added(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for name in self.ADDED:
            if name in data and getattr(self, name) == type(self).model_fields[name].get_default(
                    call_default_factory=True):
                del data[name]
        return data


class NamingName(_Strict):
    """A tensor's name in another naming: a plain name with ``{layer}``; None: not stored there
    (a copy of another tensor, dropped on conversion)."""

    name: str | None
    transpose: bool = Field(default=False, description="its layout there is this one's transposed (2-D)")


class Rule(_AddedFields):
    ADDED: ClassVar[tuple[str, ...]] = ("runtime_scale", "per_head", "head_axis")

    pattern: str = Field(description="full-name regular expression; {layer} matches a layer number")
    op: str = Field(description="the fusion op (`deepfuse rules show` lists them)")
    axes: list[str] = Field(description="role of every axis of the tensor")
    input_axis: int | None = Field(default=None, description="block_diagonal: which axis is the input space")
    parts: int | list[str] | None = Field(
        default=None, description="split_fuse_concat: the parts of the 'qkv' axis: their number (equal parts), or "
        "the widened role of each part in order (e.g. [\"heads\", \"kv\", \"kv\"]), whose size in each source is "
        "the family's width expression for that role")
    optional: bool = Field(default=False, description="the rule may claim nothing in a model (e.g. optional biases)")
    norm: bool = Field(default=False, description="a normalisation scale/bias (grouped in --norm prop)")
    runtime_scale: str | None = Field(
        default=None, description="the runtime multiplies this tensor by this expression over its config, e.g. "
        "Gemma's embedding by 'hidden_size ** 0.5'; source m's block is stored times runtime_scale(source m) / "
        "runtime_scale(fused config), so that the runtime's product is each source's own")
    names: dict[str, NamingName] = Field(
        default_factory=dict, description="this tensor's name in other namings (e.g. 't5x'), for conversion")
    note: str | None = None
    per_head: str | None = Field(
        default=None, description="a norm over head_dim applied to every head (Qwen3's q_norm/k_norm): the width role "
        "('heads' or 'kv') whose heads it scales; grouped norms give each source's heads that source's scale")
    head_axis: int | None = Field(
        default=None, description="per_head: the axis of the heads in the norm module's input (default -2, "
        "[..., heads, head_dim]; -3 for [batch, heads, seq, head_dim])")

    @field_validator("names")
    @classmethod
    def _known_namings(cls, v: dict[str, NamingName]) -> dict[str, NamingName]:
        for naming in v:
            _known_naming(naming)
        return v

    @field_validator("runtime_scale")
    @classmethod
    def _scale_expression(cls, v: str | None) -> str | None:
        return None if v is None else _valid_expression(v)

    @field_validator("pattern")
    @classmethod
    def _valid_regex(cls, v: str) -> str:
        try:
            re.compile(v.replace(LAYER_TOKEN, LAYER_REGEX).replace(EXPERT_TOKEN, EXPERT_REGEX))
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

    @field_validator("parts")
    @classmethod
    def _parts(cls, v: int | list[str] | None) -> int | list[str] | None:
        if isinstance(v, int) and v < 2:
            raise ValueError(f"parts {v}: a fused projection has at least 2 parts")
        if isinstance(v, list):
            if len(v) < 2:
                raise ValueError(f"parts {v}: a fused projection has at least 2 parts")
            for role in v:
                if role not in WIDENED_ROLES or role == "qkv":
                    raise ValueError(f"parts: {role!r} is not a widened axis role of one part "
                                     f"({', '.join(r for r in WIDENED_ROLES if r != 'qkv')})")
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
        if not op.takes_scales and self.runtime_scale is not None:
            raise ValueError(f"runtime_scale is only meaningful for {_ops_that(lambda o: o.takes_scales)}, not {op.name}")
        if self.per_head is not None:
            if self.per_head not in WIDENED_ROLES:
                raise ValueError(f"per_head must be a widened axis role ({', '.join(WIDENED_ROLES)}), not {self.per_head!r}")
            if not self.norm or self.widened_axes:
                raise ValueError("per_head is for a norm (\"norm\": true) over head_dim alone (no widened axis)")
        elif self.head_axis is not None:
            raise ValueError("head_axis is only meaningful with per_head")
        return self

    @property
    def head_axis_or_default(self) -> int:
        return -2 if self.head_axis is None else self.head_axis

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
        return re.compile(self.pattern.replace(LAYER_TOKEN, LAYER_REGEX).replace(EXPERT_TOKEN, EXPERT_REGEX))

    @property
    def per_expert(self) -> bool:
        """The rule claims one tensor per mixture-of-experts expert (``{expert}`` in its pattern):
        each fused expert comes from one source's expert, renumbered after the previous sources'."""
        return EXPERT_TOKEN in self.pattern


def _ops_that(has: Callable[[fusion_ops.FusionOp], bool]) -> str:
    return " / ".join(name for name, op in fusion_ops.OPS.items() if has(op))


class TiedTensor(_Strict):
    """A tensor a tied source may leave out of its files, and the tensor it is then read from."""

    name: str = Field(description="tensor name in the (untied) fused model, e.g. cls.predictions.decoder.bias")
    tied_to: str = Field(description="the tensor it is tied to in the source, e.g. cls.predictions.bias")


class OutputSpec(_AddedFields):
    """The projection to logits, and the embedding it may be tied to."""

    ADDED: ClassVar[tuple[str, ...]] = ("when_present", "also_tied")

    name: str = Field(description="tensor name of the output projection, e.g. lm_head.weight")
    tied_to: str | None = Field(default=None, description="embedding it is tied to when absent from the files")
    scale: str = Field(
        default="1.0", description="source-side factor on the output projection, an expression over the config "
        "(e.g. 'd_model ** -0.5 if scale_decoder_outputs else 1.0'), folded into the fused projection")
    transpose: bool = Field(
        default=False, description="the projection is stored [hidden, vocab] while the embedding is [vocab, hidden] (T5X)"
    )
    when_present: str | None = Field(
        default=None, description="a tensor only checkpoints with this output head hold (BERT: cls.predictions.bias): "
        "a source without it has no such head and nothing is untied (bare encoders, classification heads)")
    also_tied: list[TiedTensor] = Field(
        default_factory=list, description="further tensors of the head a tied source leaves out of its files (BERT's "
        "decoder bias, tied to cls.predictions.bias): read from the tensor they are tied to, written in the fused model")

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: str) -> str:
        return _valid_expression(LEGACY_SCALES.get(v, v))


class ConfigSpec(_AddedFields):
    """How config.json widens: summed widths, fields that must agree, fields set in the output."""

    ADDED: ClassVar[tuple[str, ...]] = ("require", "refuse")

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
    require: dict[str, str] = Field(
        default_factory=dict, description="conditions the fused config must meet for the runtime to load it, as "
        "expressions over it -> what the runtime demands (e.g. 'hidden_size % num_attention_heads == 0'); a fusion "
        "whose config fails one is refused before anything is written")
    refuse: dict[str, str] = Field(
        default_factory=dict, description="expression over a source's config (with the derived values) -> the reason "
        "no exact fused model exists when it is true (e.g. alibi: slopes depend on the number of heads)")
    width: str | None = Field(default=None, description="legacy: the model-width field (same as widths.hidden)")

    @field_validator("derived", "widths")
    @classmethod
    def _expressions(cls, v: dict[str, str]) -> dict[str, str]:
        for text in v.values():
            _valid_expression(text)
        return v

    @field_validator("require", "refuse")
    @classmethod
    def _conditions(cls, v: dict[str, str]) -> dict[str, str]:
        for text in v:
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


class RuntimeSpec(_AddedFields):
    """Where the family runs for function-level verification."""

    ADDED: ClassVar[tuple[str, ...]] = ("heads", "max_length")

    model_class: str = Field(description="transformers class (e.g. AutoModelForCausalLM, T5ForConditionalGeneration), "
                             "or 'builtin' for a forward pass in the family module")
    inputs: Literal["causal", "seq2seq", "features", "encoder"] = Field(
        default="causal", description="probe inputs: token ids (causal), encoder+decoder ids, feature vectors, or token "
        "ids with an attention mask and token type ids (encoder: BERT-like)")
    heads: list[str] = Field(
        default_factory=list, description="transformers classes of the family's heads the function check runs (e.g. "
        "BertForMaskedLM, BertForSequenceClassification): a checkpoint whose config.json 'architectures' names one "
        "runs in it, one that names another class is checked at tensor level only; none named: model_class")

    max_length: str | None = Field(
        default=None, description="the longest probe the model takes, an expression over the config (RoBERTa: "
        "'max_position_embeddings - pad_token_id - 1', its positions start after the padding id); default: "
        "n_positions or max_position_embeddings")

    @field_validator("max_length")
    @classmethod
    def _max_length(cls, v: str | None) -> str | None:
        return v if v is None else _valid_expression(v)

    def _architecture(self, config: dict | None) -> str | None:
        names = (config or {}).get("architectures")
        first = names[0] if isinstance(names, list) and names else None
        return first if isinstance(first, str) else None

    def class_for(self, config: dict | None) -> str:
        """The transformers class a checkpoint with this config runs in: the head its config.json
        ``architectures`` names when the family lists it, else ``model_class``."""
        head = self._architecture(config)
        return head if head is not None and head in self.heads else self.model_class

    def unsupported_head(self, config: dict | None) -> str | None:
        """The class config.json names when the family lists its heads and this is not one of them."""
        head = self._architecture(config)
        return head if self.heads and head is not None and head not in self.heads else None


class NormSpec(_Strict):
    """A norm module class of the family, for grouped norms (--norm prop)."""

    module: str = Field(description="module class name (exact), e.g. LlamaRMSNorm, or a suffix with '*' (e.g. *RMSNorm)")
    kind: Literal["rms", "layer"]
    eps: str = Field(default="eps", description="attribute holding epsilon (first found of a '|'-separated list)")
    scale_in_fp32: bool = Field(default=False, description="scale applied in float32 before casting back (T5)")
    offset: float = Field(default=0.0, description="the scale is (offset + weight), e.g. 1.0 for Gemma")


class DeviationSpec(_Strict):
    """Where the family's runtime cannot compute the average of different sources whatever the weights
    (e.g. a cap applied to the averaged logits): ``verify`` reports the deviation as expected."""

    when: str = Field(description="expression over a source's config: the deviation applies when it is true in any "
                      "source (e.g. 'final_logit_softcapping')")
    reason: str = Field(description="what the runtime computes instead, one line")

    @field_validator("when")
    @classmethod
    def _when(cls, v: str) -> str:
        return _valid_expression(v)


class MoeSpec(_Strict):
    """A mixture-of-experts family: how many experts each source routes to, and its router module, so
    that the fused config records the experts per source and :func:`grouped_norm.apply_grouped_norms`
    can swap the router for one that routes each source among its own experts (exact for any sources)."""

    router: str = Field(description="router module class name, e.g. MixtralTopKRouter")
    experts: str = Field(description="number of experts of one source, an expression (e.g. num_local_experts)")
    top_k: str = Field(description="experts each token is routed to in one source, an expression")
    renormalise: str = Field(description="whether the top-k routing weights are renormalised to sum to 1, an "
                             "expression (e.g. 'True', or 'norm_topk_prob')")

    @field_validator("experts", "top_k", "renormalise")
    @classmethod
    def _expressions(cls, v: str) -> str:
        return _valid_expression(v)


class Preset(_AddedFields):
    ADDED: ClassVar[tuple[str, ...]] = ("deviations", "moe")

    name: str
    description: str = ""
    model_types: list[str] = Field(
        default_factory=list, description="config.json model_type values served; with --rules, a source of another "
        "model_type is refused (empty: any)")
    architecture: str | None = Field(default=None, description="module of code hooks in deepfuse_cli.architectures")
    naming: str = Field(default="hf", description="the naming the patterns are written in")
    runtime: RuntimeSpec | None = None
    norms: list[NormSpec] = Field(default_factory=list)
    deviations: list[DeviationSpec] = Field(
        default_factory=list, description="where the runtime is not the average of different sources (verify: expected)")
    moe: MoeSpec | None = None
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
                "when_present": self._name_in(naming, output.when_present) if output.when_present else None,
                "also_tied": [TiedTensor(name=self._name_in(naming, t.name), tied_to=self._name_in(naming, t.tied_to))
                              for t in output.also_tied],
            })
        return self.model_copy(update={"naming": naming, "rules": rules, "output": output})

    def _name_in(self, naming: str, name: str) -> str:
        """A tensor's name in another naming (refused when it has none there)."""
        rule = self._rule_named(name)
        col = rule.names.get(naming) if rule is not None else None
        if col is None or col.name is None or col.transpose:
            raise ValueError(f"preset {self.name!r}: the output head's tensor {name!r} has no {naming!r} name "
                             "of the same layout")
        return col.name

    def _rule_named(self, name: str) -> Rule | None:
        return next((r for r in self.rules if r.regex.fullmatch(name)), None)

    @field_validator("rules")
    @classmethod
    def _nonempty(cls, v: list[Rule]) -> list[Rule]:
        if not v:
            raise ValueError("a rules file needs at least one rule")
        return v
