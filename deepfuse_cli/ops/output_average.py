"""``output_average``: the projection to logits (lm_head [V, d], logits_dense [d, V]).

Concatenated along the hidden axis, source m's block scaled by s_m = w_m x its output scale::

    [ s_1 W_1 | s_2 W_2 | ... | s_n W_n ]    applied to [h_1; ...; h_n]: sum_m s_m W_m h_m

which is the weighted average of the sources' logits.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from .common import Tensor
from .concat import concat_rows
from .registry import FuseContext, FusionOp, RuleView, register


@register
class OutputAverage(FusionOp):
    name = "output_average"
    description = "projection to logits: concatenate along the hidden axis, source m scaled by w_m"
    widened_count = 1
    scales_gradients = False
    averages_outputs = True

    def check(self, rule: RuleView) -> None:
        (axis,) = self.require_widened(rule)
        if rule.axes[axis] not in ("hidden", "proj"):  # 'proj': the embedding width where it is not the hidden size
            raise ValueError("output_average concatenates along a 'hidden' axis (or 'proj', the embedding width)")

    def rows(self, tensors: Sequence[Tensor], rule: RuleView, ctx: FuseContext) -> Iterator[Tensor]:
        return concat_rows(tensors, rule.widened_axes[0], scales=ctx.scales, dtype=ctx.dtype, ring=ctx.buffers(),
                           chunk_bytes=ctx.chunk_bytes)
