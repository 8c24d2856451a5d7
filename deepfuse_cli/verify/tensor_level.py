"""Tensor-level verification: every fused tensor, block by block, against the sources.

Three checks, each needing the one before (``report.NEEDS``): the names of the fused tensors are the
planned ones; their shapes (in the output's layout) and dtypes are; their blocks hold what they should.

A second opinion, not a mirror: the blocks of each fused tensor and what each must equal come
from :mod:`.decompose` (the mathematics of DESIGN sections 2-4), and the noise from its
definition (``ops.GaussianStream`` seeded by seed, tensor name and block key); nothing here calls
the fusion ops that wrote the checkpoint, so a wrong axis, scale or block placement in them is
caught and named.

At I/O speed, in bounded memory: each fused tensor is read once, each source tensor once (a
self-fusion's copies are one tensor), and each block is compared as a view of the fused tensor:
whole when it should be zero or a source's own slice, else slab by slab (``SLAB_BYTES`` of its
rows at a time, the noise drawn in the same pieces); no recomputed fused tensor is ever built. A block passes when it equals its expected value exactly (``strict``,
or a dtype without a tolerance), or within ``tol`` (default :func:`default_tensor_tol`) of the
largest magnitude the block should hold. NaN/Inf of sources fused with ``--allow-nonfinite`` must
sit exactly where the sources put them. T5X <-> transformers conversions are compared in the
plan's layout (the stored tensor transposed back), so the diagnosis speaks of the rule's blocks.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from ..errors import InputError
from ..ir import Checkpoint, TensorRef
from ..memory import TRIM_AFTER_BYTES, release_free_memory
from ..ops import GaussianStream, rms
from .decompose import Block, CannotDecompose, Layout, Noise, decompose
from .report import Check, run_check

if TYPE_CHECKING:
    from ..plan import Plan, PlanEntry

HALF = (torch.float16, torch.bfloat16)
#: dtypes judged with a tolerance (unless ``strict``); any other dtype must match exactly
TOLERANT = (torch.float32, torch.float64, *HALF)
#: bytes of fp32 work per slab of a block whose expected value is computed (cast, scaled, noise); a block
#: that is zero or a source's own slice is compared whole, as a view (no temporaries)
SLAB_BYTES = 16 << 20


def default_tensor_tol(dtype: torch.dtype) -> float:
    return 1e-2 if dtype in HALF else 1e-6


class _Misplaced(Exception):
    """NaN/Inf in the fused tensor where the sources have none, or not where they have them."""


class _SourceNonFinite(Exception):
    """The expected value holds NaN/Inf, but the fusion recorded no non-finite source (no --allow-nonfinite)."""


def layout(plan: Plan, entry: PlanEntry, sources: list[torch.Tensor] | None = None) -> Layout:
    """What the blocks of ``entry`` depend on; its noise needs the loaded ``sources`` (noise scale).

    Off-diagonal noise exists where there are off-diagonal blocks (two widened axes, n > 1); its std
    is ``--noise-std``, or ``--noise-scale`` times the RMS of the sources of that tensor."""
    opts = plan.options
    rule = entry.rule
    noise = None
    if sources is not None and opts.noisy and len(sources) > 1 and len(rule.widened_axes) == 2:
        std = opts.noise_std if opts.noise_std > 0 else opts.noise_scale * rms(sources)
        if std > 0:
            noise = Noise(seed=opts.seed, std=std, preserving=opts.noise_mode == "preserving")
    return Layout(name=entry.name, rule=rule, source_shapes=entry.source_shapes, weights=opts.weights,
                  scales=entry.scales, noise=noise, part_sizes=entry.part_sizes)


class _Expected:
    """The value block ``block`` should hold, one slab (a run of its rows along axis 0) at a time:
    the sum of its terms in fp32 (wider for wider sources), cast to ``dtype``."""

    def __init__(self, block: Block, lay: Layout, sources: list[torch.Tensor], dtype: torch.dtype):
        self.block, self.dtype = block, dtype
        self.regions = [sources[t.source][t.region] if t.source is not None else None for t in block.terms]
        self.work = torch.float32
        for r in self.regions:
            if r is not None:
                self.work = torch.promote_types(self.work, r.dtype)
        self.streams = {t.noise: GaussianStream(lay.noise.seed, lay.name, t.noise, t.noise_numel, lay.noise.std)
                        for t in block.terms if t.noise is not None}
        shape = block.shape
        self.rows = shape[0] if shape else 1
        first = block.terms[0] if block.terms else None
        self.viewed = not block.terms or (len(block.terms) == 1 and first.coef == 1.0 and first.source is not None
                                          and self.regions[0].dtype == dtype)

    def slabs(self):
        """(first row, rows) of each slab: the whole block when it is compared as a view."""
        return [(0, self.rows)] if self.viewed else _pieces(self.block.shape)

    def slab(self, r0: int, rows: int) -> torch.Tensor | None:
        """Rows ``r0 .. r0 + rows`` of the block's expected value; None for a zero block."""
        terms = self.block.terms
        if not terms:
            return None
        shape = (rows, *self.block.shape[1:]) if self.block.shape else ()
        if len(terms) == 1 and terms[0].coef == 1.0 and terms[0].source is not None:
            return _rows(self.regions[0], r0, rows).to(self.dtype)  # a source's slice, cast (no copy if same dtype)
        acc = None
        for term, region in zip(terms, self.regions, strict=True):
            if region is not None:
                read = _rows(region, r0, rows)
            else:
                read = self.streams[term.noise].take(math.prod(shape)).view(shape)
            x = read.to(self.work)
            if term.coef != 1.0:
                x = x * term.coef  # rounded, then added: each term as written, in order
            if acc is None:
                acc = x.clone() if x is read and region is not None else x  # never write into a source
            else:
                acc += x
        return acc.to(self.dtype)


