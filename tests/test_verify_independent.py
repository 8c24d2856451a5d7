"""The tensor-level check is a second opinion, not a mirror: it never runs the code that fuses, so a
fusion op that places, scales or seeds a block wrongly is caught (a recomputation with the same op
would agree with the broken file), and the diagnosis names the block. Plus properties of the
decomposition itself: its blocks tile the fused tensor, and a change anywhere is pinned on the
block that holds it."""

from __future__ import annotations

import json
import math
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from deepfuse_cli import compute, fuse, ops
from deepfuse_cli.ops.noise import OffDiagonalNoise
from deepfuse_cli.ops.registry import FuseContext
from deepfuse_cli.rules.schema import Rule
from deepfuse_cli.verify import VerifyOptions
from deepfuse_cli.verify import run as verify_run
from deepfuse_cli.verify.decompose import DECOMPOSITIONS, Layout, Noise, decompose
from deepfuse_cli.verify.tensor_level import check_block

from .helpers import cli
from .test_verify import edit

#: what verify may run of ``deepfuse_cli.ops``: the noise definition (its stream and seeding) and the RMS
#: that sets the noise scale; nothing that builds fused values
NOISE_DEFINITION = {"GaussianStream", "__init__", "_draw", "take", "noise_seed", "rms", "_sum_squares"}
_OPS = Path(ops.__file__)
OPS_CODE = str(_OPS.parent if _OPS.name == "__init__.py" else _OPS.with_suffix(""))  # ops.py, or a package ops/


def tensor_checks(out, captured: dict | None = None) -> dict:
    """The tensor-level checks of ``deepfuse verify OUT`` (no function check), by name; ``captured``
    receives the plan and the opened fused checkpoint."""
    if captured is not None:
        real = verify_run.verify_tensors

        def spy(plan, fused, strict, tol):
            captured.update(plan=plan, fused=fused)
            return real(plan, fused, strict, tol)

        verify_run.verify_tensors = spy
    try:
        report = verify_run.run_verify(out, VerifyOptions(function=False))
    finally:
        if captured is not None:
            verify_run.verify_tensors = real
    return {c.name: c for c in report.checks}


def test_tensor_level_never_runs_the_fusion(hf_fixtures, tmp_path, monkeypatch):
    """With fuse.compute_tensor made to raise, verify still passes, and of the ops code only the noise
    definition runs: every op (block-diagonal with both noise modes, concat, split-fuse-concat, output
    and bias averages, passthrough) is checked from the decomposition alone."""
    outs = {"pres": ("self-fuse", hf_fixtures / "llama-a", "--noise-scale", "0.05", "--noise-mode", "preserving"),
            "gpt2": ("fuse", hf_fixtures / "gpt2-a", hf_fixtures / "gpt2-b", "--noise-std", "0.01"),
            "mlp": ("fuse", hf_fixtures / "mlp-a", hf_fixtures / "mlp-wide", "--weights", "0.3,0.7")}
    for key, args in outs.items():
        cli(*args, "-o", tmp_path / key, "-q")

    def refuse(*args, **kwargs):
        raise AssertionError("the tensor-level check ran the fusion code")

    ran: set[str] = set()

    def watch(frame, event, arg):  # every Python function of the ops code that runs, on any thread
        if event == "call" and frame.f_code.co_filename.startswith(OPS_CODE):
            ran.add(frame.f_code.co_name)

    monkeypatch.setattr(compute, "compute_tensor", refuse)
    monkeypatch.setattr(fuse, "compute_tensor", refuse)
    real = verify_run.verify_tensors

    def watched(*args):
        threading.setprofile(watch)
        sys.setprofile(watch)
        try:
            return real(*args)
        finally:
            sys.setprofile(None)
            threading.setprofile(None)

    monkeypatch.setattr(verify_run, "verify_tensors", watched)
    for key in outs:
        checks = tensor_checks(tmp_path / key)
        assert checks["tensors: decomposition"].status == "pass", checks["tensors: decomposition"].message
    assert ran and ran <= NOISE_DEFINITION, ran - NOISE_DEFINITION


def _patched(monkeypatch, name: str, change):
    """Replace the registered op ``name``'s row blocks by ``change(original)(tensors, rule, ctx)``: fuse
    writes with the broken op, and a recomputation with it would agree."""
    op = ops.get(name)
    monkeypatch.setattr(type(op), "rows", change(type(op).rows))


