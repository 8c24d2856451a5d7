"""The manifest (``deepfuse.json``): what a run executed, written by ``fuse`` and read by ``verify``.

One typed model for both directions: ``fuse`` builds a :class:`Manifest` and writes
:meth:`Manifest.dumps`; ``verify`` reads it back with :meth:`Manifest.read`, so a field of the wrong
type (a seed that is a string) or an unknown key is one clean error, never a traceback deep in
verify. The JSON is the model's dump with sorted keys: writing a manifest that was read gives the
same bytes.

Nothing in a manifest is executed: ``rules`` is kept as plain JSON data and only ever compared (by
digest) with the built-in presets; its patterns are never compiled (see ``verify``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import InputError
from .untrusted import MAX_JSON_DEPTH, json_depth_exceeds, read_text, validation_summary


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class HubRecord(_Record):
    """Where a source given as a Hugging Face Hub id came from."""

    repo_id: str
    revision: str | None = None  # as given after '@' (None: the default branch)
    commit: str  # the commit hash of the snapshot read


class SourceRecord(_Record):
    path: str  # the source's real path when it was fused (a Hub source: its snapshot in the cache)
    format: Literal["hf", "safetensors", "torch", "t5x", "orbax"]
    step: int | None = None  # T5X/Orbax step read
    files: dict[str, str]  # weight file (relative to ``path``, or the file's real path) -> sha256
    hub: HubRecord | None = None  # a Hub id's repository, revision and commit; absent for a local path


class ConversionRecord(_Record):
    renamed: int = Field(ge=0)
    transposed: list[str]
    dropped: list[str]


class NormRecord(_Record):
    mode: Literal["rule", "prop"]
    groups: list[int]


class NoiseRecord(_Record):
    std: float = Field(ge=0, allow_inf_nan=False)
    scale: float = Field(ge=0, allow_inf_nan=False)
    mode: Literal["offdiag", "preserving", "none"]


class NonfiniteRecord(_Record):
    source: int = Field(ge=1)  # 1-based
    file: str
    tensor: str
    count: int = Field(ge=1)


class Manifest(_Record):
    deepfuse_version: str
    kind: Literal["fusion", "self-fusion", "conversion"]
    output_format: Literal["hf", "t5x", "orbax"] | None = None
    conversion: ConversionRecord | None = None
    optimizer_state: Literal["drop", "fuse"] | None = None  # None: the sources had none
    n: int = Field(ge=1)
    sources: list[SourceRecord]
    preset: str
    preset_digest: str
    rules: dict[str, Any]  # the preset as JSON data: compared by digest, never compiled
    weights: list[float]
    output_scales: list[float]
    tied_sources: list[bool]
    norm: NormRecord
    noise: NoiseRecord
    seed: int
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # None: the sources' dtypes kept
    plan_digest: str
    nonfinite: list[NonfiniteRecord] = []
    files: dict[str, str]  # every output file (relative) -> sha256

    @model_validator(mode="after")
    def _one_per_source(self) -> Manifest:
        for field in ("sources", "weights", "output_scales", "tied_sources"):
            if len(getattr(self, field)) != self.n:
                raise ValueError(f"{field} has {len(getattr(self, field))} entries for n = {self.n}")
        return self

    def dumps(self) -> str:
        """The manifest file's text (sorted keys, two-space indent, final newline)."""
        data = self.model_dump(mode="json")
        for source in data["sources"]:  # recorded only for Hub sources: a local source's record is as it was
            if source.get("hub") is None:
                source.pop("hub", None)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def read(cls, path: Path) -> Manifest:
        """Read and validate ``path``; anything wrong is one InputError naming the file."""
        text = read_text(path, what="the manifest")
        hint = "pass --sources (and --rules) to verify without it"
        if json_depth_exceeds(text):
            raise InputError(f"{path}: invalid manifest: JSON nested deeper than {MAX_JSON_DEPTH} levels", hint)
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise InputError(f"{path}: invalid manifest: {validation_summary(exc)}", hint) from None
