"""Pure fusion operations on tensors: no names, no files, no formats.

Each op takes the n source tensors of one parameter (in source order) and returns the
fused tensor. Axes are either *widened* (each source owns a slice: its hidden units,
heads, MLP units) or *shared* (vocabulary, positions, buckets: equal across sources).

Block placement for two widened axes (a kernel between two hidden spaces), n = 2::

    [ W1 | N12 ]        W1, W2 on the diagonal (source order),
    [ N21 | W2 ]        Nij zero, or low-variance noise (paper section 5.1)

With one widened axis this is concatenation. ``preserving`` noise (self-fusion) puts
Nij off the diagonal and subtracts, for every output block, the noise that reaches it
from the other input blocks::

    input-axis block a, output-axis block b:   a != b: N_ab     a == b: W - sum_{a' != b} N_a'b

so for an input made of n equal copies every output block is exactly ``x W``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch

Tensor = torch.Tensor
#: ``offdiag(i, j, shape)`` -> noise for the block at widened-axis block indices (i, j).
OffDiag = Callable[[int, int, tuple[int, ...]], Tensor]


class FusionMismatch(ValueError):
    """Source tensors cannot be fused as asked (shape on a shared axis, non-identical passthrough)."""


def _check_shared(tensors: Sequence[Tensor], widened: Sequence[int]) -> None:
    ref = tensors[0]
    for m, t in enumerate(tensors[1:], start=2):
        if t.dim() != ref.dim():
            raise FusionMismatch(f"source 1 has {ref.dim()} axes, source {m} has {t.dim()}")
        for ax in range(ref.dim()):
            if ax not in widened and t.shape[ax] != ref.shape[ax]:
                raise FusionMismatch(
                    f"shared axis {ax} differs: source 1 has {ref.shape[ax]}, source {m} has {t.shape[ax]}"
                )


def fused_shape(shapes: Sequence[Sequence[int]], widened: Sequence[int]) -> tuple[int, ...]:
    """Shape of the fused tensor: widened axes summed, shared axes kept (and checked)."""
    ref = tuple(shapes[0])
    for m, s in enumerate(shapes[1:], start=2):
        if len(s) != len(ref):
            raise FusionMismatch(f"source 1 has {len(ref)} axes, source {m} has {len(s)}")
        for ax in range(len(ref)):
            if ax not in widened and s[ax] != ref[ax]:
                raise FusionMismatch(f"shared axis {ax} differs: source 1 has {ref[ax]}, source {m} has {s[ax]}")
    return tuple(sum(s[ax] for s in shapes) if ax in widened else ref[ax] for ax in range(len(ref)))


def _offsets(tensors: Sequence[Tensor], axis: int) -> list[int]:
    out, pos = [], 0
    for t in tensors:
        out.append(pos)
        pos += t.shape[axis]
    return out


def _work_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Arithmetic precision: at least float32, more if an input has more."""
    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


def _scaled(t: Tensor, scale: float | None, dtype: torch.dtype) -> Tensor:
    if scale is None or scale == 1.0:
        return t.to(dtype)
    return (t.to(_work_dtype(t.dtype)) * scale).to(dtype)


def concat(tensors: Sequence[Tensor], axis: int, scales: Sequence[float] | None = None,
           dtype: torch.dtype | None = None) -> Tensor:
    """Concatenate along one widened ``axis``; each source optionally scaled (in fp32)."""
    dtype = dtype or tensors[0].dtype
    _check_shared(tensors, [axis])
    parts = [_scaled(t, None if scales is None else scales[m], dtype) for m, t in enumerate(tensors)]
    return torch.cat(parts, dim=axis)