def _scale_twice(orig):
    def call(self, tensors, rule, ctx):
        return orig(self, tensors, rule, replace(ctx, scales=[2 * s for s in ctx.scales]))
    return call


def _swap_sources(orig):
    return lambda self, tensors, rule, ctx: orig(self, list(reversed(tensors)), rule, ctx)


_swap_slices = _swap_sources  # the concat op only (the output average is an op of its own)


class _TransposedNoise:
    """The noise of block (j, i) where block (i, j) is asked for."""

    def __init__(self, noise):
        self._noise, self.preserving = noise, noise.preserving

    def stream(self, i, j, numel):
        return self._noise.stream(j, i, numel)

    def part(self, k):
        return _TransposedNoise(self._noise.part(k))


def _transpose_noise(orig):
    def call(self, tensors, rule, ctx):
        return orig(self, tensors, rule, replace(ctx, noise=_TransposedNoise(ctx.noise)) if ctx.noise else ctx)
    return call


def _other_input_axis(orig):
    def call(self, tensors, rule, ctx):
        a0, a1 = rule.widened_axes
        return orig(self, tensors, rule.model_copy(update={"input_axis": a1 if rule.input_axis == a0 else a0}), ctx)
    return call


BROKEN_OPS = {  # what the op gets wrong -> (op patched, change, command, words of the diagnosis)
    "output scale doubled": ("output_average", _scale_twice, ("self-fuse", "llama-a"),
                             ["output block of source", "is scaled by 1, expected 0.5"]),
    "diagonal blocks swapped": ("block_diagonal", _swap_sources, ("fuse", "llama-a", "llama-b"),
                                ["diagonal block", "differs from what the rule gives", "it holds what diagonal block"]),
    "slices swapped": ("concat", _swap_slices, ("fuse", "llama-a", "llama-b"),
                       ["slice of source", "it holds what slice of source"]),
    "noise in the transposed block": ("block_diagonal", _transpose_noise, ("self-fuse", "llama-a", "--noise-std", "0.01"),
                                      ["off-diagonal block (", "should be the recorded noise",
                                       "it holds what off-diagonal block ("]),
    "compensation along the output axis": ("block_diagonal", _other_input_axis,
                                           ("self-fuse", "llama-a", "--times", "3", "--noise-scale", "0.05",
                                            "--noise-mode", "preserving"), ["diagonal block"]),
}


@pytest.mark.parametrize("what", list(BROKEN_OPS))
def test_a_wrong_fusion_op_is_caught_where_a_mirror_agrees(what, hf_fixtures, tmp_path, monkeypatch):
    op, change, (command, *args), words = BROKEN_OPS[what]
    args = [hf_fixtures / a if a.startswith(("llama", "gpt2", "mlp")) else a for a in args]
    _patched(monkeypatch, op, change)
    out = tmp_path / "out"
    cli(command, *args, "-o", out, "-q")
    captured: dict = {}
    check = tensor_checks(out, captured)["tensors: decomposition"]
    assert check.status == "fail" and check.figures["op"] == op, check.message
    tensor = check.figures["tensor"]
    for w in words:
        assert w in check.message, check.message
    plan, fused_ck = captured["plan"], captured["fused"]
    entry = next(e for e in plan.entries if e.name == tensor)
    mirror = compute.compute_tensor(plan, entry)  # what the former check compared with: the same broken op
    assert torch.equal(mirror.to(entry.dtype), fused_ck.tensors[tensor].load())


def test_noise_moved_to_the_other_block_in_the_file(hf_fixtures, tmp_path):
    out = tmp_path / "sf"
    cli("self-fuse", hf_fixtures / "llama-a", "-o", out, "--noise-std", "0.01", "-q")
    name = "model.layers.1.mlp.down_proj.weight"  # [hidden, mlp] x2: blocks of 16 x 24

    def swap(t):
        upper, lower = t[:16, 24:].clone(), t[16:, :24].clone()
        t[:16, 24:], t[16:, :24] = lower, upper
        return t

    edit(out, name, swap)
    check = tensor_checks(out)["tensors: decomposition"]
    assert check.status == "fail" and "should be the recorded noise" in check.message
    assert "it holds what off-diagonal block (" in check.message
    assert set(check.figures["blocks_differing"]) == {"off-diagonal block (1, 2)", "off-diagonal block (2, 1)"}


