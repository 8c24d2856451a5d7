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
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future

import numpy as np
import torch

Tensor = torch.Tensor
#: ``offdiag(i, j, shape)`` -> noise for the block at widened-axis block indices (i, j).
OffDiag = Callable[[int, int, tuple[int, ...]], Tensor]
#: ``noise(i, j, numel)`` -> a :class:`GaussianStream` over the block at (i, j), in row-major order.
NoiseStreams = Callable[[int, int, int], "GaussianStream"]
#: Target size of one row block produced by the ``*_rows`` functions: small enough that producing,
#: hashing and writing it happen while it is still in the CPU cache.
CHUNK_BYTES = 1 << 20
#: Row blocks a producer may compute ahead of the writer consuming them.
BLOCKS_AHEAD = 4
#: Noise of later block rows that ``block_diagonal_rows`` may draw ahead on a second thread.
NOISE_AHEAD_BYTES = 256 << 20


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


def _split_parts(tensors: Sequence[Tensor], split_axis: int, parts: int) -> list[tuple[Tensor, ...]]:
    """Each source split into ``parts`` equal pieces along ``split_axis`` (views)."""
    pieces = []
    for t in tensors:
        size = t.shape[split_axis]
        if size % parts:
            raise FusionMismatch(f"axis {split_axis} of size {size} does not split into {parts} equal parts")
        pieces.append(torch.chunk(t, parts, dim=split_axis))
    return pieces


def split_fuse_concat(tensors: Sequence[Tensor], split_axis: int, parts: int,
                      inner: Callable[[list[Tensor], int], Tensor]) -> Tensor:
    """Split ``split_axis`` of every source into ``parts`` equal pieces (e.g. q, k, v of GPT-2's
    ``c_attn``), fuse piece p of all sources with ``inner(pieces, p)``, and concatenate the fused
    pieces back along ``split_axis``."""
    pieces = _split_parts(tensors, split_axis, parts)
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
    numel = 1
    for s in shape:
        numel *= s
    return GaussianStream(seed, name, key, numel, std).take(numel).view(shape)


class GaussianStream:
    """The noise of :func:`gaussian` for one block, handed out in row-major order a piece at a time.

    This is the single definition of the noise: ``gaussian`` takes the whole block in one piece. Any
    sequence of pieces gives exactly the same values as one piece: torch's CPU normal sampler draws
    one uniform per element, turns groups of 16 into normals (Box-Muller), and, when the length is not
    a multiple of 16, redraws the last 16. So the stream is drawn from the generator in lengths that
    are multiples of 16 (the final draw: whatever is left, at least 16), and elements drawn beyond a
    requested piece are kept for the next one.
    """

    def __init__(self, seed: int, name: str, key: tuple[int, ...], numel: int, std: float):
        self._gen = torch.Generator(device="cpu")
        self._gen.manual_seed(noise_seed(seed, name, *key))
        self.numel = numel
        self.std = std
        self._drawn = 0  # elements drawn from the generator
        self._taken = 0  # elements handed out
        self._carry: Tensor | None = None  # drawn, not yet handed out (fewer than 16)

    def _draw(self, out: Tensor) -> None:
        torch.randn(out.numel(), generator=self._gen, dtype=torch.float32, out=out)
        if self.std != 1.0:
            out.mul_(self.std)
        self._drawn += out.numel()

    def take(self, k: int, out: Tensor | None = None) -> Tensor:
        """The next ``k`` values (fp32, 1-D, contiguous); written into ``out`` (a contiguous fp32
        tensor of at least ``k`` elements) when given."""
        if k < 0 or self._taken + k > self.numel:
            raise ValueError(f"noise stream of {self.numel} values: cannot take {k} after {self._taken}")
        out = torch.empty(k, dtype=torch.float32) if out is None else out.view(-1)[:k]
        pos = 0
        if self._carry is not None and self._carry.numel():
            c = min(k, self._carry.numel())
            out[:c] = self._carry[:c]
            self._carry = self._carry[c:]
            pos = c
        while pos < k:
            need, rem = k - pos, self.numel - self._drawn
            if need >= rem:  # the end of the block: one last draw, as a whole-block draw ends
                self._draw(out[pos:pos + rem])
                pos += rem
                continue
            # straight into ``out``: a multiple of 16 that leaves at least 16 for the final draw
            direct = min(need - need % 16, max(0, rem - 16 - (rem - 16) % 16))
            if direct:
                self._draw(out[pos:pos + direct])
                pos += direct
                continue
            # the rest of the piece is shorter than one draw: draw 16 (or everything left, when fewer
            # than 32 remain) and keep the surplus for the next piece
            tmp = torch.empty(rem if rem < 32 else 16, dtype=torch.float32)
            self._draw(tmp)
            out[pos:k] = tmp[:need]
            self._carry = tmp[need:]
            pos = k
        self._taken += k
        return out


