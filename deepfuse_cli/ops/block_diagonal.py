"""``block_diagonal``: a kernel between two widened spaces (attention q/k/v/o, MLP in/out).

Each source sits on the diagonal of the two widened axes, in source order (n = 2)::

    [ W1  | N12 ]        W1, W2 on the diagonal,
    [ N21 | W2  ]        Nij zero, or low-variance noise (paper section 5.1)

Block (i, j) is block i along the first widened axis and block j along the second. With
``preserving`` noise (self-fusion) the diagonal subtracts, for every output block, the noise
that reaches it from the other input blocks::

    input-axis block a, output-axis block b:   a != b: N_ab     a == b: W - sum_{a' != b} N_a'b

so for an input made of n equal copies every output block is exactly ``x W``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import Executor

import torch

from .common import Tensor, exact_in_fp32, fused_shape, numel, offsets, row_step
from .noise import DrawnAhead, GaussianStream, NoiseStreams
from .registry import FuseContext, FusionOp, RuleView, register
from .ring import BufferRing


@register
class BlockDiagonal(FusionOp):
    name = "block_diagonal"
    description = "kernel between two widened spaces: sources on the diagonal, zeros (or noise) elsewhere"
    widened_count = 2
    takes_input_axis = True

    def check(self, rule: RuleView) -> None:
        widened = self.require_widened(rule)
        if rule.input_axis is None or rule.input_axis not in widened:
            raise ValueError("block_diagonal needs input_axis: the index of the widened axis that is the input")

    def rows(self, tensors: Sequence[Tensor], rule: RuleView, ctx: FuseContext) -> Iterator[Tensor]:
        noise = ctx.noise
        a0, a1 = rule.widened_axes
        return block_diagonal_rows(tensors, (a0, a1), noise=noise.stream if noise else None,
                                   preserving_input_axis=rule.input_axis if noise and noise.preserving else None,
                                   dtype=ctx.dtype, ring=ctx.buffers(), chunk_bytes=ctx.chunk_bytes, pool=ctx.pool)


def block_diagonal_rows(tensors: Sequence[Tensor], axes: tuple[int, int], noise: NoiseStreams | None = None,
                        preserving_input_axis: int | None = None, dtype: torch.dtype | None = None,
                        ring: BufferRing | None = None, chunk_bytes: int | None = None,
                        pool: Executor | None = None) -> Iterator[Tensor]:
    """Row blocks of the block-diagonal of ``tensors`` over ``axes``. ``noise(i, j, numel)`` gives the
    stream of block (i, j); zero off-diagonal blocks if None. ``preserving_input_axis`` (one of
    ``axes``) turns on compensation on the diagonal (see the module docstring).

    Zero stretches come from reused, already-zeroed ring buffers. With ``pool``, the noise of later
    block rows is drawn there (whole blocks, up to the ring's ``noise_ahead`` bytes) while this
    thread works on the first: the same values, on two cores."""
    dtype = dtype or tensors[0].dtype
    a0, a1 = axes
    if a0 == a1:
        raise ValueError("block_diagonal needs two different axes")
    if preserving_input_axis is not None and preserving_input_axis not in axes:
        raise ValueError("preserving_input_axis must be one of the block axes")
    ring = ring or BufferRing()
    n = len(tensors)
    shape = fused_shape([t.shape for t in tensors], axes)
    offs = {a0: offsets(tensors, a0), a1: offsets(tensors, a1)}
    noisy = noise is not None and n > 1
    step = row_step(shape, dtype, chunk_bytes)

    def block_shape(i: int, j: int, rows: int) -> tuple[int, ...]:
        s = list(tensors[0].shape)
        s[a0], s[a1] = tensors[i].shape[a0], tensors[j].shape[a1]
        s[0] = rows
        return tuple(s)

    def full_rows(i: int, j: int) -> int:  # axis-0 length of block (i, j)
        return tensors[i].shape[0] if a0 == 0 else tensors[j].shape[0] if a1 == 0 else shape[0]

    def index(i: int, j: int) -> tuple[slice, ...]:  # block (i, j) within a row block
        idx = [slice(None)] * len(shape)
        for ax, b in ((a0, i), (a1, j)):
            if ax != 0:
                idx[ax] = slice(offs[ax][b], offs[ax][b] + tensors[b].shape[ax])
        return tuple(idx)

    # Row segments: along a widened axis 0 each segment is one block index b on that axis (its blocks
    # are (b, j) or (i, b)); along a shared axis 0 one segment crosses every block.
    if 0 in axes:
        segments = [(b, tensors[b].shape[0]) for b in range(n)]
    else:
        segments = [(None, shape[0])]
    streams: dict[tuple[int, int], GaussianStream] = {}
    if noisy:
        streams = {(i, j): noise(i, j, numel(block_shape(i, j, full_rows(i, j))))
                   for i in range(n) for j in range(n) if i != j}
    if not noisy or 0 not in axes:
        pool = None  # one segment: nothing to draw ahead
    scratch: dict[object, Tensor] = {}
    layout = (tuple(axes), tuple(tuple(t.shape) for t in tensors))  # where the diagonal blocks sit

    def fp32(key: object, k: int) -> Tensor:
        buf = scratch.get(key)
        if buf is None or buf.numel() < k:
            buf = scratch[key] = torch.empty(k, dtype=torch.float32)
        return buf[:k]

    def segment_blocks(b: int | None) -> list[tuple[int, int]]:
        if b is None:
            return [(i, j) for i in range(n) for j in range(n)]
        return [(b, j) for j in range(n)] if a0 == 0 else [(i, b) for i in range(n)]

    def comp_keys(blocks: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Preserving noise from blocks outside a segment: their own stream, read in step with it."""
        keys = []
        if noisy and preserving_input_axis is not None:
            for m in (i for i, j in blocks if i == j):
                for other in range(n):
                    key = (other, m) if preserving_input_axis == a0 else (m, other)
                    if other != m and key not in blocks:
                        keys.append(key)
        return keys

    def whole(key: tuple[int, int]) -> Tensor:
        stream = noise(*key, numel(block_shape(*key, full_rows(*key))))
        return stream.take(stream.numel, out=ring.borrow(stream.numel))

    # segment -> (its off-diagonal streams, its comp streams, bytes reserved for them)
    ahead: dict[int, tuple[dict, dict, int]] = {}
    if noisy and pool is not None:
        for b, _ in segments[1:]:
            blocks = segment_blocks(b)
            keys = [k for k in blocks if k[0] != k[1]]
            comps = comp_keys(blocks)
            need = 4 * sum(numel(block_shape(*k, full_rows(*k))) for k in keys + comps)
            if not ring.reserve(need):
                break
            ahead[b] = ({k: DrawnAhead(pool.submit(whole, k)) for k in keys},
                        {k: DrawnAhead(pool.submit(whole, k)) for k in comps}, need)

    for b, size in segments:
        blocks = segment_blocks(b)
        diagonal = [i for i, j in blocks if i == j]
        drawn: list[DrawnAhead] = []
        reserved = 0
        if b in ahead:
            seg_streams, comp, reserved = ahead.pop(b)
            drawn = [*seg_streams.values(), *comp.values()]
        else:
            seg_streams = streams
            comp = {key: noise(*key, numel(block_shape(*key, full_rows(*key)))) for key in comp_keys(blocks)}
        for r0 in range(0, size, step):
            rows = min(step, size - r0)
            out_shape = (rows, *shape[1:])
            if not noisy:
                out, ready = ring.get(out_shape, dtype, key=("zeros", layout, out_shape, dtype, b))
                if not ready:
                    out.zero_()
                for m in diagonal:
                    out[index(m, m)].copy_(tensors[m].narrow(0, r0, rows))
                yield out
                continue
            out, _ = ring.get(out_shape, dtype)
            got: dict[tuple[int, int], Tensor] = {}
            for i, j in blocks:
                if i != j:
                    bs = block_shape(i, j, rows)
                    got[(i, j)] = seg_streams[(i, j)].take(numel(bs), out=fp32((i, j), numel(bs))).view(bs)
                    out[index(i, j)].copy_(got[(i, j)])
            for m in diagonal:
                src = tensors[m].narrow(0, r0, rows)
                if preserving_input_axis is None:
                    out[index(m, m)].copy_(src if exact_in_fp32(src.dtype) else src.to(torch.float32))
                    continue
                diag = fp32(("diag", m), src.numel()).view(src.shape)
                diag.copy_(src)
                for other in range(n):
                    if other == m:
                        continue
                    key = (other, m) if preserving_input_axis == a0 else (m, other)
                    nz = got.get(key)
                    if nz is None:
                        nz = comp[key].take(diag.numel(), out=fp32(("comp", key), diag.numel())).view(diag.shape)
                    diag.sub_(nz)
                out[index(m, m)].copy_(diag)
            yield out
        for d in drawn:  # their noise is placed: the buffers can take later blocks' noise
            ring.give_back(d.result())
        ring.release(reserved)