def _rows(t: torch.Tensor, r0: int, rows: int) -> torch.Tensor:
    return t.narrow(0, r0, rows) if t.dim() else t


def _pieces(shape: tuple[int, ...], first: int = 0, rows: int | None = None, width: int = 4) -> list[tuple[int, int]]:
    """(first row, rows) of consecutive pieces of ``rows`` rows from ``first`` (default: all of
    ``shape``), each about ``SLAB_BYTES`` at ``width`` bytes per element."""
    total = (shape[0] if shape else 1) if rows is None else rows
    step = max(1, SLAB_BYTES // (width * max(1, math.prod(shape[1:]))))
    return [(first + r, min(step, total - r)) for r in range(0, total, step)]


@dataclass
class Verdict:
    """How one block compares: its largest absolute error, where (an index of the fused tensor in
    the plan's layout), and whether that is within the tolerance."""

    block: Block
    err: float = 0.0
    index: tuple[int, ...] = ()
    ok: bool = True


def _slab_error(a: torch.Tensor, e: torch.Tensor | None, allow_nonfinite: bool) -> tuple[float, tuple[int, ...]]:
    """Largest |a - e| in a slab and its index; NaN/Inf where the sources hold them must match exactly."""
    cmp = torch.float64 if torch.float64 in (a.dtype, getattr(e, "dtype", None)) or not a.is_floating_point() \
        else torch.float32
    a = a.to(cmp)
    if e is None:
        diff = a.abs()
    else:
        e = e.to(cmp)
        finite = torch.isfinite(e)
        if not bool(finite.all()):
            if not allow_nonfinite:
                raise _SourceNonFinite
            same = (a == e) | (torch.isnan(a) & torch.isnan(e))
            if not bool(same[~finite].all()):
                raise _Misplaced
            a, e = a.where(finite, 0), e.where(finite, 0)
        diff = (a - e).abs()
    if not bool(torch.isfinite(diff).all()):
        raise _Misplaced
    flat = int(diff.reshape(-1).argmax()) if diff.dim() else 0
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape)) if diff.dim() else ()
    return float(diff.reshape(-1)[flat]), index


def check_block(block: Block, lay: Layout, actual: torch.Tensor, sources: list[torch.Tensor], *, exact: bool,
                tol: float, allow_nonfinite: bool = False) -> Verdict:
    """Compare one block of ``actual`` (the fused tensor, plan layout) with what it should hold."""
    view = actual[block.where]
    verdict = Verdict(block)
    expected = _Expected(block, lay, sources, actual.dtype)
    for r0, rows in expected.slabs():
        a, e = _rows(view, r0, rows), expected.slab(r0, rows)
        if (not bool(a.any())) if e is None else torch.equal(a, e):
            continue
        for q0, q in _pieces(block.shape, r0, rows, width=8):  # where and by how much, in bounded pieces
            err, at = _slab_error(_rows(view, q0, q), None if e is None else _rows(e, q0 - r0, q), allow_nonfinite)
            if err > verdict.err:
                at = (at[0] + q0, *at[1:]) if at else at
                verdict.err, verdict.index = err, tuple(s + i for s, i in zip(block.start, at, strict=True))
    if verdict.err == 0 or exact:
        verdict.ok = verdict.err == 0
        return verdict
    scale = 0.0  # the largest magnitude the block should hold (a second pass, only for an inexact block)
    again = _Expected(block, lay, sources, actual.dtype)
    for r0, rows in again.slabs():
        e = again.slab(r0, rows)
        for q0, q in (_pieces(block.shape, 0, rows, width=8) if e is not None and e.numel() else []):
            scale = max(scale, float(_rows(e, q0, q).abs().max()))
    verdict.ok = verdict.err <= tol * max(scale, 1e-30)
    return verdict


