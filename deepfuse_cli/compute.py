"""The fused value of one planned tensor: its rule's op, looked up in the op registry.

Loads the tensor's sources (once for self-fusion), refuses or records non-finite values, sets up
the seeded off-diagonal noise, and hands the op its row-block context. ``fuse`` streams the blocks
into a writer; the optimizer state uses whole values. Verification never calls this.
"""

from __future__ import annotations

from concurrent.futures import Executor
from typing import TYPE_CHECKING

import torch

from . import ops
from .errors import InputError
from .formats.base import gather

if TYPE_CHECKING:
    from .plan import Plan, PlanEntry


def compute_tensor(plan: Plan, entry: PlanEntry, loaded: list[torch.Tensor] | None = None, *,
                   ring: ops.BufferRing | None = None, pool: Executor | None = None):
    """The fused value of one planned tensor: its rule's op, looked up in the op registry.

    With ``ring``: an iterator over the value's consecutive row blocks (slabs along axis 0, which
    may live in ``ring``'s buffers), never the whole tensor at once; noise of later block rows may be
    drawn ahead on ``pool``. Without: those row blocks gathered into one tensor. The sources are
    loaded and checked (and the noise scale measured) before this returns.
    """
    opts = plan.options
    n = plan.n
    if loaded is None:
        refs = plan.source_refs(entry)
        once = opts.self_fusion and entry.refs is None  # a self-fusion's n copies are one tensor
        loaded = [refs[0].load()] * n if once else [r.load() for r in refs]
        for m in range(1 if once else n):
            _check_finite(plan, entry, m, loaded[m])
    noise = None
    if entry.noise:
        std = opts.noise_std if opts.noise_std > 0 else opts.noise_scale * ops.rms(loaded)
        if std > 0:
            noise = ops.OffDiagonalNoise(opts.seed, entry.name, std, preserving=opts.noise_mode == "preserving")
    ctx = ops.FuseContext(dtype=entry.dtype, weights=opts.weights, scales=entry.scales, noise=noise, ring=ring,
                          pool=pool, part_sizes=entry.part_sizes)
    try:
        blocks = entry.rule.fusion_op.rows(loaded, entry.rule, ctx)
    except ops.FusionMismatch as exc:
        raise InputError(f"tensor {entry.name!r}: {exc}", exc.hint) from None
    return blocks if ring is not None else gather(blocks, entry.name, entry.shape, entry.dtype)


def _check_finite(plan: Plan, entry: PlanEntry, m: int, tensor: torch.Tensor) -> None:
    """Refuse a source tensor holding NaN/Inf, or with ``allow_nonfinite`` record it in ``plan.nonfinite``."""
    if not tensor.is_floating_point():
        return
    t = tensor if tensor.dtype != torch.float8_e4m3fn else tensor.to(torch.float16)  # no isfinite kernel for it
    if ops.all_finite(t):  # one pass, no temporaries the size of the tensor
        return
    count = int(t.numel() - int(torch.isfinite(t).sum()))
    name = entry.name
    where = plan.source_refs(entry)[m].source or str(plan.sources[m].path)
    if not plan.options.allow_nonfinite:
        raise InputError(f"{where}: tensor {name!r} has {count} non-finite value(s) (NaN or Inf)",
                         "the source is corrupt or diverged; pass --allow-nonfinite to fuse it anyway")
    plan.nonfinite.append({"source": m + 1, "file": where, "tensor": name, "count": count})


def head_norm_tensors(plan: Plan) -> dict[str, torch.Tensor]:
    """Per-head norm scales (rules with ``per_head``): for each such tensor, one row per head of the
    fused model, source m's [head_dim] scale repeated for each of its heads, in source order."""
    out = {}
    for entry in plan.entries:
        heads = plan.head_norms.get(entry.name)
        if heads is None:
            continue
        rows = []
        for m, count in enumerate(heads):
            t = plan.tensors[m][entry.name].load()
            _check_finite(plan, entry.name, m, t)
            rows.append(t.to(entry.dtype).reshape(1, -1).expand(count, -1))
        out[entry.name] = torch.cat(rows).contiguous()
    return out
