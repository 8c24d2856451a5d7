"""Tensor-level verification: each fused tensor against what its rule makes of the sources.

Works for any rules file: the expected tensor is recomputed with the same ops (noise regenerated
bit-exactly from seed and name), and a mismatch is explained in terms of the rule's blocks.
"""

from __future__ import annotations

import torch

from ..fuse import compute_tensor
from ..ir import Checkpoint
from ..plan import Plan, PlanEntry
from .report import Check

HALF = (torch.float16, torch.bfloat16)


def default_tensor_tol(dtype: torch.dtype) -> float:
    return 1e-2 if dtype in HALF else 1e-6


def _locate(pos: int, sizes: list[int]) -> tuple[int, int]:
    start = 0
    for m, s in enumerate(sizes):
        if pos < start + s:
            return m, pos - start
        start += s
    return len(sizes) - 1, pos - start


def _blocks(plan: Plan, entry: PlanEntry, index: tuple[int, ...]) -> tuple[list[int], int | None]:
    """Source block index along each widened axis for a flat position, and the qkv part if any."""
    rule = entry.rule
    part = None
    blocks = []
    for ax in rule.widened_axes:
        sizes = [s[ax] for s in entry.source_shapes]
        pos = index[ax]
        if rule.axes[ax] == "qkv":
            per_part = entry.shape[ax] // rule.parts
            part, pos = divmod(pos, per_part)
            sizes = [s // rule.parts for s in sizes]
        blocks.append(_locate(pos, sizes)[0])
    return blocks, part


def diagnose(plan: Plan, entry: PlanEntry, actual: torch.Tensor, expected: torch.Tensor) -> str:
    """A one-line description of where and how ``actual`` departs from ``expected``."""
    rule = entry.rule
    diff = (actual.to(torch.float64) - expected.to(torch.float64)).abs()
    flat = int(diff.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape)) if diff.dim() else ()
    worst = float(diff.max())
    where = f"at {list(index)}" if index else ""
    blocks, part = _blocks(plan, entry, index) if index else ([], None)
    part_txt = f" of part {'qkv'[part] if rule.parts == 3 else part}" if part is not None else ""
    if rule.op == "output_average":
        m = blocks[0]
        ax = rule.widened_axes[0]
        start = sum(s[ax] for s in entry.source_shapes[:m])
        src = plan.tensors[m][entry.name].load().to(torch.float64)
        block = actual.to(torch.float64).narrow(ax, start, entry.source_shapes[m][ax])
        denom = float((src * src).sum())
        ratio = float((block * src).sum()) / denom if denom else float("nan")
        return (f"output block of source {m + 1} is scaled by {ratio:.6g}, expected {entry.scales[m]:.6g} "
                f"(weight x output scale); max abs error {worst:.3g} {where}")
    if len(blocks) == 2:
        i, j = blocks
        if i == j:
            return (f"diagonal block {i + 1}{part_txt} (source {i + 1}) differs from what the rule gives "
                    f"(max abs {worst:.3g} {where})")
        want = "the recorded noise" if entry.noise else "zero"
        return f"off-diagonal block ({i + 1}, {j + 1}){part_txt} should be {want} (max abs error {worst:.3g} {where})"
    if len(blocks) == 1:
        return f"slice of source {blocks[0] + 1}{part_txt} differs (max abs {worst:.3g} {where})"
    return f"differs from the {rule.op} of the sources (max abs {worst:.3g} {where})"


def verify_tensors(plan: Plan, fused: Checkpoint, strict: bool, tol: float | None) -> list[Check]:
    """Every planned tensor against the fused file (under the output format's names and layout)."""
    conv = plan.conversion
    checks: list[Check] = []
    planned = {conv.out_name(e.name): e for e in plan.entries if e.name not in conv.drop}
    missing = [n for n in planned if n not in fused.tensors]
    extra = [n for n in fused.tensors if n not in planned]
    if missing or extra:
        what = f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {extra[0]!r}"
        checks.append(Check("tensors: names", "fail", f"{what} ({len(missing)} missing, {len(extra)} unexpected)",
                            {"missing": missing, "unexpected": extra}))
        return checks
    checks.append(Check("tensors: names", "pass", f"{len(planned)} tensors, as the rules plan them"))
    worst = 0.0
    for out_name, entry in planned.items():
        ref = fused.tensors[out_name]
        want = conv.out_shape(entry.name, entry.shape)
        if ref.shape != want:
            checks.append(Check("tensors: decomposition", "fail",
                                f"tensor {out_name!r} has shape {list(ref.shape)}, expected {list(want)}",
                                {"tensor": out_name}))
            return checks
        actual = ref.load()
        expected = compute_tensor(plan, entry).to(actual.dtype)
        if entry.name in conv.transpose:  # compare in the plan's layout, so the diagnosis speaks of its blocks
            actual = actual.t()
        if actual.is_floating_point() and not (torch.isfinite(actual).all() and torch.isfinite(expected).all()):
            # non-finite sources (--allow-nonfinite): NaN/Inf must sit exactly where the rule puts them
            same = (actual == expected) | (torch.isnan(actual) & torch.isnan(expected))
            if not bool(same[~torch.isfinite(expected)].all()) or not bool(torch.isfinite(actual[torch.isfinite(expected)]).all()):
                checks.append(Check("tensors: decomposition", "fail", f"tensor {out_name!r}: non-finite values are not "
                                    "where the sources put them", {"tensor": out_name}))
                return checks
            mask = torch.isfinite(expected)  # compare the rest; keep the shape for the diagnosis
            actual, expected = actual.where(mask, 0), expected.where(mask, 0)
        if strict or actual.dtype not in (torch.float32, torch.float64, *HALF):
            ok = torch.equal(actual, expected)
            err = 0.0 if ok else float((actual.double() - expected.double()).abs().max())
        else:
            err = float((actual.double() - expected.double()).abs().max()) if actual.numel() else 0.0
            scale = max(float(expected.double().abs().max()) if expected.numel() else 0.0, 1e-30)
            ok = err <= (tol if tol is not None else default_tensor_tol(actual.dtype)) * scale
        if ref.dtype != entry.dtype:
            checks.append(Check("tensors: decomposition", "fail",
                                f"tensor {entry.name!r} is {ref.dtype}, expected {entry.dtype}", {"tensor": entry.name}))
            return checks
        if not ok:
            checks.append(Check("tensors: decomposition", "fail", f"tensor {entry.name!r}: {diagnose(plan, entry, actual, expected)}",
                                {"tensor": entry.name, "max_abs_error": err, "rule": entry.rule_index, "op": entry.rule.op}))
            return checks
        worst = max(worst, err)
    noise = plan.options.describe_noise()
    checks.append(Check("tensors: decomposition", "pass",
                        f"every tensor decomposes into its sources as its rule says (noise: {noise['mode']})",
                        {"max_abs_error": worst, "tensors": len(plan.entries)}))
    if plan.state is not None:
        checks.append(_verify_state(plan, fused))
    return checks


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
