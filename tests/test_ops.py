"""Property tests of the fusion ops, looked up in the op registry as the core does: the
mathematics, independent of names and formats.

Every op yields its value as row blocks; the expected values here are written from the
definitions (DESIGN section 2: block-diagonal, concatenation, weighted averages, noise placement),
not with the ops' code, and the row blocks must equal them bit for bit at any row-block size.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepfuse_cli import ops
from deepfuse_cli.rules.schema import OPS, Rule

settings.register_profile("deepfuse", deadline=None, max_examples=60)
settings.load_profile("deepfuse")

Tensor = torch.Tensor
dims = st.integers(min_value=1, max_value=6)
float_dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64])


def rule(op: str, axes: list[str], **fields) -> Rule:
    """A validated rule, as a rules file would give it."""
    return Rule(pattern="t", op=op, axes=axes, **fields)


def drain(blocks, keep: int = 2) -> Tensor:
    """Concatenate row blocks, holding the last ``keep`` of them as a writer may (ring reuse)."""
    out, held = [], []
    for b in blocks:
        held.append(b)
        if len(held) > keep:
            out.append(held.pop(0).clone())
    out.extend(h.clone() for h in held)
    return torch.cat(out, 0)


def fuse(r: Rule, tensors: list[Tensor], dtype: torch.dtype | None = None, **ctx) -> Tensor:
    """The op's row blocks, concatenated: the fused value."""
    context = ops.FuseContext(dtype=dtype or tensors[0].dtype, **ctx)
    return drain(ops.get(r.op).rows(tensors, r, context))


def block_rule(axes: tuple[int, int], ndim: int, input_axis: int) -> Rule:
    roles = ["shared"] * ndim
    for ax, role in zip(axes, ("mlp", "hidden"), strict=True):
        roles[ax] = role
    return rule("block_diagonal", roles, input_axis=input_axis)


# ---- the expected values, from the definitions -----------------------------------------------------


def slices(sizes: list[int]) -> list[slice]:
    out, pos = [], 0
    for s in sizes:
        out.append(slice(pos, pos + s))
        pos += s
    return out


def expected_block_diagonal(ts: list[Tensor], axes: tuple[int, int], dtype: torch.dtype,
                            noise: ops.OffDiagonalNoise | None = None, input_axis: int | None = None,
                            prefix: tuple[int, ...] = ()) -> Tensor:
    """Sources on the diagonal; off the diagonal zeros, or N_ij = gaussian(seed, name, (*prefix, i, j))
    placed as they are drawn; preserving: the diagonal (in fp32) minus the noise reaching its output
    block from every other input block."""
    a0, a1 = axes
    n = len(ts)
    shape = list(ts[0].shape)
    shape[a0], shape[a1] = sum(t.shape[a0] for t in ts), sum(t.shape[a1] for t in ts)
    s0, s1 = slices([t.shape[a0] for t in ts]), slices([t.shape[a1] for t in ts])
    out = torch.zeros(shape, dtype=dtype)

    def at(i: int, j: int) -> tuple[slice, ...]:
        idx = [slice(None)] * len(shape)
        idx[a0], idx[a1] = s0[i], s1[j]
        return tuple(idx)

    noisy = noise is not None and n > 1
    drawn = {}
    if noisy:
        for i in range(n):
            for j in range(n):
                if i != j:
                    bs = list(ts[0].shape)
                    bs[a0], bs[a1] = ts[i].shape[a0], ts[j].shape[a1]
                    drawn[(i, j)] = ops.gaussian(noise.seed, noise.name, (*prefix, i, j), tuple(bs), noise.std)
                    out[at(i, j)] = drawn[(i, j)].to(dtype)
    for m, t in enumerate(ts):
        if not noisy:
            out[at(m, m)] = t.to(dtype)
            continue
        diag = t.to(torch.float32)
        if noise.preserving:
            for other in range(n):  # block (input a, output m) for every input a != m
                if other != m:
                    diag = diag - drawn[(other, m) if input_axis == a0 else (m, other)]
        out[at(m, m)] = diag.to(dtype)
    return out


