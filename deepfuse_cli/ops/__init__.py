"""Pure fusion operations on tensors: no names, no files, no formats.

Each op (one module each, registered by name in :mod:`.registry`) takes the n source tensors of
one parameter, in source order, and yields the fused tensor as row blocks::

    block_diagonal          [ W1 | 0  ]     concat / output_average   [ T1 | T2 ]
                            [ 0  | W2 ]
    split_fuse_concat       q, k, v parts each block-diagonal (or concatenated), side by side
    bias_average            w_1 b_1 + w_2 b_2
    passthrough_identical   T1 (= T2)
    expert_in / expert_out  [ 0 | W_mj | 0 ]: one source's expert in its own slice (x n for expert_out)
    shared_average          T1 + w_2 (T2 - T1)   (T1 when the sources agree)

A rule names its op; the core looks it up with :func:`get` and never compares op names.
"""

from __future__ import annotations

# Importing an op's module registers it; this order is the order ops are listed in.
from . import block_diagonal  # noqa: I001
from . import concat
from . import split_fuse_concat
from . import output_average
from . import bias_average
from . import passthrough_identical
from . import expert
from . import shared_average
from .common import (BLOCKS_AHEAD, CHUNK_BYTES, NOISE_AHEAD_BYTES, FusionMismatch, Shape, Tensor, all_finite,
                     fused_shape)
from .noise import GaussianStream, OffDiagonalNoise, gaussian, noise_seed, rms
from .registry import OPS, FuseContext, FusionOp, RuleView, get, register
from .ring import BufferRing

__all__ = [
    "BLOCKS_AHEAD", "CHUNK_BYTES", "NOISE_AHEAD_BYTES", "OPS", "BufferRing", "FuseContext", "FusionMismatch",
    "FusionOp", "GaussianStream", "OffDiagonalNoise", "RuleView", "Shape", "Tensor", "all_finite", "fused_shape",
    "gaussian", "get", "noise_seed", "register", "rms",
]
