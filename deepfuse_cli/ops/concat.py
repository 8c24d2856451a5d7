"""``concat``: one widened axis (biases, norm scales, embeddings along d, heads of a bias).

The sources follow each other along the widened axis, in source order (here axis 1)::

    [ T1 | T2 | ... | Tn ]        each source optionally scaled by its own factor (in fp32)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .common import Tensor, fused_shape, offsets, row_step, work_dtype
from .registry import FuseContext, FusionOp, RuleView, register
from .ring import BufferRing


@register
class Concat(FusionOp):
    name = "concat"
    description = "one widened axis: concatenate the sources along it"
    widened_count = 1
    takes_scales = True

    def rows(self, tensors: Sequence[Tensor], rule: RuleView, ctx: FuseContext) -> Iterator[Tensor]:
        return concat_rows(tensors, rule.widened_axes[0], scales=ctx.scales, dtype=ctx.dtype, ring=ctx.buffers(),
                           chunk_bytes=ctx.chunk_bytes)


def concat_rows(tensors: Sequence[Tensor], axis: int, scales: Sequence[float] | None = None,
                dtype: torch.dtype | None = None, ring: BufferRing | None = None,
                chunk_bytes: int | None = None) -> Iterator[Tensor]:
    """Row blocks of ``tensors`` concatenated along ``axis``, source m scaled by ``scales[m]`` (in
    fp32 or wider). Along axis 0 the row blocks are the sources' own rows, without a copy when no
    conversion is needed."""
    dtype = dtype or tensors[0].dtype
    ring = ring or BufferRing()
    shape = fused_shape([t.shape for t in tensors], [axis])
    step = row_step(shape, dtype, chunk_bytes)

    def place(dst: Tensor, src: Tensor, scale: float | None) -> None:
        if scale is None or scale == 1.0:
            dst.copy_(src)
        else:
            work = work_dtype(src.dtype)
            if dst.dtype == work:
                dst.copy_(src)
                dst.mul_(scale)
            else:
                dst.copy_(src.to(work) * scale)

    if axis == 0:
        for m, t in enumerate(tensors):
            scale = None if scales is None else scales[m]
            plain = (scale is None or scale == 1.0) and t.dtype == dtype and t.is_contiguous()
            for r0 in range(0, t.shape[0], step):
                rows = t.narrow(0, r0, min(step, t.shape[0] - r0))
                if plain:
                    yield rows
                    continue
                out, _ = ring.get(rows.shape, dtype)
                place(out, rows, scale)
                yield out
        return
    offs = offsets(tensors, axis)
    for r0 in range(0, shape[0], step):
        rows = min(step, shape[0] - r0)
        out, _ = ring.get((rows, *shape[1:]), dtype)
        for m, t in enumerate(tensors):
            place(out.narrow(axis, offs[m], t.shape[axis]), t.narrow(0, r0, rows),
                  None if scales is None else scales[m])
        yield out
