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

``expert_stack_out``: the same experts stored stacked, as transformers holds them in its modules
(``experts.down_proj`` [E, d, I]; ``save_pretrained(save_original_format=False)`` writes it). The
experts and hidden axes are both widened, so it is ``block_diagonal`` over them of the sources
times n (``experts.gate_up_proj`` [E, 2I, d] is a plain ``block_diagonal``, input axis hidden). Its
``input_axis`` is the experts axis: the blocks of every source's experts add up in each hidden slice
(weighted by the routing), so preserving noise compensates along it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from .block_diagonal import BlockDiagonal, block_diagonal_rows
from .common import Tensor, work_dtype
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


@register
class ExpertStackOut(BlockDiagonal):
    name = "expert_stack_out"
    description = ("stacked experts' output kernels [E, d, I]: block-diagonal over experts and hidden of the "
                   "sources times n (input_axis: the experts axis)")

    def rows(self, tensors: Sequence[Tensor], rule: RuleView, ctx: FuseContext) -> Iterator[Tensor]:
        n = len(tensors)
        scaled: dict[int, Tensor] = {}  # a self-fusion's n copies are one tensor: scaled once
        for t in tensors:
            if id(t) not in scaled:
                scaled[id(t)] = t.to(work_dtype(t.dtype)) * float(n)
        noise = ctx.noise
        return block_diagonal_rows([scaled[id(t)] for t in tensors], tuple(rule.widened_axes),
                                   noise=noise.stream if noise else None,
                                   preserving_input_axis=rule.input_axis if noise and noise.preserving else None,
                                   dtype=ctx.dtype, ring=ctx.buffers(), chunk_bytes=ctx.chunk_bytes, pool=ctx.pool)
