"""The blocks of a fused tensor, written from the mathematics of Deep Fusion (DESIGN sections 2-4).

This is verify's own statement of what each rule op means; it shares no code with the fusion
ops that write checkpoints, so a wrong axis, scale or block in them shows up here as a
difference. For each op, one small function lists the blocks of the fused tensor (in the plan's
layout, i.e. the sources' naming and axis order) and what every block must equal: a sum of
*terms*, evaluated in fp32 (wider when a source is wider) and cast to the tensor's dtype::

    term = coef * (a region of source m)     or     coef * (the seeded noise of block key)

``block_diagonal`` with n = 2 (both axes widened; a0 is the first, a1 the second)::

                 a1: block 1     a1: block 2
    a0: block 1 [  W1          |  N(1,2)      ]
    a0: block 2 [  N(2,1)      |  W2          ]

* no noise: N(i,j) = 0; ``offdiag`` noise: N(i,j) = std * the Gaussian stream seeded by
  (seed, tensor name, (i, j)), in row-major order over the block (DESIGN section 4);
* ``preserving`` noise (self-fusion): input block a reaches output block b through the block at
  input-axis block a and output-axis block b, written N[a -> b] (key (a, b) when the input axis is
  a0, (b, a) when it is a1). So that n equal input copies give each output block exactly ``x W``,
  the diagonal is ``W_b - sum_{a != b} N[a -> b]`` (subtracted one block at a time, in source order).

``concat``: slice m of the widened axis is source m (times r_m / r_fused for a rule whose tensor the
runtime multiplies by r(config)). ``split_fuse_concat``: the 'qkv' axis holds
``parts`` equal parts (GPT-2's q|k|v), or parts of the sizes the plan read from each source's config
for the roles ``parts`` names (Phi-3's [heads, kv, kv]); part p of the fused tensor starts where the
fused parts before it end, and is the block-diagonal (noise keys (p, i, j)) or the concatenation of
part p of every source. ``output_average``: slice m of the
hidden axis is ``w_m x output_scale_m x source m`` (the average of logits). ``bias_average``:
``sum_m w_m b_m``. ``passthrough_identical``: source 1. ``shared_average``: source 1 plus
``w_m (source m - source 1)`` for every later source (their weighted average; source 1 when they agree).

An op without an entry in :data:`DECOMPOSITIONS` cannot be verified: :func:`decompose` raises
:class:`CannotDecompose`, which the tensor-level check reports as a failure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from ..rules.schema import Rule

#: How a block is described when it differs: a diagonal or off-diagonal block of a block-diagonal
#: kernel, a source's slice of a concatenation, a scaled output block, or the whole tensor.
BlockKind = Literal["diagonal", "off-diagonal", "slice", "output", "whole"]
Region = tuple[slice, ...]


class CannotDecompose(LookupError):
    """The blocks of a tensor cannot be stated (an op without a decomposition here, or a plan without
    what its op needs): the tensor cannot be verified, and the check fails."""


@dataclass(frozen=True)
class Noise:
    """The off-diagonal noise of one tensor: its generator seed, its std and whether the diagonal
    compensates it (``preserving``)."""

    seed: int
    std: float
    preserving: bool


@dataclass(frozen=True)
class Term:
    """One summand of a block: ``coef`` times a region of source ``source``, or ``coef`` times the
    noise of block ``noise`` (a stream of ``noise_numel`` values drawn in row-major order)."""

    coef: float
    source: int | None = None
    region: Region = ()
    noise: tuple[int, ...] | None = None
    noise_numel: int = 0


@dataclass(frozen=True)
class Block:
    """A region of the fused tensor and what it must equal: the sum of ``terms`` (zero if none)."""

    kind: BlockKind
    label: str  # e.g. "diagonal block 2 of part q (source 2)", "off-diagonal block (1, 2)"
    where: Region
    shape: tuple[int, ...]
    terms: tuple[Term, ...]
    source: int | None = None  # the source this block belongs to (diagonal, slice, output)
    scale: float | None = None  # output blocks: the expected factor w_m x output scale_m

    @property
    def start(self) -> tuple[int, ...]:
        """Index of the block's first element in the fused tensor."""
        return tuple(s.start or 0 for s in self.where)


