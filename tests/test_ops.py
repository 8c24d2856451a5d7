"""Property tests of the pure fusion ops: the mathematics, independent of names and formats."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepfuse_cli import ops

settings.register_profile("deepfuse", deadline=None, max_examples=60)
settings.load_profile("deepfuse")

dims = st.integers(min_value=1, max_value=6)


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


@given(sources())
def test_block_diagonal_computes_each_source_on_its_slice(data):
    ws, xs = data
    fused = ops.block_diagonal(ws, (0, 1))
    y = torch.cat(xs, dim=1) @ fused.T
    expected = torch.cat([x @ w.T for w, x in zip(ws, xs)], dim=1)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)


@given(sources())
def test_block_diagonal_off_diagonal_is_zero_and_diagonal_is_source(data):
    ws, _ = data
    fused = ops.block_diagonal(ws, (0, 1))
    r = c = 0
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


@given(sources(n_min=1, n_max=1))
def test_n_equals_one_is_identity(data):
    ws, _ = data
    w = ws[0]
    assert torch.equal(ops.block_diagonal([w], (0, 1)), w)
    assert torch.equal(ops.concat([w], 1), w)
    assert torch.equal(ops.output_average([w], 1, [1.0]), w)
    assert torch.equal(ops.bias_average([w], [1.0]), w)


@given(sources(), st.data())
def test_concat_along_widened_axis(data, draw):
    ws, _ = data
    # a shared leading axis: make every source share axis 0
    rows = ws[0].shape[0]
    ts = [torch.randn(rows, w.shape[1], dtype=torch.float64) for w in ws]
    fused = ops.concat(ts, 1)
    assert torch.equal(torch.split(fused, [t.shape[1] for t in ts], dim=1)[0], ts[0])
    assert fused.shape == (rows, sum(t.shape[1] for t in ts))


@given(sources(), st.lists(st.floats(0.05, 1.0), min_size=4, max_size=4))
def test_output_average_gives_weighted_average_of_logits(data, raw_w):
    ws, xs = data
    vocab = 5
    heads = [torch.randn(vocab, x.shape[1], dtype=torch.float64) for x in xs]
    w = raw_w[: len(heads)]
    w = [v / sum(w) for v in w]
    fused = ops.output_average(heads, 1, w)
    logits = torch.cat(xs, dim=1) @ fused.T
    expected = sum(wm * (x @ h.T) for wm, x, h in zip(w, xs, heads))
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-12)


@given(st.integers(1, 4), st.integers(1, 6))
def test_bias_average(n, size):
    bs = [torch.randn(size, dtype=torch.float64) for _ in range(n)]
    w = [1.0 / n] * n
    torch.testing.assert_close(ops.bias_average(bs, w), torch.stack(bs).mean(0).to(torch.float64))


@given(sources(same_width=True), st.integers(0, 1000), st.sampled_from([0, 1]))
def test_preserving_noise_cancels_on_equal_copies(data, seed, input_axis):
    ws, _ = data
    w = ws[0].to(torch.float32)
    n = len(ws)
    copies = [w] * n

    def offdiag(i, j, shape):
        return ops.gaussian(seed, "p", (i, j), shape, 0.1)

    fused = ops.block_diagonal(copies, (0, 1), offdiag=offdiag, preserving_input_axis=input_axis)
    x = torch.randn(4, w.shape[input_axis], dtype=torch.float32)
    xs = torch.cat([x] * n, dim=1)
    if input_axis == 1:  # torch layout [out, in]: y = x W^T
        y, ref = xs @ fused.T, x @ w.T
    else:  # JAX/Conv1D layout [in, out]: y = x W
        y, ref = xs @ fused, x @ w
    torch.testing.assert_close(y, torch.cat([ref] * n, dim=1), rtol=1e-5, atol=1e-5)
    if n > 1:  # the copies' symmetry is broken: the diagonal blocks differ from the source
        r = w.shape[0]
        c = w.shape[1]
        assert fused[r:2 * r, :c].abs().sum() > 0  # an off-diagonal block carries noise


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
    fused = ops.split_fuse_concat(ws, 1, 3, lambda parts, k: ops.block_diagonal(parts, (0, 1)))
    y = torch.cat(xs, dim=1) @ fused
    q, k, v = torch.chunk(y, 3, dim=1)
    for part, got in enumerate((q, k, v)):
        expected = torch.cat([torch.chunk(x @ w, 3, dim=1)[part] for w, x in zip(ws, xs)], dim=1)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_passthrough_identical_refuses_differences():
    a = torch.ones(3)
    assert torch.equal(ops.passthrough_identical([a, a.clone()]), a)
    try:
        ops.passthrough_identical([a, a + 1])
    except ops.FusionMismatch as exc:
        assert "source 2" in str(exc)
    else:
        raise AssertionError("expected FusionMismatch")


def test_fused_shape_checks_shared_axes():
    assert ops.fused_shape([(4, 3), (5, 3)], [0]) == (9, 3)
    try:
        ops.fused_shape([(4, 3), (5, 2)], [0])
    except ops.FusionMismatch as exc:
        assert "shared axis 1" in str(exc)
    else:
        raise AssertionError("expected FusionMismatch")


# Streaming (row-block) versions of the ops: bit-for-bit the materialising ops.

float_dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64])


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
    """n sources of 2 or 3 axes, two of them widened (in either order), optional noise/preserving."""
    n = draw(st.integers(1, 3))
    nd = draw(st.integers(2, 3))
    axes = tuple(draw(st.permutations(list(range(nd))))[:2])
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
    noisy = draw(st.booleans())
    preserving = draw(st.sampled_from([None, axes[0], axes[1]])) if (noisy and same) else None
    if preserving is not None:
        ts = [ts[0]] * n  # self-fusion
    dtype = draw(st.sampled_from([None, torch.bfloat16, torch.float32, torch.float16]))
    chunk = draw(st.sampled_from([1, 7, 40, 100, 1 << 20]))
    return ts, axes, noisy, preserving, dtype, chunk


def _drain(blocks, keep: int = 2) -> Tensor:
    """Concatenate row blocks, holding the last ``keep`` of them as a writer may (ring reuse)."""
    out, held = [], []
    for b in blocks:
        held.append(b)
        if len(held) > keep:
            out.append(held.pop(0).clone())
    out.extend(h.clone() for h in held)
    return torch.cat(out, 0)


Tensor = torch.Tensor


@given(block_problems(), st.sampled_from([None, 0, 64, 1 << 30]))
def test_block_diagonal_rows_equal_block_diagonal(problem, ahead_bytes):
    """Also with later block rows' noise drawn ahead on another thread (within a byte budget)."""
    ts, axes, noisy, preserving, dtype, chunk = problem
    offdiag = (lambda i, j, shape: ops.gaussian(5, "w", (i, j), shape, 0.1)) if noisy else None
    noise = (lambda i, j, numel: ops.GaussianStream(5, "w", (i, j), numel, 0.1)) if noisy else None
    whole = ops.block_diagonal(ts, axes, offdiag=offdiag, preserving_input_axis=preserving, dtype=dtype)
    ring = ops.BufferRing(3)
    saved = ops.NOISE_AHEAD_BYTES
    with ThreadPoolExecutor(1) as pool:
        try:
            ops.NOISE_AHEAD_BYTES = ahead_bytes or 0
            for _ in range(2):  # the second time with the ring's spare noise buffers
                rows = ops.block_diagonal_rows(ts, axes, noise=noise, preserving_input_axis=preserving, dtype=dtype,
                                               ring=ring, chunk_bytes=chunk, pool=pool if ahead_bytes is not None else None)
                assert torch.equal(_drain(rows), whole)
        finally:
            ops.NOISE_AHEAD_BYTES = saved


