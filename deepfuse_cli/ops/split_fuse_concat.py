"""``split_fuse_concat``: a fused projection holding several parts (GPT-2's ``c_attn`` q|k|v).

The 'qkv' axis of every source is split into ``parts`` pieces (equal, or of the sizes the roles
named by ``parts`` have in that source: Phi-3's ``qkv_proj`` under grouped-query attention is
[heads, kv, kv], q wider than k and v); piece p of all sources is
fused on its own (block-diagonal over two widened axes, or concatenated over one), and the fused
pieces are concatenated back along the 'qkv' axis (GPT-2 Conv1D [d, 3d], n = 2)::

           q            k            v
    [ Q1 | 0  ]  [ K1 | 0  ]  [ V1 | 0  ]        noise of part p keyed (p, i, j)
    [ 0  | Q2 ]  [ 0  | K2 ]  [ 0  | V2 ]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

import torch

from .block_diagonal import BlockDiagonal
from .common import FusionMismatch, Shape, Tensor, fused_shape
from .concat import Concat
from .registry import FuseContext, FusionOp, RuleView, register
from .ring import BufferRing


@register
class SplitFuseConcat(FusionOp):
    name = "split_fuse_concat"
    description = "fused projection (e.g. q|k|v): split the 'parts' axis, fuse each part, concatenate back"
    takes_input_axis = True
    takes_parts = True

    def check(self, rule: RuleView) -> None:
        if rule.axes.count("qkv") != 1 or rule.parts is None:
            raise ValueError("split_fuse_concat needs exactly one 'qkv' axis and 'parts'")
        widened = rule.widened_axes
        if len(widened) not in (1, 2):
            raise ValueError("split_fuse_concat needs 1 or 2 widened axes (the 'qkv' axis included)")
        if len(widened) == 2 and (rule.input_axis is None or rule.input_axis not in widened):
            raise ValueError("split_fuse_concat over two widened axes needs input_axis")

    def shape(self, shapes: Sequence[Sequence[int]], rule: RuleView) -> Shape:
        out = fused_shape(shapes, rule.widened_axes)
        if not isinstance(rule.parts, list):  # sized parts are checked against the sources' configs by the plan
            _check_parts(shapes, rule.axes.index("qkv"), _parts(rule))
        return out

    def rows(self, tensors: Sequence[Tensor], rule: RuleView, ctx: FuseContext) -> Iterator[Tensor]:
        split_axis = rule.axes.index("qkv")
        if isinstance(rule.parts, list):
            return _sized_rows(tensors, rule, ctx, split_axis)
        parts = _parts(rule)
        _check_parts([t.shape for t in tensors], split_axis, parts)
        pieces = [torch.chunk(t, parts, dim=split_axis) for t in tensors]
        # the rule read by the inner op: its widened axes are the 'qkv' axis, and the input axis if any
        inner = _BLOCK_DIAGONAL if len(rule.widened_axes) == 2 else _CONCAT

        def fused_part(k: int, ring: BufferRing) -> Iterator[Tensor]:
            noise = None if ctx.noise is None else ctx.noise.part(k)
            # parts are not scaled (this op does not take per-source factors)
            return inner.rows([p[k] for p in pieces], rule, replace(ctx, ring=ring, noise=noise, scales=None))

        return _concat_parts(fused_part, split_axis, parts, ctx)


_BLOCK_DIAGONAL, _CONCAT = BlockDiagonal(), Concat()


def _parts(rule: RuleView) -> int:
    if rule.parts is None:
        raise ValueError("split_fuse_concat needs 'parts'")
    return rule.parts if isinstance(rule.parts, int) else len(rule.parts)


def check_part_sizes(shapes: Sequence[Sequence[int]], axis: int, sizes: Sequence[Sequence[int]]) -> None:
    """Each source's part sizes (``sizes[m][p]``) tile its 'qkv' axis."""
    if len(sizes) != len(shapes):
        raise ValueError(f"part sizes for {len(sizes)} sources, {len(shapes)} given")
    for m, (s, parts) in enumerate(zip(shapes, sizes, strict=True)):
        if any(p < 0 for p in parts) or sum(parts) != s[axis]:
            raise FusionMismatch(f"axis {axis} ({s[axis]}) is not its parts {' + '.join(map(str, parts))}", source=m)


