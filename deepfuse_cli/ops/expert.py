"""``expert_in`` / ``expert_out``: one mixture-of-experts expert of one source, in the fused model.

The fused model has every source's experts (E_1 + ... + E_n of them). Fused expert (m, j) is source
m's expert j, reading only source m's slice of the hidden state and writing only into it. The plan
gives such a tensor one real source (source m's expert j) and, for every other source m', zeros of
that source's width; the op places them side by side along the one widened (hidden) axis::

    expert_in   (gate/up, [I, d]):   [ 0 | W_mj | 0 ]                 reads slice m only
    expert_out  (down, [d, I]):      [ 0 ; n * W_mj ; 0 ]             writes slice m only

``expert_out`` scales by n, the number of sources: the router of the fused model routes each token to
n times as many experts with 1/n of the weight each. With n equal copies (self-fusion) its softmax
gives each of the n copies of source expert j the probability p_j / n, and with the top-k weights
renormalised each copy gets w_j / n; so slice m receives (w_j / n) * n * E_j(x) = w_j E_j(x), the
source's own output. The grouped router (``grouped_norm.apply_grouped_norms``) gives w_j / n too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from .common import Tensor
from .concat import concat_rows
from .registry import FuseContext, FusionOp, RuleView, register


@register
class ExpertIn(FusionOp):
    name = "expert_in"
    description = "an expert's input kernel: one source's expert in its slice of the hidden axis, zeros elsewhere"
    widened_count = 1

    def rows(self, tensors: Sequence[Tensor], rule: RuleView, ctx: FuseContext) -> Iterator[Tensor]:
        return concat_rows(tensors, rule.widened_axes[0], dtype=ctx.dtype, ring=ctx.buffers(),
                           chunk_bytes=ctx.chunk_bytes)


@register
class ExpertOut(FusionOp):
    name = "expert_out"
    description = ("an expert's output kernel: one source's expert in its slice of the hidden axis, zeros "
                   "elsewhere, times n (the fused router gives each expert 1/n of its source's weight)")
    widened_count = 1

    def rows(self, tensors: Sequence[Tensor], rule: RuleView, ctx: FuseContext) -> Iterator[Tensor]:
        n = len(tensors)
        return concat_rows(tensors, rule.widened_axes[0], scales=[float(n)] * n, dtype=ctx.dtype,
                           ring=ctx.buffers(), chunk_bytes=ctx.chunk_bytes)