def _fitted_scale(block: Block, actual: torch.Tensor, sources: list[torch.Tensor]) -> float:
    """The factor ``s`` that best explains an output block as ``s x source`` (least squares)."""
    term = block.terms[0]
    src, got = sources[term.source][term.region], actual[block.where]
    num = den = 0.0
    for r0, rows in _pieces(block.shape, width=8):
        s, g = _rows(src, r0, rows).double(), _rows(got, r0, rows).double()
        num += float((g * s).sum())
        den += float((s * s).sum())
    return num / den if den else float("nan")


def _holds_instead(verdict: Verdict, blocks: list[Block], lay: Layout, actual: torch.Tensor,
                   sources: list[torch.Tensor]) -> str:
    """When a block that differs holds exactly what another block of its kind should (blocks swapped,
    noise placed in the wrong block), say which."""
    b = verdict.block
    for other in blocks:
        if other is b or other.kind != b.kind or other.shape != b.shape or not other.terms:
            continue
        try:
            if check_block(replace(other, where=b.where), lay, actual, sources, exact=True, tol=0.0).ok:
                return f"; it holds what {other.label} should"
        except (_Misplaced, _SourceNonFinite):
            continue
    return ""


def diagnose(verdict: Verdict, actual: torch.Tensor, sources: list[torch.Tensor], op: str,
             blocks: list[Block] | None = None, lay: Layout | None = None) -> str:
    """One line naming the block that differs and how (and, given the tensor's other ``blocks``,
    whose value it holds instead, when it holds another block's)."""
    b, err = verdict.block, verdict.err
    where = f" at {list(verdict.index)}" if verdict.index else ""
    instead = _holds_instead(verdict, blocks, lay, actual, sources) if blocks and lay else ""
    if b.kind == "output":
        ratio = _fitted_scale(b, actual, sources)
        return (f"{b.label} is scaled by {ratio:.6g}, expected {b.scale:.6g} (weight x output scale); "
                f"max abs error {err:.3g}{where}")
    if b.kind == "diagonal":
        return f"{b.label} differs from what the rule gives (max abs {err:.3g}{where}){instead}"
    if b.kind == "off-diagonal":
        want = "the recorded noise" if b.terms else "zero"
        return f"{b.label} should be {want} (max abs error {err:.3g}{where}){instead}"
    if b.kind == "slice":
        return f"{b.label} differs (max abs {err:.3g}{where}){instead}"
    return f"differs from the {op} of the sources (max abs {err:.3g}{where})"


def _load_sources(plan: Plan, entry: PlanEntry) -> list[torch.Tensor]:
    """The sources of one tensor, each read once (a self-fusion's n copies are one tensor)."""
    refs = plan.source_refs(entry)
    if plan.options.self_fusion and entry.refs is None:
        return [refs[0].load()] * plan.n
    return [r.load() for r in refs]


def _fail(message: str, **figures) -> Check:
    return Check("tensors: decomposition", "fail", message, figures)


def verify_tensors(plan: Plan, fused: Checkpoint, strict: bool, tol: float | None) -> list[Check]:
    """Every planned tensor against the fused file (under the output format's names and layout): its
    names, then shapes and dtypes, then the blocks of each tensor; each check runs only when those it
    needs passed (``report.NEEDS``), else it is reported as skipped, naming the failed one."""
    planned = planned_names(plan)
    checks: list[Check] = []
    run_check(checks, "tensors: names", lambda: [check_names(planned, fused)])
    run_check(checks, "tensors: shapes", lambda: [check_shapes(plan, planned, fused)])
    run_check(checks, "tensors: decomposition", lambda: [check_decomposition(plan, planned, fused, strict, tol)])
    if plan.writes_head_norms:
        run_check(checks, "tensors: per-head norms", lambda: [check_head_norms(plan, fused)])
    if plan.state is not None:
        run_check(checks, "optimizer state", lambda: [_verify_state(plan, fused)])
    return checks