def _sized_rows(tensors: Sequence[Tensor], rule: RuleView, ctx: FuseContext, split_axis: int) -> Iterator[Tensor]:
    """Parts of the sizes ``ctx.part_sizes`` gives per source, each fused, concatenated back."""
    sizes = ctx.part_sizes
    if sizes is None:
        raise ValueError("split_fuse_concat with parts named by role needs each source's part sizes")
    check_part_sizes([t.shape for t in tensors], split_axis, sizes)
    parts = len(sizes[0])
    pieces = [torch.split(t, list(s), dim=split_axis) for t, s in zip(tensors, sizes, strict=True)]
    inner = _BLOCK_DIAGONAL if len(rule.widened_axes) == 2 else _CONCAT

    def fused_part(k: int, ring: BufferRing) -> Iterator[Tensor]:
        noise = None if ctx.noise is None else ctx.noise.part(k)
        return inner.rows([p[k] for p in pieces], rule, replace(ctx, ring=ring, noise=noise))

    if split_axis == 0:
        return _concat_parts(fused_part, split_axis, parts, ctx)
    return _concat_unequal_columns(fused_part, split_axis, parts, ctx)


def _check_parts(shapes: Sequence[Sequence[int]], axis: int, parts: int) -> None:
    for m, s in enumerate(shapes):
        if s[axis] % parts:
            raise FusionMismatch(f"axis {axis} ({s[axis]}) does not split into {parts} equal parts", source=m)


def _concat_parts(fused_part: Callable[[int, BufferRing], Iterator[Tensor]], split_axis: int, parts: int,
                  ctx: FuseContext) -> Iterator[Tensor]:
    """The fused parts' row blocks concatenated back along ``split_axis`` (every part has the same
    row partition: the parts have equal shapes)."""
    ring = ctx.buffers()
    if split_axis == 0:
        for k in range(parts):
            yield from fused_part(k, ring)
        return
    gens = [fused_part(k, BufferRing(2)) for k in range(parts)]
    for blocks in zip(*gens, strict=True):
        out_shape = list(blocks[0].shape)
        out_shape[split_axis] = sum(b.shape[split_axis] for b in blocks)
        out, _ = ring.get(out_shape, ctx.dtype)
        torch.cat(blocks, dim=split_axis, out=out)
        yield out


def _concat_unequal_columns(fused_part: Callable[[int, BufferRing], Iterator[Tensor]], split_axis: int, parts: int,
                            ctx: FuseContext) -> Iterator[Tensor]:
    """The fused parts side by side along ``split_axis`` (not axis 0) when their row blocks may be cut
    at different rows (parts of different widths): each output block takes the rows every part still
    has in its current block. A part's block is done with before its next one is asked for."""
    ring = ctx.buffers()
    gens = [fused_part(k, BufferRing(2)) for k in range(parts)]
    current: list[Tensor | None] = [None] * parts
    used = [0] * parts
    while True:
        for k in range(parts):
            if current[k] is None or used[k] == current[k].shape[0]:
                current[k], used[k] = next(gens[k], None), 0
        if any(c is None for c in current):
            if not all(c is None for c in current):
                raise RuntimeError("the fused parts have different row counts")
            return
        rows = min(c.shape[0] - u for c, u in zip(current, used, strict=True))
        blocks = [c.narrow(0, u, rows) for c, u in zip(current, used, strict=True)]
        out_shape = list(blocks[0].shape)
        out_shape[split_axis] = sum(b.shape[split_axis] for b in blocks)
        out, _ = ring.get(out_shape, ctx.dtype)
        torch.cat(blocks, dim=split_axis, out=out)
        used = [u + rows for u in used]
        yield out