def expected_concat(ts: list[Tensor], axis: int, dtype: torch.dtype, scales: list[float] | None = None) -> Tensor:
    """Sources side by side along ``axis``; source m times scales[m], computed in fp32 (or wider)."""
    parts = []
    for m, t in enumerate(ts):
        if scales is None or scales[m] == 1.0:
            parts.append(t.to(dtype))
        else:
            parts.append((t.to(torch.promote_types(torch.float32, t.dtype)) * scales[m]).to(dtype))
    return torch.cat(parts, dim=axis)


# ---- the registry ------------------------------------------------------------------------------------


IDENTITY_RULES = {  # op -> a rule for a 2-D tensor and the context fields of one source
    "block_diagonal": (rule("block_diagonal", ["mlp", "hidden"], input_axis=1), {}),
    "concat": (rule("concat", ["vocab", "hidden"]), {}),
    "split_fuse_concat": (rule("split_fuse_concat", ["hidden", "qkv"], parts=2, input_axis=0), {}),
    "output_average": (rule("output_average", ["vocab", "hidden"]), {"scales": [1.0]}),
    "bias_average": (rule("bias_average", ["classes", "shared"]), {"weights": [1.0]}),
    "passthrough_identical": (rule("passthrough_identical", ["shared", "shared"]), {}),
    "expert_in": (rule("expert_in", ["expert_mlp", "hidden"]), {}),
    "expert_out": (rule("expert_out", ["hidden", "expert_mlp"]), {}),
    "expert_stack_out": (rule("expert_stack_out", ["experts", "hidden"], input_axis=0), {}),
    "shared_average": (rule("shared_average", ["shared", "shared"]), {"weights": [1.0]}),
}


def test_every_op_is_registered_described_and_tested():
    assert list(ops.OPS) == list(OPS) == list(IDENTITY_RULES)
    for name, op in ops.OPS.items():
        assert op.name == name and ops.get(name) is op
        assert OPS[name] == op.description and op.description
    with pytest.raises(KeyError, match="known ops: block_diagonal"):
        ops.get("explode")


