"""Reusable buffers for row blocks, and the allowance for noise drawn ahead.

Row blocks handed out in turn from ``count`` buffers (count = 3)::

    call:     1    2    3    4    5  ...
    buffer:  [a]  [b]  [c]  [a]  [b] ...      block k's buffer is reused by block k + count

so a consumer must be done with a block before ``count - 1`` further blocks are requested.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from . import common
from .common import Tensor, numel


class BufferRing:
    """``count`` reusable buffers handed out in turn: a buffer comes back ``count`` calls later.

    Row blocks an op returns may live in such buffers, so their consumer must be done with a block
    before ``count - 1`` further blocks are requested from the same ring.
    """

    def __init__(self, count: int = 3, noise_ahead: int | None = None):
        if count < 2:
            raise ValueError("a buffer ring needs at least 2 buffers")
        # bytes of noise drawn ahead
        self.noise_ahead = common.NOISE_AHEAD_BYTES if noise_ahead is None else noise_ahead
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
        nbytes = numel(shape) * torch.empty((), dtype=dtype).element_size()
        buf = self._bufs[i]
        if buf is None or buf.numel() < nbytes:
            buf = self._bufs[i] = torch.empty(max(nbytes, common.CHUNK_BYTES), dtype=torch.uint8)
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