def check_head_norms(plan: Plan, fused: Checkpoint) -> Check:
    """The per-head norm file beside the weights: for each per-head norm (a [head_dim] scale the stock
    module applies to every head), one row per head of the fused model, each equal to the scale of the
    source that head came from (heads in source order)."""
    from ..formats.hf import HEAD_NORMS_FILE
    from ..formats.safetensors_io import read_safetensors_header

    name = "tensors: per-head norms"
    path = fused.path / HEAD_NORMS_FILE
    if not path.is_file():
        return Check(name, "fail", f"{HEAD_NORMS_FILE} is missing: grouped norms cannot give each source's heads "
                     "their own scale")
    refs, _ = read_safetensors_header(path)
    want = set(plan.head_norms)
    if set(refs) != want:
        odd = sorted(want ^ set(refs))[0]
        return Check(name, "fail", f"{HEAD_NORMS_FILE}: tensor {odd!r} is " + ("missing" if odd in want else "unexpected"))
    by_name = {e.name: e for e in plan.entries}
    for tensor, heads in plan.head_norms.items():
        entry = by_name[tensor]
        rows = refs[tensor].load()
        sources = _load_sources(plan, entry)
        shape = (sum(heads), entry.source_shapes[0][-1])
        if tuple(rows.shape) != shape or rows.dtype != entry.dtype:
            return Check(name, "fail", f"{HEAD_NORMS_FILE}: tensor {tensor!r} is {list(rows.shape)} {rows.dtype}, "
                         f"expected {list(shape)} {entry.dtype} (one row per head)")
        start = 0
        for m, count in enumerate(heads):
            block = rows[start:start + count]
            if not torch.equal(block, sources[m].to(entry.dtype).reshape(1, -1).expand(count, -1)):
                return Check(name, "fail", f"{HEAD_NORMS_FILE}: tensor {tensor!r} rows {start}..{start + count - 1} "
                             f"(the heads of source {m + 1}) are not source {m + 1}'s scale")
            start += count
    return Check(name, "pass", f"{len(want)} per-head norms: each head holds its source's scale")


def planned_names(plan: Plan) -> dict[str, PlanEntry]:
    """Each planned tensor under its name in the output format."""
    conv = plan.conversion
    return {conv.out_name(e.name): e for e in plan.entries if e.name not in conv.drop}


def check_names(planned: dict[str, PlanEntry], fused: Checkpoint) -> Check:
    """The fused checkpoint holds every planned tensor and nothing else."""
    missing = [n for n in planned if n not in fused.tensors]
    extra = [n for n in fused.tensors if n not in planned]
    if missing or extra:
        what = f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {extra[0]!r}"
        return Check("tensors: names", "fail", f"{what} ({len(missing)} missing, {len(extra)} unexpected)",
                     {"missing": missing, "unexpected": extra})
    return Check("tensors: names", "pass", f"{len(planned)} tensors, as the rules plan them")


def check_shapes(plan: Plan, planned: dict[str, PlanEntry], fused: Checkpoint) -> Check:
    """Every fused tensor has the shape its rule gives (in the output's layout) and the planned dtype."""
    wrong = []
    for out_name, entry in planned.items():
        ref = fused.tensors[out_name]
        want = plan.conversion.out_shape(entry.name, layout(plan, entry).shape)
        if tuple(ref.shape) != want:
            wrong.append(f"tensor {out_name!r} has shape {list(ref.shape)}, expected {list(want)}")
        elif ref.dtype != entry.dtype:
            wrong.append(f"tensor {out_name!r} is {ref.dtype}, expected {entry.dtype}")
    if wrong:
        more = f" ({len(wrong) - 1} more tensors differ)" if len(wrong) > 1 else ""
        return Check("tensors: shapes", "fail", wrong[0] + more, {"problems": wrong})
    return Check("tensors: shapes", "pass", f"{len(planned)} tensors have the planned shapes and dtypes")


def check_decomposition(plan: Plan, planned: dict[str, PlanEntry], fused: Checkpoint, strict: bool,
                        tol: float | None) -> Check:
    """Every fused tensor, block by block, against what its rule makes of the sources (the first that
    differs is named, with a diagnosis)."""
    worst = 0.0
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="deepfuse-verify") as pool:
        for out_name, entry in planned.items():
            failure, err = _verify_entry(plan, entry, fused.tensors[out_name], out_name, strict, tol, pool)
            if failure is not None:
                return failure
            worst = max(worst, err)
    noise = plan.options.describe_noise()
    return Check("tensors: decomposition", "pass",
                 f"every tensor decomposes into its sources as its rule says (noise: {noise['mode']})",
                 {"max_abs_error": worst, "tensors": len(plan.entries)})