@given(sources(), st.integers(0, 1), float_dtypes, st.sampled_from([None, torch.bfloat16, torch.float32]),
       st.sampled_from([1, 9, 64, 1 << 20]), st.booleans())
def test_concat_and_output_average_rows_equal_whole(data, axis, src_dtype, dtype, chunk, scaled):
    ws, _ = data
    g = torch.Generator().manual_seed(len(ws))
    shapes = [[w.shape[0], 3] if axis == 0 else [3, w.shape[1]] for w in ws]  # the other axis shared
    ts = [torch.randn(s, generator=g, dtype=torch.float64).to(src_dtype) for s in shapes]
    ring = ops.BufferRing(3)
    if scaled:
        weights = [1.0 / (m + 3) for m in range(len(ts))]
        whole = ops.output_average(ts, axis, weights, dtype=dtype)
        rows = ops.output_average_rows(ts, axis, weights, dtype=dtype, ring=ring, chunk_bytes=chunk)
    else:
        whole = ops.concat(ts, axis, dtype=dtype)
        rows = ops.concat_rows(ts, axis, dtype=dtype, ring=ring, chunk_bytes=chunk)
    assert torch.equal(_drain(rows), whole)


@given(st.integers(1, 3), st.integers(1, 4), st.integers(0, 1), st.booleans(), st.sampled_from([1, 24, 1 << 20]))
def test_split_fuse_concat_rows_equal_whole(n, d, split_axis, noisy, chunk):
    g = torch.Generator().manual_seed(n * 10 + d)
    shape = [3 * d, d + 1] if split_axis == 0 else [d + 1, 3 * d]
    ws = [torch.randn(shape, generator=g, dtype=torch.float32).to(torch.bfloat16) for _ in range(n)]

    def inner(parts, k):
        off = (lambda i, j, s: ops.gaussian(1, "qkv", (k, i, j), s, 0.1)) if noisy else None
        return ops.block_diagonal(parts, (0, 1), offdiag=off)

    def inner_rows(parts, k, ring):
        noise = (lambda i, j, numel: ops.GaussianStream(1, "qkv", (k, i, j), numel, 0.1)) if noisy else None
        return ops.block_diagonal_rows(parts, (0, 1), noise=noise, ring=ring, chunk_bytes=chunk)

    whole = ops.split_fuse_concat(ws, split_axis, 3, inner)
    rows = ops.split_fuse_concat_rows(ws, split_axis, 3, inner_rows, torch.bfloat16, ring=ops.BufferRing(3))
    assert torch.equal(_drain(rows), whole)


def test_zero_blocks_are_rezeroed_when_a_ring_buffer_changes_layout():
    """Ring buffers keep their zeros between tensors of one layout, and only of one layout."""
    ring = ops.BufferRing(3)
    a = [torch.ones(4, 2), torch.ones(4, 6)]
    b = [torch.full((4, 6), 2.0), torch.full((4, 2), 2.0)]  # same fused shape, diagonal elsewhere
    for ts in (a, b, a, a, b):
        assert torch.equal(_drain(ops.block_diagonal_rows(ts, (0, 1), ring=ring, chunk_bytes=16)),
                           ops.block_diagonal(ts, (0, 1)))


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
