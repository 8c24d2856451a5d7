"""``shared_average``: one tensor every source applies in the same place but that cannot be widened
(Qwen3's per-head q_norm/k_norm: one [head_dim] scale shared by all heads of the model).

    T = T_1 + w_2 (T_2 - T_1) + ... + w_n (T_n - T_1)        (= sum_m w_m T_m, as the w_m sum to 1)

summed in fp32 (or wider), in source order. Written this way the value is T_1 bit for bit when the
sources agree (self-fusion is exact in the stock runtime); for different sources it is their weighted
average, which a stock runtime applies to every head (approximate), while grouped norms apply each
source's own scale to that source's heads (exact, see ``grouped_norm``). Produced as one block.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from .common import Tensor, fused_shape, work_dtype
from .registry import FuseContext, FusionOp, RuleView, register


@register
class SharedAverage(FusionOp):
    name = "shared_average"
    description = "one shared tensor: source 1 when the sources agree, else the weighted average sum_m w_m T_m"
    widened_count = 0

    def rows(self, tensors: Sequence[Tensor], rule: RuleView, ctx: FuseContext) -> Iterator[Tensor]:
        fused_shape([t.shape for t in tensors], [])
        first = tensors[0]
        acc = first.to(work_dtype(*(t.dtype for t in tensors))).clone()
        for w, t in zip(list(ctx.weights)[1:], tensors[1:], strict=True):
            acc += w * (t.to(acc.dtype) - first.to(acc.dtype))
        return iter([acc.to(ctx.dtype)])