@dataclass(frozen=True)
class Layout:
    """Everything the blocks of one fused tensor depend on."""

    name: str
    rule: Rule
    source_shapes: Sequence[tuple[int, ...]]
    weights: Sequence[float]  # w_m (bias_average)
    scales: Sequence[float] | None = None  # output_average: w_m x output scale_m; concat: runtime scale ratios
    noise: Noise | None = None  # None: zero off-diagonal blocks
    part_sizes: Sequence[Sequence[int]] | None = None  # split_fuse_concat with roles: part p's size in source m

    @property
    def n(self) -> int:
        return len(self.source_shapes)

    @property
    def ndim(self) -> int:
        return len(self.source_shapes[0])

    @property
    def shape(self) -> tuple[int, ...]:
        """The fused shape the rule gives: each widened axis holds every source's slice, shared
        axes are the sources' own (equal in every source)."""
        widened = self.rule.widened_axes
        first = self.source_shapes[0]
        return tuple(sum(s[ax] for s in self.source_shapes) if ax in widened else first[ax]
                     for ax in range(self.ndim))


# Building blocks -------------------------------------------------------------------------------

#: A piece of a source along the widened axes: axis -> (start, size) within the source tensor.
Piece = dict[int, tuple[int, int]]


def _region(ndim: int, spans: dict[int, tuple[int, int]]) -> Region:
    """Slices selecting ``spans`` (axis -> (start, size)), every other axis whole."""
    return tuple(slice(spans[ax][0], spans[ax][0] + spans[ax][1]) if ax in spans else slice(None)
                 for ax in range(ndim))


def _shape(lay: Layout, sizes: dict[int, int]) -> tuple[int, ...]:
    return tuple(sizes.get(ax, lay.shape[ax]) for ax in range(lay.ndim))


def _starts(sizes: Sequence[int], base: int) -> list[int]:
    """Where each of consecutive slices of ``sizes`` starts, the first at ``base``."""
    out = []
    for s in sizes:
        out.append(base)
        base += s
    return out


def _whole(lay: Layout) -> list[Piece]:
    return [{ax: (0, shape[ax]) for ax in lay.rule.widened_axes} for shape in lay.source_shapes]


def _part_name(rule: Rule, part: int | None) -> str:
    if part is None:
        return ""
    if isinstance(rule.parts, list):
        return f" of part {part + 1} ({rule.parts[part]})"
    return f" of part {'qkv'[part] if rule.parts == 3 else part}"


def _block_grid(lay: Layout, pieces: list[Piece], base: dict[int, int], part: int | None,
                coef: float = 1.0) -> list[Block]:
    """The n x n blocks of the block-diagonal of ``pieces`` over the two widened axes, the fused
    pieces starting at ``base`` (axis -> offset in the fused tensor), the sources times ``coef``."""
    a0, a1 = lay.rule.widened_axes
    n = len(pieces)
    starts = {ax: _starts([p[ax][1] for p in pieces], base.get(ax, 0)) for ax in (a0, a1)}

    def key(i: int, j: int) -> tuple[int, ...]:
        return (i, j) if part is None else (part, i, j)

    def block_shape(i: int, j: int) -> tuple[int, ...]:
        return _shape(lay, {a0: pieces[i][a0][1], a1: pieces[j][a1][1]})

    blocks = []
    for i in range(n):  # block index along a0
        for j in range(n):  # block index along a1
            shape = block_shape(i, j)
            where = _region(lay.ndim, {a0: (starts[a0][i], shape[a0]), a1: (starts[a1][j], shape[a1])})
            if i != j:
                terms = () if lay.noise is None else (Term(1.0, noise=key(i, j), noise_numel=math.prod(shape)),)
                blocks.append(Block("off-diagonal", f"off-diagonal block ({i + 1}, {j + 1}){_part_name(lay.rule, part)}",
                                    where, shape, terms))
                continue
            diag = [Term(coef, source=i, region=_region(lay.ndim, pieces[i]))]
            if lay.noise is not None and lay.noise.preserving:
                # output block b = i receives N(a, b) from every other input block a
                for a in range(n):
                    if a != i:
                        k = (a, i) if lay.rule.input_axis == a0 else (i, a)
                        diag.append(Term(-1.0, noise=key(*k), noise_numel=math.prod(block_shape(*k))))
            blocks.append(Block("diagonal", f"diagonal block {i + 1}{_part_name(lay.rule, part)} (source {i + 1})",
                                where, shape, tuple(diag), source=i))
    return blocks