def block_diagonal(tensors: Sequence[Tensor], axes: tuple[int, int], offdiag: OffDiag | None = None,
                   preserving_input_axis: int | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """Place each source on the diagonal of the two widened ``axes``.

    ``offdiag(i, j, shape)`` fills block (i along axes[0], j along axes[1]), i != j; zeros if None.
    ``preserving_input_axis`` (one of ``axes``) turns on compensation on the diagonal so that equal
    input copies give unchanged outputs (see module docstring).
    """
    dtype = dtype or tensors[0].dtype
    a0, a1 = axes
    if a0 == a1:
        raise ValueError("block_diagonal needs two different axes")
    _check_shared(tensors, axes)
    n = len(tensors)
    shape = fused_shape([t.shape for t in tensors], axes)
    off0, off1 = _offsets(tensors, a0), _offsets(tensors, a1)

    def index(i: int, j: int) -> tuple[slice, ...]:
        idx = [slice(None)] * len(shape)
        idx[a0] = slice(off0[i], off0[i] + tensors[i].shape[a0])
        idx[a1] = slice(off1[j], off1[j] + tensors[j].shape[a1])
        return tuple(idx)

    def block_shape(i: int, j: int) -> tuple[int, ...]:
        s = list(tensors[0].shape)
        s[a0], s[a1] = tensors[i].shape[a0], tensors[j].shape[a1]
        return tuple(s)

    if offdiag is None or n == 1:
        out = torch.zeros(shape, dtype=dtype)
        for m, t in enumerate(tensors):
            out[index(m, m)] = t.to(dtype)
        return out

    out = torch.empty(shape, dtype=dtype)
    noise: dict[tuple[int, int], Tensor] = {}
    for i in range(n):
        for j in range(n):
            if i != j:
                block = offdiag(i, j, block_shape(i, j)).to(torch.float32)
                noise[(i, j)] = block
                out[index(i, j)] = block.to(dtype)
    for m, t in enumerate(tensors):
        diag = t.to(torch.float32)
        if preserving_input_axis is not None:
            if preserving_input_axis not in axes:
                raise ValueError("preserving_input_axis must be one of the block axes")
            # output block b = m; subtract noise arriving from every other input block.
            for other in range(n):
                if other == m:
                    continue
                key = (other, m) if preserving_input_axis == a0 else (m, other)
                diag = diag - noise[key]
        out[index(m, m)] = diag.to(dtype)
    return out


def split_fuse_concat(tensors: Sequence[Tensor], split_axis: int, parts: int,
                      inner: Callable[[list[Tensor], int], Tensor]) -> Tensor:
    """Split ``split_axis`` of every source into ``parts`` equal pieces (e.g. q, k, v of GPT-2's
    ``c_attn``), fuse piece p of all sources with ``inner(pieces, p)``, and concatenate the fused
    pieces back along ``split_axis``."""
    pieces = []
    for t in tensors:
        size = t.shape[split_axis]
        if size % parts:
            raise FusionMismatch(f"axis {split_axis} of size {size} does not split into {parts} equal parts")
        pieces.append(torch.chunk(t, parts, dim=split_axis))
    fused = [inner([p[k] for p in pieces], k) for k in range(parts)]
    return torch.cat(fused, dim=split_axis)


def output_average(tensors: Sequence[Tensor], axis: int, weights: Sequence[float],
                   dtype: torch.dtype | None = None) -> Tensor:
    """Output projection to logits: concatenate along the hidden ``axis``, block m scaled by w_m.

    Applied to ``[h_1; ...; h_n]`` this yields ``sum_m w_m W_m h_m``: the weighted average of logits.
    """
    return concat(tensors, axis, scales=list(weights), dtype=dtype)


def bias_average(tensors: Sequence[Tensor], weights: Sequence[float], dtype: torch.dtype | None = None) -> Tensor:
    """Bias of the output projection: ``sum_m w_m b_m`` (no widened axis)."""
    dtype = dtype or tensors[0].dtype
    _check_shared(tensors, [])
    work = _work_dtype(*(t.dtype for t in tensors))
    acc = torch.zeros(tensors[0].shape, dtype=work)
    for w, t in zip(weights, tensors, strict=True):
        acc += w * t.to(work)
    return acc.to(dtype)


def passthrough_identical(tensors: Sequence[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """A tensor that must be the same in every source (e.g. a buffer); copied once."""
    ref = tensors[0]
    for m, t in enumerate(tensors[1:], start=2):
        if t.shape != ref.shape or not torch.equal(t.to(ref.dtype), ref):
            raise FusionMismatch(f"source {m} differs from source 1, but this tensor must be identical")
    return ref.to(dtype or ref.dtype)


def noise_seed(seed: int, name: str, *key: int) -> int:
    """A 63-bit generator seed derived from (seed, parameter name, block key): independent of
    processing order, thread count and machine."""
    h = hashlib.sha256(f"{seed}\x00{name}\x00{'/'.join(map(str, key))}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def gaussian(seed: int, name: str, key: tuple[int, ...], shape: tuple[int, ...], std: float) -> Tensor:
    """Reproducible N(0, std^2) noise (fp32) for the block ``key`` of parameter ``name``."""
    g = torch.Generator(device="cpu")
    g.manual_seed(noise_seed(seed, name, *key))
    out = torch.randn(shape, generator=g, dtype=torch.float32)
    if std != 1.0:
        out.mul_(std)
    return out


def rms(tensors: Sequence[Tensor]) -> float:
    """Root mean square over all elements of all tensors (the noise-scale reference)."""
    total, count = 0.0, 0
    for t in tensors:
        f = t.to(torch.float32)
        total += float((f * f).sum())
        count += f.numel()
    return (total / count) ** 0.5 if count else 0.0