def test_rules_name_registered_ops_only():
    with pytest.raises(ValueError, match="unknown op 'explode'; known ops: block_diagonal, concat"):
        rule("explode", ["hidden"])
    for op, axes, fields, message in [
        ("block_diagonal", ["hidden", "vocab"], {"input_axis": 0}, "block_diagonal needs exactly 2 widened axes"),
        ("block_diagonal", ["hidden", "mlp"], {}, "block_diagonal needs input_axis"),
        ("concat", ["hidden", "mlp"], {}, "concat needs exactly 1 widened axis, axes ['hidden', 'mlp'] have 2"),
        ("output_average", ["vocab", "mlp"], {}, "output_average concatenates along a 'hidden' axis"),
        ("bias_average", ["hidden"], {}, "bias_average takes no widened axis"),
        ("split_fuse_concat", ["hidden", "mlp"], {"parts": 3}, "needs exactly one 'qkv' axis and 'parts'"),
        ("split_fuse_concat", ["hidden", "qkv"], {"parts": 3}, "over two widened axes needs input_axis"),
        ("concat", ["qkv"], {}, "the 'qkv' role is only valid with op split_fuse_concat"),
        ("concat", ["hidden"], {"input_axis": 0},
         "input_axis is only meaningful for block_diagonal / split_fuse_concat / expert_stack_out, not concat"),
        ("concat", ["hidden"], {"parts": 2}, "parts is only meaningful for split_fuse_concat"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            rule(op, axes, **fields)


def test_op_flags():
    unscaled = {name for name, op in ops.OPS.items() if not op.scales_gradients}
    assert unscaled == {"output_average", "bias_average"}
    assert [name for name, op in ops.OPS.items() if op.averages_outputs] == ["output_average"]
    assert [name for name, op in ops.OPS.items() if op.any_dtype] == ["passthrough_identical"]


@given(st.integers(0, 2**31 - 1), dims, dims)
def test_n_equals_one_is_identity(seed, rows, cols):
    w = torch.randn(rows, 2 * cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for r, ctx in IDENTITY_RULES.values():
        assert tuple(ops.get(r.op).shape([w.shape], r)) == tuple(w.shape), r.op
        assert torch.equal(fuse(r, [w], **ctx), w), r.op


# ---- the mathematics -----------------------------------------------------------------------------------


@st.composite
def sources(draw, n_min=1, n_max=4, same_width=False):
    """n source kernels [out_m, in_m] (torch layout) with matching inputs x_m [batch, in_m]."""
    n = draw(st.integers(n_min, n_max))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    if same_width:
        o, i = draw(dims), draw(dims)
        shapes = [(o, i)] * n
    else:
        shapes = [(draw(dims), draw(dims)) for _ in range(n)]
    ws = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    xs = [torch.randn(3, s[1], generator=g, dtype=torch.float64) for s in shapes]
    return ws, xs


KERNEL = rule("block_diagonal", ["mlp", "hidden"], input_axis=1)


@given(sources())
def test_block_diagonal_computes_each_source_on_its_slice(data):
    ws, xs = data
    fused = fuse(KERNEL, ws)
    y = torch.cat(xs, dim=1) @ fused.T
    expected = torch.cat([x @ w.T for w, x in zip(ws, xs)], dim=1)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)


@given(sources())
def test_block_diagonal_off_diagonal_is_zero_and_diagonal_is_source(data):
    ws, _ = data
    fused = fuse(KERNEL, ws)
    assert fused.shape == ops.get("block_diagonal").shape([w.shape for w in ws], KERNEL)
    r = 0
    for i, wi in enumerate(ws):
        c = 0
        for j, wj in enumerate(ws):
            block = fused[r:r + wi.shape[0], c:c + wj.shape[1]]
            if i == j:
                assert torch.equal(block, wi)
            else:
                assert not block.any()
            c += wj.shape[1]
        r += wi.shape[0]


@given(sources(n_min=2), st.integers(0, 1000))
def test_offdiagonal_noise_is_the_seeded_noise_of_each_block(data, seed):
    ws, _ = data
    ws = [w.to(torch.float32) for w in ws]
    noise = ops.OffDiagonalNoise(seed, "p", 0.1)
    fused = fuse(KERNEL, ws, noise=noise)
    rows, cols = slices([w.shape[0] for w in ws]), slices([w.shape[1] for w in ws])
    for i in range(len(ws)):
        for j in range(len(ws)):
            block = fused[rows[i], cols[j]]
            want = ws[i] if i == j else ops.gaussian(seed, "p", (i, j), tuple(block.shape), 0.1)
            assert torch.equal(block, want)


@given(sources(), st.data())
def test_concat_along_widened_axis(data, draw):
    ws, _ = data
    rows = ws[0].shape[0]  # a shared leading axis
    g = torch.Generator().manual_seed(draw.draw(st.integers(0, 2**31 - 1)))
    ts = [torch.randn(rows, w.shape[1], generator=g, dtype=torch.float64) for w in ws]
    r = rule("concat", ["vocab", "hidden"])
    fused = fuse(r, ts)
    assert fused.shape == (rows, sum(t.shape[1] for t in ts)) == ops.get("concat").shape([t.shape for t in ts], r)
    for part, t in zip(torch.split(fused, [t.shape[1] for t in ts], dim=1), ts, strict=True):
        assert torch.equal(part, t)


@given(sources(), st.lists(st.floats(0.05, 1.0), min_size=4, max_size=4))
def test_output_average_gives_weighted_average_of_logits(data, raw_w):
    ws, xs = data
    vocab = 5
    heads = [torch.randn(vocab, x.shape[1], dtype=torch.float64) for x in xs]
    w = raw_w[: len(heads)]
    w = [v / sum(w) for v in w]
    fused = fuse(rule("output_average", ["vocab", "hidden"]), heads, scales=w)
    logits = torch.cat(xs, dim=1) @ fused.T
    expected = sum(wm * (x @ h.T) for wm, x, h in zip(w, xs, heads))
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-12)


@given(st.integers(1, 4), st.integers(1, 6))
def test_bias_average(n, size):
    bs = [torch.randn(size, dtype=torch.float64) for _ in range(n)]
    w = [1.0 / n] * n
    fused = fuse(rule("bias_average", ["classes"]), bs, weights=w)
    torch.testing.assert_close(fused, torch.stack(bs).mean(0).to(torch.float64))


@given(sources(same_width=True), st.integers(0, 1000), st.sampled_from([0, 1]))
def test_preserving_noise_cancels_on_equal_copies(data, seed, input_axis):
    ws, _ = data
    w = ws[0].to(torch.float32)
    n = len(ws)
    copies = [w] * n
    r = rule("block_diagonal", ["mlp", "hidden"], input_axis=input_axis)
    fused = fuse(r, copies, noise=ops.OffDiagonalNoise(seed, "p", 0.1, preserving=True))
    x = torch.randn(4, w.shape[input_axis], dtype=torch.float32)
    xs = torch.cat([x] * n, dim=1)
    if input_axis == 1:  # torch layout [out, in]: y = x W^T
        y, ref = xs @ fused.T, x @ w.T
    else:  # JAX/Conv1D layout [in, out]: y = x W
        y, ref = xs @ fused, x @ w
    torch.testing.assert_close(y, torch.cat([ref] * n, dim=1), rtol=1e-5, atol=1e-5)
    if n > 1:  # the copies' symmetry is broken: the diagonal blocks differ from the source
        r_, c = w.shape
        assert fused[r_:2 * r_, :c].abs().sum() > 0  # an off-diagonal block carries noise


@given(st.integers(0, 2**40), st.text(min_size=1, max_size=20), st.integers(0, 3), st.integers(0, 3))
def test_noise_reproducible_from_seed_and_name(seed, name, i, j):
    a = ops.gaussian(seed, name, (i, j), (3, 4), 0.5)
    b = ops.gaussian(seed, name, (i, j), (3, 4), 0.5)
    assert torch.equal(a, b)
    other = ops.gaussian(seed + 1, name, (i, j), (3, 4), 0.5)
    assert not torch.equal(a, other)
    other_block = ops.gaussian(seed, name, (i, j + 1), (3, 4), 0.5)
    assert not torch.equal(a, other_block)


def test_noise_statistics():
    n = ops.gaussian(3, "w", (0, 1), (400, 400), 0.02)
    assert abs(float(n.std()) - 0.02) < 0.001
    assert abs(float(n.mean())) < 0.001


@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4))
def test_split_fuse_concat_fuses_q_k_v_separately(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    # GPT-2 Conv1D c_attn: [d_in, 3 * d] with input axis 0; x @ W gives [q | k | v]
    ws = [torch.randn(d, 3 * d, generator=g, dtype=torch.float64) for _ in range(n)]
    xs = [torch.randn(2, d, generator=g, dtype=torch.float64) for _ in range(n)]
    fused = fuse(rule("split_fuse_concat", ["hidden", "qkv"], parts=3, input_axis=0), ws)
    y = torch.cat(xs, dim=1) @ fused
    q, k, v = torch.chunk(y, 3, dim=1)
    for part, got in enumerate((q, k, v)):
        expected = torch.cat([torch.chunk(x @ w, 3, dim=1)[part] for w, x in zip(ws, xs)], dim=1)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_split_fuse_concat_refuses_parts_that_do_not_divide():
    r = rule("split_fuse_concat", ["hidden", "qkv"], parts=3, input_axis=0)
    op = ops.get("split_fuse_concat")
    assert op.shape([(2, 6), (3, 9)], r) == (5, 15)
    with pytest.raises(ops.FusionMismatch, match=r"axis 1 \(8\) does not split into 3 equal parts") as exc:
        op.shape([(2, 6), (2, 8)], r)
    assert exc.value.source == 1


def test_passthrough_identical_refuses_differences_before_any_block():
    a = torch.ones(3)
    r = rule("passthrough_identical", ["shared"])
    op = ops.get("passthrough_identical")
    assert torch.equal(fuse(r, [a, a.clone()]), a)
    assert torch.equal(fuse(r, [a.to(torch.int64)] * 2), a.to(torch.int64))
    with pytest.raises(ops.FusionMismatch, match="source 2 differs from source 1") as exc:
        op.rows([a, a + 1], r, ops.FuseContext(dtype=a.dtype))  # on the call, not on the first block
    assert exc.value.hint


def test_fused_shape_checks_shared_axes():
    assert ops.fused_shape([(4, 3), (5, 3)], [0]) == (9, 3)
    with pytest.raises(ops.FusionMismatch, match="shared axis 1") as exc:
        ops.fused_shape([(4, 3), (5, 2)], [0])
    assert exc.value.source is None and exc.value.hint
    with pytest.raises(ops.FusionMismatch, match="shared axis 0"):
        ops.get("concat").shape([(4, 3), (5, 2)], rule("concat", ["vocab", "hidden"]))


# ---- row blocks: any size, the same values --------------------------------------------------------------


@given(st.integers(0, 3000), st.lists(st.integers(1, 300), min_size=1, max_size=30), st.sampled_from([1.0, 0.02]))
def test_noise_stream_in_pieces_equals_whole_block(numel, sizes, std):
    whole = ops.gaussian(11, "w", (0, 1), (numel,), std)
    stream = ops.GaussianStream(11, "w", (0, 1), numel, std)
    pieces, taken = [], 0
    for k in sizes * (numel // max(1, sum(sizes)) + 1):
        k = min(k, numel - taken)
        if k == 0:
            break
        pieces.append(stream.take(k).clone())
        taken += k
    if taken < numel:
        pieces.append(stream.take(numel - taken))
    assert torch.equal(torch.cat(pieces) if pieces else torch.empty(0), whole)


@st.composite
def block_problems(draw):
    """n sources of 2 or 3 axes, two of them widened, optional noise/preserving (either input axis)."""
    n = draw(st.integers(1, 3))
    nd = draw(st.integers(2, 3))
    axes = tuple(sorted(draw(st.permutations(list(range(nd))))[:2]))
    same = draw(st.booleans())
    base = [draw(dims) for _ in range(nd)]
    shapes = []
    for _ in range(n):
        s = list(base)
        if not same:
            for ax in axes:
                s[ax] = draw(dims)
        shapes.append(s)
    src_dtype = draw(float_dtypes)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    ts = [torch.randn(s, generator=g, dtype=torch.float64).to(src_dtype) for s in shapes]
    input_axis = draw(st.sampled_from(axes))
    noisy = draw(st.booleans())
    preserving = noisy and same and draw(st.booleans())
    if preserving:
        ts = [ts[0]] * n  # self-fusion
    noise = ops.OffDiagonalNoise(5, "w", 0.1, preserving=preserving) if noisy else None
    dtype = draw(st.sampled_from([src_dtype, torch.bfloat16, torch.float32, torch.float16]))
    chunk = draw(st.sampled_from([1, 7, 40, 100, 1 << 20]))
    return ts, block_rule(axes, nd, input_axis), noise, dtype, chunk


@given(block_problems(), st.sampled_from([None, 0, 64, 1 << 30]))
def test_block_diagonal_rows_equal_the_definition(problem, ahead_bytes):
    """At any row-block size; also with later block rows' noise drawn ahead on another thread
    (within a byte budget), and again with the ring's spare noise buffers."""
    ts, r, noise, dtype, chunk = problem
    want = expected_block_diagonal(ts, tuple(r.widened_axes), dtype, noise, r.input_axis)
    ring = ops.BufferRing(3, noise_ahead=ahead_bytes or 0)
    with ThreadPoolExecutor(1) as pool:
        for _ in range(2):
            got = fuse(r, ts, dtype, noise=noise, ring=ring, chunk_bytes=chunk,
                       pool=pool if ahead_bytes is not None else None)
            assert torch.equal(got, want)


@given(sources(), st.integers(0, 1), float_dtypes, st.sampled_from([None, torch.bfloat16, torch.float32]),
       st.sampled_from([1, 9, 64, 1 << 20]), st.booleans())
def test_concat_and_output_average_rows_equal_the_definition(data, axis, src_dtype, dtype, chunk, scaled):
    ws, _ = data
    g = torch.Generator().manual_seed(len(ws))
    shapes = [[w.shape[0], 3] if axis == 0 else [3, w.shape[1]] for w in ws]  # the other axis shared
    ts = [torch.randn(s, generator=g, dtype=torch.float64).to(src_dtype) for s in shapes]
    axes = ["hidden", "vocab"] if axis == 0 else ["vocab", "hidden"]
    dtype = dtype or src_dtype
    ring = ops.BufferRing(3)
    if scaled:
        scales = [1.0 / (m + 3) for m in range(len(ts))]
        got = fuse(rule("output_average", axes), ts, dtype, scales=scales, ring=ring, chunk_bytes=chunk)
        assert torch.equal(got, expected_concat(ts, axis, dtype, scales))
    else:
        got = fuse(rule("concat", axes), ts, dtype, ring=ring, chunk_bytes=chunk)
        assert torch.equal(got, expected_concat(ts, axis, dtype))


@given(st.integers(1, 3), st.integers(1, 4), st.integers(0, 1), st.booleans(), st.booleans(),
       st.sampled_from([1, 24, 1 << 20]))
def test_split_fuse_concat_rows_equal_the_definition(n, d, split_axis, two_axes, noisy, chunk):
    """Each part fused on its own (noise keyed by part), the parts side by side along the split axis."""
    g = torch.Generator().manual_seed(n * 10 + d)
    shape = [3 * d, d + 1] if split_axis == 0 else [d + 1, 3 * d]
    ws = [torch.randn(shape, generator=g, dtype=torch.float32).to(torch.bfloat16) for _ in range(n)]
    axes = ["shared", "shared"]
    axes[split_axis], axes[1 - split_axis] = "qkv", "hidden" if two_axes else "shared"
    r = rule("split_fuse_concat", axes, parts=3, input_axis=1 - split_axis if two_axes else None)
    noise = ops.OffDiagonalNoise(1, "qkv", 0.1) if noisy else None
    parts = [[torch.chunk(w, 3, dim=split_axis)[k] for w in ws] for k in range(3)]
    if two_axes:
        fused = [expected_block_diagonal(p, (0, 1), torch.bfloat16, noise, prefix=(k,)) for k, p in enumerate(parts)]
    else:
        fused = [expected_concat(p, split_axis, torch.bfloat16) for p in parts]
    got = fuse(r, ws, noise=noise, ring=ops.BufferRing(3), chunk_bytes=chunk)
    assert torch.equal(got, torch.cat(fused, dim=split_axis))


def test_zero_blocks_are_rezeroed_when_a_ring_buffer_changes_layout():
    """Ring buffers keep their zeros between tensors of one layout, and only of one layout."""
    ring = ops.BufferRing(3)
    a = [torch.ones(4, 2), torch.ones(4, 6)]
    b = [torch.full((4, 6), 2.0), torch.full((4, 2), 2.0)]  # same fused shape, diagonal elsewhere
    for ts in (a, b, a, a, b):
        got = fuse(KERNEL, ts, ring=ring, chunk_bytes=16)
        assert torch.equal(got, expected_block_diagonal(ts, (0, 1), torch.float32))


def test_rms_does_not_depend_on_thread_count_or_repeats():
    t = (torch.randn(3_000_001, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.rms([t, t])
        torch.set_num_threads(max(2, threads))
        two = ops.rms([t, t])
    finally:
        torch.set_num_threads(threads)
    assert one == two == ops.rms([t]) == ops.rms([t, t.clone(), t])
    assert abs(one - float(t.double().pow(2).mean().sqrt())) < 1e-12