def _slices(lay: Layout, pieces: list[Piece], axis: int, base: int, part: int | None,
            scales: Sequence[float] | None = None, output: bool = True) -> list[Block]:
    """Piece m of every source, one after the other along ``axis`` from ``base`` (times ``scales[m]``
    when given: the blocks of an output projection, or with ``output`` False of a tensor the runtime
    multiplies by a width-dependent factor)."""
    starts = _starts([p[axis][1] for p in pieces], base)
    blocks = []
    for m, piece in enumerate(pieces):
        shape = _shape(lay, {axis: piece[axis][1]})
        where = _region(lay.ndim, {axis: (starts[m], shape[axis])})
        coef = 1.0 if scales is None else float(scales[m])
        term = Term(coef, source=m, region=_region(lay.ndim, piece))
        if scales is None or not output:
            times = "" if scales is None else f" times {coef:.6g}"
            blocks.append(Block("slice", f"slice of source {m + 1}{_part_name(lay.rule, part)}{times}", where, shape,
                                (term,), source=m))
        else:
            blocks.append(Block("output", f"output block of source {m + 1}", where, shape, (term,), source=m,
                                scale=coef))
    return blocks


# One entry per op -----------------------------------------------------------------------------

def block_diagonal(lay: Layout) -> list[Block]:
    """Sources on the diagonal of the two widened axes; off-diagonal blocks zero or noise."""
    return _block_grid(lay, _whole(lay), {}, None)


def concat(lay: Layout) -> list[Block]:
    """Source m's slice along the one widened axis; with per-source factors (the plan gives them for a
    rule with a ``runtime_scale`` r: the runtime multiplies the tensor by r(config), Gemma's embedding
    by sqrt(hidden_size)), source m's slice times r(source m) / r(fused), so that r(fused) x slice m
    = r(source m) x source m."""
    axis = lay.rule.widened_axes[0]
    if lay.scales is None:
        return _slices(lay, _whole(lay), axis, 0, None)
    if len(lay.scales) != lay.n:
        raise CannotDecompose(f"a scaled concat needs one factor per source, the plan has {lay.scales}")
    return _slices(lay, _whole(lay), axis, 0, None, scales=lay.scales, output=False)


