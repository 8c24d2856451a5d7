"""What every fusion op shares: fused shapes, the mismatch error, row-block sizes, precision.

Axes of a tensor are either *widened* (each source owns a slice: its hidden units, heads, MLP
units) or *shared* (vocabulary, positions, buckets: equal across sources). Along a widened axis
the sources' slices follow each other in source order::

    source:   1        2          n
            [ d_1 ] [ d_2 ] ... [ d_n ]       fused size d_1 + d_2 + ... + d_n

Ops produce their fused value as *row blocks*: consecutive slabs of the fused tensor along
axis 0, each about ``CHUNK_BYTES``, so that nothing of the size of the fused tensor is held.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Tensor = torch.Tensor
Shape = tuple[int, ...]

#: Target size of one row block: small enough that producing, hashing and writing it happen while
#: it is still in the CPU cache.
CHUNK_BYTES = 1 << 20
#: Row blocks a producer may compute ahead of the writer consuming them.
BLOCKS_AHEAD = 4
#: Noise of later block rows that a block-diagonal op may draw ahead on a second thread.
NOISE_AHEAD_BYTES = 256 << 20


class FusionMismatch(ValueError):
    """Source tensors cannot be fused as asked (shape on a shared axis, non-identical passthrough).

    ``source`` is the 0-based index of the source at fault when the message is about one source's
    own tensor (rather than a disagreement between sources); ``hint`` suggests the fix.
    """

    def __init__(self, message: str, *, source: int | None = None, hint: str | None = None):
        super().__init__(message)
        self.source = source
        self.hint = hint


SHARED_AXIS_HINT = "sources must agree on every shared axis (vocabulary, positions, buckets)"


def fused_shape(shapes: Sequence[Sequence[int]], widened: Sequence[int]) -> Shape:
    """Shape of the fused tensor: widened axes summed, shared axes kept (and checked)."""
    ref = tuple(shapes[0])
    for m, s in enumerate(shapes[1:], start=2):
        if len(s) != len(ref):
            raise FusionMismatch(f"source 1 has {len(ref)} axes, source {m} has {len(s)}", hint=SHARED_AXIS_HINT)
        for ax in range(len(ref)):
            if ax not in widened and s[ax] != ref[ax]:
                raise FusionMismatch(f"shared axis {ax} differs: source 1 has {ref[ax]}, source {m} has {s[ax]}",
                                     hint=SHARED_AXIS_HINT)
    return tuple(sum(s[ax] for s in shapes) if ax in widened else ref[ax] for ax in range(len(ref)))


def offsets(tensors: Sequence[Tensor], axis: int) -> list[int]:
    """Where each source's slice starts along ``axis`` of the fused tensor."""
    out, pos = [], 0
    for t in tensors:
        out.append(pos)
        pos += t.shape[axis]
    return out


def numel(shape: Sequence[int]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def work_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Arithmetic precision: at least float32, more if an input has more."""
    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


def exact_in_fp32(dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.bfloat16, torch.float16)


def row_step(shape: Sequence[int], dtype: torch.dtype, chunk_bytes: int | None) -> int:
    """Rows per row block: about ``chunk_bytes`` (default ``CHUNK_BYTES``), at least one row."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    row = torch.empty((), dtype=dtype).element_size()
    for s in shape[1:]:
        row *= s
    return max(1, chunk_bytes // max(1, row))


def all_finite(t: Tensor) -> bool:
    """Whether every element of a floating-point tensor is finite: one pass (its minimum and
    maximum, which a NaN or an infinity makes non-finite), no temporary of the tensor's size."""
    if not t.numel():
        return True
    try:
        lo, hi = torch.aminmax(t.detach().reshape(-1))
    except RuntimeError:  # a dtype without the kernel
        return bool(torch.isfinite(t).all())
    return math.isfinite(float(lo)) and math.isfinite(float(hi))
