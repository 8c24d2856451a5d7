"""``bias_average``: the bias of the output projection (no widened axis).

    b = w_1 b_1 + w_2 b_2 + ... + w_n b_n        summed in fp32 (or wider), in source order

A vector of logits' size: produced as one block.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .common import Tensor, fused_shape, work_dtype
from .registry import FuseContext, FusionOp, RuleView, register


@register
class BiasAverage(FusionOp):
    name = "bias_average"
    description = "bias of the output projection: weighted average sum_m w_m b_m"
    widened_count = 0
    scales_gradients = False

    def rows(self, tensors: Sequence[Tensor], rule: RuleView, ctx: FuseContext) -> Iterator[Tensor]:
        shape = fused_shape([t.shape for t in tensors], [])
        acc = torch.zeros(shape, dtype=work_dtype(*(t.dtype for t in tensors)))
        for w, t in zip(ctx.weights, tensors, strict=True):
            acc += w * t.to(acc.dtype)
        return iter([acc.to(ctx.dtype)])
