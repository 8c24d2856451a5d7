"""Off-diagonal noise (paper section 5.1): seeded per parameter and block, drawn as a stream.

The noise of block ``key`` of parameter ``name`` is a function of ``(seed, name, key)`` only, so
output bytes do not depend on processing order, threads or machine. Keys are ``(i, j)``, the
block's indices along the two widened axes, or ``(part, i, j)`` inside part ``part`` of a fused
projection::

    [ W1  | N12 ]      N12 = noise(seed, name, (0, 1))
    [ N21 | W2  ]      N21 = noise(seed, name, (1, 0))
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace

import numpy as np
import torch

from .common import Tensor, numel


def noise_seed(seed: int, name: str, *key: int) -> int:
    """A 63-bit generator seed derived from (seed, parameter name, block key): independent of
    processing order, thread count and machine."""
    h = hashlib.sha256(f"{seed}\x00{name}\x00{'/'.join(map(str, key))}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def gaussian(seed: int, name: str, key: tuple[int, ...], shape: tuple[int, ...], std: float) -> Tensor:
    """Reproducible N(0, std^2) noise (fp32) for the block ``key`` of parameter ``name``."""
    size = numel(shape)
    return GaussianStream(seed, name, key, size, std).take(size).view(shape)


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


#: ``streams(i, j, numel)`` -> the :class:`GaussianStream` of block (i, j), in row-major order.
NoiseStreams = Callable[[int, int, int], GaussianStream]


@dataclass(frozen=True)
class OffDiagonalNoise:
    """The noise settings of one parameter: N(0, std^2) off the diagonal, seeded by (seed, name).

    ``preserving``: the diagonal block compensates the noise reaching it (self-fusion), so that an
    input of equal copies gives unchanged outputs. Block (i, j) draws from key ``(*key_prefix, i, j)``.
    """

    seed: int
    name: str
    std: float
    preserving: bool = False
    key_prefix: tuple[int, ...] = ()

    def stream(self, i: int, j: int, numel: int) -> GaussianStream:
        """The noise of block (i, j) (``numel`` values), in row-major order: a :data:`NoiseStreams`."""
        return GaussianStream(self.seed, self.name, (*self.key_prefix, i, j), numel, self.std)

    def part(self, k: int) -> OffDiagonalNoise:
        """The noise of part ``k`` of a fused projection: its blocks keyed ``(k, i, j)``."""
        return replace(self, key_prefix=(*self.key_prefix, k))


class DrawnAhead:
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