def split_fuse_concat(lay: Layout) -> list[Block]:
    """The 'qkv' axis in parts (``parts`` equal ones, or the sizes ``lay.part_sizes`` gives each source);
    part p: block-diagonal of the sources' part p (two widened axes; noise keys (p, i, j)) or their
    concatenation (the 'qkv' axis alone), placed after the fused parts before it."""
    rule = lay.rule
    axis = rule.axes.index("qkv")
    if isinstance(rule.parts, list):
        sizes = lay.part_sizes
        if sizes is None or len(sizes) != lay.n or any(len(s) != len(rule.parts) for s in sizes):
            raise CannotDecompose(f"split_fuse_concat with parts {rule.parts} needs each source's part sizes, "
                                  f"the plan has {sizes}")
        sizes = [list(s) for s in sizes]
    else:
        parts = rule.parts or 1
        sizes = [[shape[axis] // parts] * parts for shape in lay.source_shapes]
    blocks = []
    fused_start = 0
    for p in range(len(sizes[0])):
        pieces = []
        for m, whole in enumerate(_whole(lay)):
            pieces.append({**whole, axis: (sum(sizes[m][:p]), sizes[m][p])})
        if len(rule.widened_axes) == 2:
            blocks += _block_grid(lay, pieces, {axis: fused_start}, p)
        else:
            blocks += _slices(lay, pieces, axis, fused_start, p)
        fused_start += sum(s[p] for s in sizes)
    return blocks


def output_average(lay: Layout) -> list[Block]:
    """Projection to logits: source m's slice of the hidden axis times w_m x output scale_m."""
    if lay.scales is None or len(lay.scales) != lay.n:
        raise CannotDecompose(f"output_average needs one scale per source, the plan has {lay.scales}")
    axis = lay.rule.widened_axes[0]
    return _slices(lay, _whole(lay), axis, 0, None, scales=lay.scales)


def bias_average(lay: Layout) -> list[Block]:
    """Bias of the output projection: ``sum_m w_m b_m``, accumulated in source order."""
    every = tuple(slice(None) for _ in range(lay.ndim))
    terms = tuple(Term(float(w), source=m, region=every) for m, w in enumerate(lay.weights))
    return [Block("whole", "the weighted average of the sources", every, lay.shape, terms)]


def passthrough_identical(lay: Layout) -> list[Block]:
    """A tensor every source holds identically: source 1's."""
    every = tuple(slice(None) for _ in range(lay.ndim))
    return [Block("whole", "source 1's tensor", every, lay.shape, (Term(1.0, source=0, region=every),), source=0)]


def expert_in(lay: Layout) -> list[Block]:
    """A fused expert's input kernel: slice m of the hidden axis is source m's (the plan gives the
    expert's own source its expert, every other source zeros)."""
    return _slices(lay, _whole(lay), lay.rule.widened_axes[0], 0, None)


def expert_out(lay: Layout) -> list[Block]:
    """A fused expert's output kernel: slice m of the hidden axis is n x source m's. The fused router
    routes to n times as many experts, each with 1/n of its source's routing weight (softmax over n
    equal copies; renormalised top-k), so n x the weight restores each source's MLP output."""
    axis = lay.rule.widened_axes[0]
    starts = _starts([s[axis] for s in lay.source_shapes], 0)
    blocks = []
    for m, piece in enumerate(_whole(lay)):
        shape = _shape(lay, {axis: piece[axis][1]})
        where = _region(lay.ndim, {axis: (starts[m], shape[axis])})
        term = Term(float(lay.n), source=m, region=_region(lay.ndim, piece))
        blocks.append(Block("slice", f"slice of source {m + 1} (times n = {lay.n})", where, shape, (term,), source=m))
    return blocks


def expert_stack_out(lay: Layout) -> list[Block]:
    """Stacked experts' output kernels [E, d, I]: block-diagonal over the experts and hidden axes of n x
    each source (as ``expert_out``: each expert's routing weight in the fused model is 1/n of its
    source's); preserving noise is compensated along the experts axis (the rule's input_axis)."""
    return _block_grid(lay, _whole(lay), {}, None, coef=float(lay.n))


def shared_average(lay: Layout) -> list[Block]:
    """A shared tensor no source can widen: ``T_1 + sum_{m>1} w_m (T_m - T_1)``."""
    every = tuple(slice(None) for _ in range(lay.ndim))
    terms = [Term(1.0, source=0, region=every)]
    for m in range(1, lay.n):
        terms += [Term(float(lay.weights[m]), source=m, region=every), Term(-float(lay.weights[m]), source=0, region=every)]
    return [Block("whole", "source 1 moved by the weighted differences of the others", every, lay.shape, tuple(terms))]


#: rule op -> the blocks of its fused tensor
DECOMPOSITIONS: dict[str, Callable[[Layout], list[Block]]] = {
    "block_diagonal": block_diagonal,
    "concat": concat,
    "split_fuse_concat": split_fuse_concat,
    "output_average": output_average,
    "bias_average": bias_average,
    "passthrough_identical": passthrough_identical,
    "expert_in": expert_in,
    "expert_out": expert_out,
    "expert_stack_out": expert_stack_out,
    "shared_average": shared_average,
}


def decompose(lay: Layout) -> list[Block]:
    """The blocks of the fused tensor ``lay`` describes, together covering it exactly once."""
    try:
        blocks_of = DECOMPOSITIONS[lay.rule.op]
    except KeyError:
        raise CannotDecompose(f"verify knows no decomposition for op {lay.rule.op!r}") from None
    blocks = blocks_of(lay)
    covered = sum(math.prod(b.shape) for b in blocks)
    if covered != math.prod(lay.shape):  # a decomposition must tile the tensor
        raise CannotDecompose(f"the blocks of op {lay.rule.op!r} cover {covered} of {math.prod(lay.shape)} elements")
    return blocks
