"""The plan as data: what ``deepfuse plan --json`` prints and a fuse records, as typed models.

:class:`deepfuse_cli.plan.Plan` is the live plan (it holds the opened sources); these frozen
pydantic models are its JSON form, validated and round-tripped through the same class
(``PlanRecord.model_validate_json(text)``), so a consumer never reads it with ``.get`` chains.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoiseRecord(_Record):
    std: float = Field(ge=0)
    scale: float = Field(ge=0)
    mode: str = Field(description="offdiag, preserving, or none")


class TensorRecord(_Record):
    """One output tensor: its rule, sources and fused shape, dtype and bytes."""

    name: str
    rule: int = Field(ge=0, description="index of its rule in the preset")
    pattern: str
    op: str
    axes: list[str]
    source_shapes: list[list[int]]
    shape: list[int]
    dtype: str
    bytes: int = Field(ge=0)
    noise: bool


class PlanRecord(_Record):
    preset: str
    preset_digest: str
    output_format: str
    sources: list[str]
    n: int = Field(ge=1)
    self_fusion: bool
    weights: list[float]
    weights_rescaled: bool
    norm: str
    norm_groups: list[int]
    noise: NoiseRecord
    seed: int
    tied_sources: list[bool]
    output_scales: list[float]
    tensors: list[TensorRecord]
    total_bytes: int = Field(ge=0)
    largest_tensor_bytes: int = Field(ge=0)
    peak_memory_bytes: int = Field(ge=0)
    disk_needed_bytes: int = Field(ge=0)
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