def rms(tensors: Sequence[Tensor]) -> float:
    """Root mean square over all elements of all tensors (the noise-scale reference).

    Sums of squares are taken in float64 over fixed pieces of each tensor (numpy's pairwise sum,
    single-threaded) and combined with an exactly rounded sum: the result does not depend on the
    number of threads (torch's parallel reductions do), nor on a tensor being passed several times
    (self-fusion passes one tensor n times; it is summed once)."""
    sums: dict[int, tuple[float, int]] = {}
    parts, count = [], 0
    for t in tensors:
        if id(t) not in sums:
            sums[id(t)] = (_sum_squares(t), t.numel())
        s, c = sums[id(t)]
        parts.append(s)
        count += c
    return math.sqrt(math.fsum(parts) / count) if count else 0.0


_RMS_PIECE = 1 << 20


def _sum_squares(t: Tensor) -> float:
    flat = t.detach().reshape(-1)
    buf = torch.empty(min(flat.numel(), _RMS_PIECE), dtype=torch.float64)
    parts = []
    for start in range(0, flat.numel(), _RMS_PIECE):
        piece = flat[start:start + _RMS_PIECE]
        a = buf[:piece.numel()]
        a.copy_(piece)
        x = a.numpy()
        np.square(x, out=x)
        parts.append(float(x.sum()))
    return math.fsum(parts)


# Streaming: the same fused values, produced as consecutive row blocks.
#
# A row block is a contiguous slab of the fused tensor along axis 0; concatenated in order along
# axis 0, the row blocks of ``*_rows(...)`` are exactly (bit for bit) the tensor of the
# corresponding op above, computed with the same arithmetic in the same order. Zero stretches come
# from reused, already-zeroed buffers and noise from :class:`GaussianStream`, so nothing of the size
# of the fused tensor is ever allocated.