def test_output_block_scaled_in_one_source_only(hf_fixtures, tmp_path):
    out = tmp_path / "ab"
    cli("fuse", hf_fixtures / "llama-a", hf_fixtures / "llama-b", "--weights", "0.25,0.75", "-o", out, "-q")
    edit(out, "lm_head.weight", lambda t: torch.cat([t[:, :16], 2 * t[:, 16:]], dim=1))
    check = tensor_checks(out)["tensors: decomposition"]
    assert "output block of source 2 is scaled by 1.5, expected 0.75" in check.message
    assert check.figures["blocks_differing"] == ["output block of source 2"]


def test_an_op_without_decomposition_fails_loudly(llama_sf, monkeypatch):
    monkeypatch.delitem(DECOMPOSITIONS, "concat")
    check = tensor_checks(llama_sf)["tensors: decomposition"]
    assert check.status == "fail" and "knows no decomposition for op 'concat'" in check.message
    assert "cannot be verified" in check.message


@pytest.fixture
def llama_sf(hf_fixtures, tmp_path):
    out = tmp_path / "sf"
    cli("self-fuse", hf_fixtures / "llama-a", "-o", out, "-q")
    return out


def test_verify_reads_each_self_fused_source_once(llama_sf, monkeypatch):
    """Self-fusion: the n copies of a source tensor are one read."""
    from deepfuse_cli.ir import TensorRef

    reads: dict[str, int] = {}
    real_load, real_check = TensorRef.load, verify_run.verify_tensors
    counting = []

    def load(self):
        if counting:
            reads[self.name] = reads.get(self.name, 0) + 1
        return real_load(self)

    def check(*args):  # count the reads of the tensor-level check only (planning reads tied outputs)
        counting.append(True)
        try:
            return real_check(*args)
        finally:
            counting.clear()

    monkeypatch.setattr(TensorRef, "load", load)
    monkeypatch.setattr(verify_run, "verify_tensors", check)
    assert tensor_checks(llama_sf)["tensors: decomposition"].status == "pass"
    state = load_file(llama_sf / "model.safetensors")
    assert reads and all(reads[name] <= 2 for name in state), reads  # the fused tensor once, its source once


# Properties of the decomposition -----------------------------------------------------------------

def _rule(op: str, axes: list[str], **kw) -> Rule:
    return Rule(pattern="t", op=op, axes=axes, **kw)


