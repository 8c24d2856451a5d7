"""Property tests of the pure fusion ops: the mathematics, independent of names and formats."""

from __future__ import annotations

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
