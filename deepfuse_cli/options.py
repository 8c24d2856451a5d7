"""Options, typed once: the choices as ``str`` enums and one validated, frozen model per command.

The CLI hands every option to :meth:`Options.parse` as it came from the command line; each rule
(noise >= 0, one positive weight per source, ...) is checked here and nowhere else, and a value
that breaks one becomes one :class:`~deepfuse_cli.errors.UsageError` line naming its flag
(``--noise-std -1.0: noise must be a finite number >= 0``). The enum members are their strings
(``options.norm == "prop"``, ``f"{options.norm}"`` is ``prop``, JSON writes ``"prop"``), so the
plan and the manifest record plain strings.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Annotated, Any, ClassVar

import torch
from pydantic import (BaseModel, ByteSize, ConfigDict, Field, ValidationError, ValidationInfo, WrapValidator,
                      field_serializer, field_validator, model_validator)

from .errors import UsageError


class Choice(str, Enum):
    """A choice among strings: equal to its value, and printed as it."""

    def __str__(self) -> str:
        return self.value


class NormMode(Choice):
    rule = "rule"  # norms over the concatenated hidden state (stock runtime)
    prop = "prop"  # grouped norms, one per source block (exact)


class NoiseMode(Choice):
    offdiag = "offdiag"  # noise off the diagonal blocks only
    preserving = "preserving"  # self-fusion: compensated on the diagonal, function unchanged


class OptimizerState(Choice):
    drop = "drop"  # parameters only: restore with a fresh optimizer
    fuse = "fuse"  # widened and scaled as the first fused gradients


class ConvertState(Choice):
    """``deepfuse convert``: the optimizer state is kept (carried unchanged) or dropped."""

    keep = "keep"
    drop = "drop"


class DType(Choice):
    keep = "keep"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"

    @property
    def torch(self) -> torch.dtype | None:
        return None if self is DType.keep else getattr(torch, self.value)


DTYPES = {d.value: d.torch for d in DType if d is not DType.keep}


class OptionError(ValueError):
    """A broken option rule, raised in a validator: ``field`` names the option when pydantic cannot
    (rules over several fields), ``hint`` says what to do."""

    def __init__(self, message: str, field: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.field = field
        self.hint = hint


def _size(value: Any, handler) -> ByteSize:
    try:
        size = handler(value)
    except ValidationError:
        size = None
    if size is None or size <= 0:
        raise OptionError("is not a size", hint="e.g. 5GB (decimal, as huggingface_hub counts), 500MB, 4GiB or a "
                          "number of bytes")
    return size


#: Bytes, > 0: '5GB' (decimal, as huggingface_hub counts), '4GiB' (binary) or a number of bytes.
Size = Annotated[ByteSize, WrapValidator(_size)]


def _check_weight(w: float) -> None:
    if not (w > 0) or math.isinf(w):
        raise OptionError(f"{w} is not a positive finite number", field="weights", hint="weights must be > 0")


class Options(BaseModel):
    """Base of the option models: frozen, unknown fields refused, errors named by flag."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    #: field -> its flag, where that is not ``--field-name``
    FLAGS: ClassVar[dict[str, str]] = {}

    @classmethod
    def flag(cls, field: str) -> str:
        return cls.FLAGS.get(field, "--" + field.replace("_", "-"))

    @classmethod
    def parse(cls, context: dict[str, Any] | None = None, /, **values: Any):
        """The model of ``values`` (options as given on the command line), or a UsageError naming the flag."""
        try:
            return cls.model_validate(values, context=context)
        except ValidationError as exc:
            message, hint = cls.explain(exc, values)
            raise UsageError(message, hint) from None

    @classmethod
    def explain(cls, exc: ValidationError, values: dict[str, Any]) -> tuple[str, str | None]:
        """One line for the first error: ``--flag VALUE: what is wrong`` (or ``--flag VALUE is not ...``),
        and a hint if there is one."""
        err = exc.errors()[0]
        cause = (err.get("ctx") or {}).get("error")
        loc = [part for part in err["loc"] if isinstance(part, str)]
        field = loc[0] if loc else getattr(cause, "field", None)
        text = str(cause) if isinstance(cause, Exception) else err["msg"]
        text = text[:1].lower() + text[1:]
        hint = getattr(cause, "hint", None)
        if field is None or text.startswith(cls.flag(field)):
            return text, hint
        sep = " " if text.startswith("is ") else ": "  # a predicate reads on from the value
        return f"{cls.flag(field)}{_quoted(values.get(field))}{sep}{text}", hint


def _quoted(value: Any) -> str:
    """A value as an error message shows it after its flag: text quoted, numbers and choices as they are."""
    if value is None or isinstance(value, bool):
        return ""
    return f" {value!r}" if isinstance(value, str) and not isinstance(value, Enum) else f" {value}"