@st.composite
def fusions(draw):
    """A rule, its sources and their fused value built by the fusion ops (the code under test)."""
    n = draw(st.integers(2, 3))
    kind = draw(st.sampled_from(["block_diagonal", "concat", "output_average", "split2", "split1", "bias_average"]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    noise_mode = draw(st.sampled_from([None, "offdiag", "preserving"])) if kind in ("block_diagonal", "split2") else None
    equal = noise_mode == "preserving"  # compensation needs equal blocks (self-fusion)
    parts = draw(st.sampled_from([2, 3]))
    widths = [draw(st.integers(1, 4)) for _ in range(n)]
    widths = [widths[0]] * n if equal else widths
    heights = [widths[0]] * n if equal else [draw(st.integers(1, 4)) for _ in range(n)]
    shared = draw(st.integers(1, 3))
    input_axis = draw(st.sampled_from([0, 1]))
    if kind == "block_diagonal":
        rule, shapes = _rule("block_diagonal", ["mlp", "hidden"], input_axis=input_axis), list(zip(heights, widths))
    elif kind == "split2":
        rule = _rule("split_fuse_concat", ["hidden", "qkv"], input_axis=input_axis, parts=parts)
        shapes = [(h, parts * w) for h, w in zip(heights, widths)]
    elif kind == "split1":
        rule, shapes = _rule("split_fuse_concat", ["qkv"], parts=parts), [(parts * w,) for w in widths]
    elif kind in ("concat", "output_average"):
        rule, shapes = _rule(kind, ["vocab", "hidden"]), [(shared, w) for w in widths]
    else:
        rule, shapes = _rule("bias_average", ["classes"]), [(shared,)] * n
    seed = draw(st.integers(0, 2**31))
    gen = torch.Generator().manual_seed(seed)
    sources = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    raw = [draw(st.integers(1, 5)) for _ in range(n)]
    weights = [w / sum(raw) for w in raw]
    scales = [w * draw(st.sampled_from([1.0, 0.25, 3.0])) for w in weights]
    noise = None if noise_mode is None else Noise(seed=seed, std=0.1, preserving=noise_mode == "preserving")
    lay = Layout(name="t", rule=rule, source_shapes=shapes, weights=weights, scales=scales, noise=noise)
    return lay, sources, _fuse_with_ops(lay, sources, dtype)


def _fuse_with_ops(lay: Layout, sources, dtype):
    """The fused value the registered op computes (its row blocks, gathered)."""
    noise = lay.noise
    ctx = FuseContext(dtype=dtype, weights=lay.weights, scales=lay.scales,
                      noise=None if noise is None else OffDiagonalNoise(noise.seed, lay.name, noise.std,
                                                                         preserving=noise.preserving))
    blocks = [b.clone() for b in ops.get(lay.rule.op).rows(sources, lay.rule, ctx)]  # ring buffers are reused
    return blocks[0] if len(blocks) == 1 and blocks[0].dim() == 0 else torch.cat(blocks)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fusions(), st.data())
def test_blocks_tile_the_tensor_and_pin_a_change_on_its_block(case, data):
    lay, sources, fused = case
    blocks = decompose(lay)
    assert tuple(fused.shape) == lay.shape
    cover = torch.zeros(lay.shape, dtype=torch.int32)
    for b in blocks:
        cover[b.where] += 1
    assert bool((cover == 1).all())  # every element in exactly one block
    verdicts = [check_block(b, lay, fused, sources, exact=True, tol=0.0) for b in blocks]
    assert all(v.ok for v in verdicts), [(v.block.label, v.err) for v in verdicts if not v.ok]
    # one element changed: exactly the block holding it fails, at that element
    flat = data.draw(st.integers(0, fused.numel() - 1))
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), fused.shape))
    tampered = fused.clone()
    tampered[index] = tampered[index] + (1.0 + abs(float(tampered[index])))
    failed = [v for v in (check_block(b, lay, tampered, sources, exact=True, tol=0.0) for b in blocks) if not v.ok]
    assert len(failed) == 1 and failed[0].index == index
    holder = next(b for b in blocks if all(s.start <= i < s.stop for s, i in
                                           zip((_bounds(s, n) for s, n in zip(b.where, lay.shape)), index)))
    assert failed[0].block == holder
    tolerant = check_block(holder, lay, tampered, sources, exact=False, tol=1e-2)
    assert not tolerant.ok and math.isclose(tolerant.err, failed[0].err)


def _bounds(s: slice, size: int) -> range:
    return range(*s.indices(size))


def test_noise_std_from_noise_scale_is_the_rms_of_the_sources(hf_fixtures, tmp_path):
    """--noise-scale: std = scale x RMS of the sources of that tensor; a file fused with another std fails."""
    out = tmp_path / "o"
    cli("self-fuse", hf_fixtures / "llama-a", "-o", out, "--noise-scale", "0.05", "-q")
    assert tensor_checks(out)["tensors: decomposition"].status == "pass"
    manifest = json.loads((out / "deepfuse.json").read_text())
    manifest["noise"]["scale"] = 0.1  # verify now expects twice the noise
    (out / "deepfuse.json").write_text(json.dumps(manifest))
    check = tensor_checks(out)
    assert check["tensors: decomposition"].status == "fail"
    assert "should be the recorded noise" in check["tensors: decomposition"].message


def test_transposed_conversion_diagnosed_in_the_plans_layout(tmp_path):
    """T5X kernels [in, out] written as transformers weights [out, in]: a value in a zero block of the
    stored tensor is reported at its place in the plan's (T5X) layout."""
    from .conftest import FIXTURES

    out = tmp_path / "hf"
    cli("self-fuse", FIXTURES / "t5x" / "legacy-a", "--times", "2", "--to", "safetensors", "-o", out, "-q")
    name = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"  # stored [2 x mlp 24, 2 x emb 16]
    edit(out, name, lambda t: t.index_put_((torch.tensor([0]), torch.tensor([16 + 1])), torch.tensor(3.0)))
    check = tensor_checks(out)["tensors: decomposition"]
    assert check.status == "fail" and check.figures["tensor"] == "target/encoder/layers_0/mlp/wi_0/kernel"
    assert "off-diagonal block (2, 1) should be zero (max abs error 3 at [17, 0])" in check.message