class BufferRing:
    """``count`` reusable buffers handed out in turn: a buffer comes back ``count`` calls later.

    Row blocks returned by the ``*_rows`` functions may live in such buffers, so their consumer must
    be done with a block before ``count - 1`` further blocks are requested from the same ring.
    """

    def __init__(self, count: int = 3, noise_ahead: int | None = None):
        if count < 2:
            raise ValueError("a buffer ring needs at least 2 buffers")
        self.noise_ahead = NOISE_AHEAD_BYTES if noise_ahead is None else noise_ahead  # bytes of noise drawn ahead
        self._bufs: list[Tensor | None] = [None] * count
        self._keys: list[object] = [None] * count
        self._next = 0
        self._spare: list[Tensor] = []
        self._reserved = 0
        self._lock = threading.Lock()

    def get(self, shape: Sequence[int], dtype: torch.dtype, key: object = None) -> tuple[Tensor, bool]:
        """The next buffer as a contiguous tensor of ``shape`` and ``dtype`` (contents unspecified), and
        whether it was last handed out under the same non-None ``key`` (its contents are then as that
        caller left them: callers use this to skip re-zeroing)."""
        i = self._next
        self._next = (i + 1) % len(self._bufs)
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        buf = self._bufs[i]
        if buf is None or buf.numel() < nbytes:
            buf = self._bufs[i] = torch.empty(max(nbytes, CHUNK_BYTES), dtype=torch.uint8)
            self._keys[i] = None
        same = key is not None and self._keys[i] == key
        self._keys[i] = key
        return buf[:nbytes].view(dtype).view(tuple(shape)), same

    def reserve(self, nbytes: int) -> bool:
        """Claim ``nbytes`` of the ``noise_ahead`` allowance for noise drawn ahead (shared by
        everything using this ring); False, claiming nothing, when it does not fit."""
        with self._lock:
            if self._reserved + nbytes > self.noise_ahead:
                return False
            self._reserved += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._lock:
            self._reserved -= nbytes

    def borrow(self, numel: int) -> Tensor:
        """A 1-D fp32 scratch tensor of ``numel`` elements, reused across calls once given back
        (any thread may borrow and give back)."""
        with self._lock:
            for k, t in enumerate(self._spare):
                if t.numel() >= numel:
                    return self._spare.pop(k)[:numel]
        return torch.empty(numel, dtype=torch.float32)

    def give_back(self, t: Tensor) -> None:
        base = t._base if t._base is not None else t
        with self._lock:
            self._spare.append(base)
            self._spare.sort(key=Tensor.numel)
            while sum(x.numel() for x in self._spare) * 4 > self.noise_ahead:
                self._spare.pop(0)


class _Drawn:
    """A block's noise drawn ahead (a future of the whole block), handed out front to back."""

    def __init__(self, future: Future):
        self._future = future
        self._data: Tensor | None = None
        self._pos = 0

    def result(self) -> Tensor:
        if self._data is None:
            self._data = self._future.result()
        return self._data

    def take(self, k: int, out: Tensor | None = None) -> Tensor:
        piece = self.result()[self._pos:self._pos + k]
        self._pos += k
        return piece