def _verify_entry(plan: Plan, entry: PlanEntry, ref: TensorRef, out_name: str, strict: bool,
                  tol: float | None, pool: Executor | None = None) -> tuple[Check | None, float]:
    """One fused tensor, block by block (blocks with noise checked side by side on ``pool``: drawing
    the noise again is most of their cost): (a failed check or None, its largest absolute error). Its
    shape and dtype are the planned ones (:func:`check_shapes` passed)."""
    sources = _load_sources(plan, entry)
    lay = layout(plan, entry, sources)
    try:
        blocks = decompose(lay)
    except CannotDecompose as exc:
        return _fail(f"tensor {entry.name!r} cannot be verified: {exc} (rules[{entry.rule_index}])",
                     tensor=entry.name, rule=entry.rule_index, op=entry.rule.op), 0.0
    actual = ref.load()
    if entry.name in plan.conversion.transpose:  # compare in the plan's layout: the diagnosis speaks of its blocks
        actual = actual.t()
    exact = strict or actual.dtype not in TOLERANT
    limit = tol if tol is not None else default_tensor_tol(actual.dtype)

    def check(block: Block) -> Verdict:
        return check_block(block, lay, actual, sources, exact=exact, tol=limit,
                           allow_nonfinite=plan.options.allow_nonfinite)

    try:
        if pool is not None and lay.noise is not None:
            verdicts = list(pool.map(check, blocks))
        else:
            verdicts = [check(block) for block in blocks]
    except _Misplaced:
        return _fail(f"tensor {out_name!r}: non-finite values are not where the sources put them",
                     tensor=out_name), 0.0
    except _SourceNonFinite:
        bad = [m for m, t in enumerate(sources) if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        where = (plan.source_refs(entry)[bad[0]].source or str(plan.sources[bad[0]].path)) if bad else "the sources"
        raise InputError(f"{where}: tensor {entry.name!r} gives non-finite values (NaN or Inf), but the fusion "
                         "recorded none", "verify against the sources the fusion read (--sources)") from None
    failed = [v for v in verdicts if not v.ok]
    err = max((v.err for v in verdicts), default=0.0)
    check = None
    if failed:
        worst = max(failed, key=lambda v: v.err)
        more = len(failed) - 1
        others = f"; {more} more of its {len(blocks)} blocks differ{'s' if more == 1 else ''}" if more else ""
        check = _fail(f"tensor {entry.name!r}: {diagnose(worst, actual, sources, entry.rule.op, blocks, lay)}{others}",
                      tensor=entry.name, max_abs_error=err, rule=entry.rule_index, op=entry.rule.op,
                      block=worst.block.label, blocks_differing=[v.block.label for v in failed])
    if entry.nbytes >= TRIM_AFTER_BYTES:
        del actual, sources
        release_free_memory()
    return check, err


def _verify_state(plan: Plan, fused: Checkpoint) -> Check:
    """The fused optimizer state against its recomputation from the sources' state."""
    stored = fused.metadata.get("optimizer_state") or {}
    for entry in plan.state.entries:
        ref = stored.get(entry.name)
        if ref is None or tuple(ref.shape) != entry.shape:
            what = "missing" if ref is None else f"has shape {list(ref.shape)}, expected {list(entry.shape)}"
            return Check("optimizer state", "fail", f"{entry.name} {what}", {"tensor": entry.name})
        actual, expected = ref.load().double(), plan.state.compute(entry).double()
        err = float((actual - expected).abs().max()) if actual.numel() else 0.0
        if err > 1e-6 * max(float(expected.abs().max()) if expected.numel() else 0.0, 1e-30):
            return Check("optimizer state", "fail", f"{entry.name} differs from the fused sources' state (max abs {err:.3g})",
                         {"tensor": entry.name, "max_abs_error": err})
    return Check("optimizer state", "pass", f"{len(plan.state.entries)} Adafactor slots are the sources' state, "
                 f"scaled and placed as the parameters (factoring threshold {plan.state.min_dim})",
                 {"tensors": len(plan.state.entries), "min_dim_size_to_factor": plan.state.min_dim})