class FuseOptions(Options):
    """How sources are fused (``fuse``, ``self-fuse``, ``plan``, ``convert``; read back by ``verify``).

    Weights: parsed with ``context={"sources": n}`` (the CLI), they are the user's (a list or
    comma-separated text, or None for equal weights), one positive finite number per source,
    normalised to sum 1 (``weights_rescaled`` when they did not already). Without that context
    they are the weights a fusion ran with (a manifest, code): checked, and kept bit for bit.
    """

    FLAGS: ClassVar[dict[str, str]] = {"output_format": "--to"}

    weights: tuple[float, ...]
    weights_rescaled: bool = False
    norm: NormMode = NormMode.rule
    noise_std: float = 0.0
    noise_scale: float = 0.0
    noise_mode: NoiseMode = NoiseMode.offdiag
    seed: int = 0
    dtype: torch.dtype | None = None  # None: keep the sources' dtype (given as a DType, its name, or a torch dtype)
    max_shard_size: Size = Field(default="5GB", validate_default=True)
    max_memory: Size | None = None  # refuse to start unless the run's peak estimate fits
    self_fusion: bool = False
    allow_nonfinite: bool = False  # fuse sources holding NaN/Inf (reported) instead of refusing
    output_format: str | None = None  # as given to --to ("safetensors", "t5x", "orbax"); None: the first source's
    optimizer_state: OptimizerState = OptimizerState.drop  # T5X/Orbax optimizer state
    convert_only: bool = False  # one source, every op the identity (``deepfuse convert``)

    @model_validator(mode="before")
    @classmethod
    def _user_input(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("convert_only") and data.get("optimizer_state") == ConvertState.keep:
            data["optimizer_state"] = OptimizerState.fuse  # one source, weight 1: the state is carried unchanged
        n = (info.context or {}).get("sources")
        if n is not None:
            data["weights"], data["weights_rescaled"] = _normalise(data.get("weights"), n)
        return data

    @field_validator("weights")
    @classmethod
    def _weights(cls, weights: tuple[float, ...]) -> tuple[float, ...]:
        if not weights:
            raise OptionError("no weights: give one per source")
        for w in weights:
            _check_weight(w)
        if abs(sum(weights) - 1.0) > 1e-6:
            raise OptionError(f"weights sum to {sum(weights):.6g}, not 1")
        return weights

    @field_validator("noise_std", "noise_scale")
    @classmethod
    def _noise(cls, value: float) -> float:
        if not (value >= 0) or math.isinf(value):
            raise OptionError("noise must be a finite number >= 0")
        return value

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype(cls, value: Any) -> torch.dtype | None:
        if value is None or (isinstance(value, torch.dtype) and value in DTYPES.values()):
            return value
        try:
            return DType(value).torch
        except ValueError:
            raise OptionError(f"choose {', '.join(d.value for d in DType)}") from None

    @field_serializer("dtype")
    def _dtype_name(self, dtype: torch.dtype | None) -> str:
        return DType.keep.value if dtype is None else str(dtype).removeprefix("torch.")

    @model_validator(mode="after")
    def _consistent(self) -> FuseOptions:
        if self.noise_std > 0 and self.noise_scale > 0:
            raise OptionError("give --noise-std or --noise-scale, not both")
        if self.noise_mode == NoiseMode.preserving and not self.self_fusion:
            raise OptionError("applies to self-fusion only", field="noise_mode",
                              hint="use `deepfuse self-fuse`, or --noise-mode offdiag for different sources")
        if self.convert_only and len(self.weights) != 1:
            raise OptionError("a conversion takes exactly one source")
        return self

    @property
    def noisy(self) -> bool:
        return self.noise_std > 0 or self.noise_scale > 0

    def describe_noise(self) -> dict[str, Any]:
        return {"std": self.noise_std, "scale": self.noise_scale,
                "mode": self.noise_mode.value if self.noisy else "none"}


def _normalise(raw: Any, n: int) -> tuple[tuple[float, ...], bool]:
    """The user's weights (None, a list, or comma-separated text) for ``n`` sources, summing to 1."""
    if raw is None:
        return tuple([1.0 / n] * n), False
    try:
        raw = [float(w) for w in ([x for x in raw.split(",") if x.strip()] if isinstance(raw, str) else raw)]
    except (TypeError, ValueError):
        raise OptionError("not a comma-separated list of numbers", field="weights",
                          hint="e.g. --weights 0.25,0.75") from None
    if len(raw) != n:
        raise OptionError(f"--weights has {len(raw)} values for {n} sources", field="weights",
                          hint="give one positive weight per source")
    for w in raw:
        _check_weight(w)
    total = sum(raw)
    if total == float("inf"):
        raise OptionError("the sum overflows", field="weights", hint="use weights of a sensible size, e.g. 1,3")
    return tuple(w / total for w in raw), abs(total - 1.0) > 1e-9