def _row_step(shape: Sequence[int], dtype: torch.dtype, chunk_bytes: int | None) -> int:
    """Rows per row block: about ``chunk_bytes`` (default ``CHUNK_BYTES``), at least one row."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    row = torch.empty((), dtype=dtype).element_size()
    for s in shape[1:]:
        row *= s
    return max(1, chunk_bytes // max(1, row))


def _exact_in_fp32(dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.bfloat16, torch.float16)


def block_diagonal_rows(tensors: Sequence[Tensor], axes: tuple[int, int], noise: NoiseStreams | None = None,
                        preserving_input_axis: int | None = None, dtype: torch.dtype | None = None,
                        ring: BufferRing | None = None, chunk_bytes: int | None = None,
                        pool: Executor | None = None) -> Iterator[Tensor]:
    """:func:`block_diagonal` as row blocks. ``noise(i, j, numel)`` gives the stream of block (i, j)
    (the streaming counterpart of ``offdiag``); zero off-diagonal blocks if None.

    With ``pool``, the noise of later block rows is drawn there (whole blocks, up to
    ``NOISE_AHEAD_BYTES``) while this thread works on the first: the same values, on two cores."""
    dtype = dtype or tensors[0].dtype
    a0, a1 = axes
    if a0 == a1:
        raise ValueError("block_diagonal needs two different axes")
    _check_shared(tensors, axes)
    if preserving_input_axis is not None and preserving_input_axis not in axes:
        raise ValueError("preserving_input_axis must be one of the block axes")
    ring = ring or BufferRing()
    n = len(tensors)
    shape = fused_shape([t.shape for t in tensors], axes)
    offs = {a0: _offsets(tensors, a0), a1: _offsets(tensors, a1)}
    noisy = noise is not None and n > 1
    step = _row_step(shape, dtype, chunk_bytes)

    def block_shape(i: int, j: int, rows: int) -> tuple[int, ...]:
        s = list(tensors[0].shape)
        s[a0], s[a1] = tensors[i].shape[a0], tensors[j].shape[a1]
        s[0] = rows
        return tuple(s)

    def numel(s: Sequence[int]) -> int:
        out = 1
        for v in s:
            out *= v
        return out

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
            ahead[b] = ({k: _Drawn(pool.submit(whole, k)) for k in keys},
                        {k: _Drawn(pool.submit(whole, k)) for k in comps}, need)

    for b, size in segments:
        blocks = segment_blocks(b)
        diagonal = [i for i, j in blocks if i == j]
        drawn: list[_Drawn] = []
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
                    out[index(m, m)].copy_(src if _exact_in_fp32(src.dtype) else src.to(torch.float32))
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


def concat_rows(tensors: Sequence[Tensor], axis: int, scales: Sequence[float] | None = None,
                dtype: torch.dtype | None = None, ring: BufferRing | None = None,
                chunk_bytes: int | None = None) -> Iterator[Tensor]:
    """:func:`concat` as row blocks (along axis 0 the sources' own rows, without a copy when no
    conversion is needed)."""
    dtype = dtype or tensors[0].dtype
    _check_shared(tensors, [axis])
    ring = ring or BufferRing()
    shape = fused_shape([t.shape for t in tensors], [axis])
    step = _row_step(shape, dtype, chunk_bytes)

    def place(dst: Tensor, src: Tensor, scale: float | None) -> None:
        if scale is None or scale == 1.0:
            dst.copy_(src)
        else:
            work = _work_dtype(src.dtype)
            if dst.dtype == work:
                dst.copy_(src)
                dst.mul_(scale)
            else:
                dst.copy_(src.to(work) * scale)

    if not tensors[0].dim():
        yield concat(tensors, axis, scales, dtype)
        return
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
    offs = _offsets(tensors, axis)
    for r0 in range(0, shape[0], step):
        rows = min(step, shape[0] - r0)
        out, _ = ring.get((rows, *shape[1:]), dtype)
        for m, t in enumerate(tensors):
            place(out.narrow(axis, offs[m], t.shape[axis]), t.narrow(0, r0, rows),
                  None if scales is None else scales[m])
        yield out


def output_average_rows(tensors: Sequence[Tensor], axis: int, weights: Sequence[float],
                        dtype: torch.dtype | None = None, ring: BufferRing | None = None,
                        chunk_bytes: int | None = None) -> Iterator[Tensor]:
    """:func:`output_average` as row blocks."""
    return concat_rows(tensors, axis, scales=list(weights), dtype=dtype, ring=ring, chunk_bytes=chunk_bytes)


def split_fuse_concat_rows(tensors: Sequence[Tensor], split_axis: int, parts: int,
                           inner: Callable[[list[Tensor], int, BufferRing], Iterator[Tensor]],
                           dtype: torch.dtype, ring: BufferRing | None = None) -> Iterator[Tensor]:
    """:func:`split_fuse_concat` as row blocks; ``inner(pieces, p, ring)`` yields the row blocks of
    fused piece p (every piece with the same row partition)."""
    ring = ring or BufferRing()
    pieces = _split_parts(tensors, split_axis, parts)
    if split_axis == 0:
        for k in range(parts):
            yield from inner([p[k] for p in pieces], k, ring)
        return
    gens = [inner([p[k] for p in pieces], k, BufferRing(2)) for k in range(parts)]
    for blocks in zip(*gens, strict=True):
        out_shape = list(blocks[0].shape)
        out_shape[split_axis] = sum(b.shape[split_axis] for b in blocks)
        out, _ = ring.get(out_shape, dtype)
        torch.cat(blocks, dim=split_axis, out=out)
        yield out



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
