"""``passthrough_identical``: a tensor every source must hold unchanged (e.g. a buffer).

    T_1 == T_2 == ... == T_n   ->   T_1        checked element by element, copied once

Any dtype (integer buffers included); produced as one block.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .common import FusionMismatch, Tensor
from .registry import FuseContext, FusionOp, RuleView, register


@register
class PassthroughIdentical(FusionOp):
    name = "passthrough_identical"
    description = "must be identical in every source (e.g. a buffer): copied once"
    widened_count = 0
    any_dtype = True

    def rows(self, tensors: Sequence[Tensor], rule: RuleView, ctx: FuseContext) -> Iterator[Tensor]:
        ref = tensors[0]
        for m, t in enumerate(tensors[1:], start=2):
            if t.shape != ref.shape or not torch.equal(t.to(ref.dtype), ref):
                raise FusionMismatch(f"source {m} differs from source 1, but this tensor must be identical",
                                     hint="this tensor must be identical in every source")
        return iter([ref.to(ctx.dtype)])
