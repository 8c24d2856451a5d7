"""T5X -> transformers mapping checked against an independent T5X forward pass (``tests/t5x_reference.py``).

The other T5X tests prove the name table self-consistent (round trips, fused vs source inside transformers); here
the logits of transformers' ``T5ForConditionalGeneration`` loaded from ``convert --to safetensors`` are compared with
the logits T5X's T5 example network computes from the original T5X parameter tree, and the fusion property is
checked on T5X fused checkpoints without going through transformers at all.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from .conftest import FIXTURES
from .helpers import cli, load, probe, run
from .t5x_reference import (
    Reference,
    gelu,
    load_params,
    logits,
    relative_position_bucket,
)

LEGACY_A = FIXTURES / "t5x" / "legacy-a"  # T5 1.1: gated-gelu, logits_dense
LEGACY_B = FIXTURES / "t5x" / "legacy-b"
TIED = FIXTURES / "orbax" / "std-tied"  # T5 1.0 style: relu, logits via the embedding / sqrt(emb)
WIDTH = 16  # emb_dim of the fixtures
TOL = 1e-4  # max abs logit error relative to the logit scale, fp32


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(np.asarray(got) - np.asarray(want)).max()) / max(float(np.abs(want).max()), 1.0)


def tokens(inputs: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    return inputs["input_ids"].numpy(), inputs["decoder_input_ids"].numpy()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    out = {}
    for src in (LEGACY_A, TIED):
        path = tmp_path_factory.mktemp("hf") / src.name
        cli("convert", src, "--to", "safetensors", "-o", path, "-q")
        out[src.name] = path
    return out


# short probe: exact-distance buckets only; long: log-spaced buckets and distances beyond max_distance=128
PROBES = {"short": {"seq": 7}, "long": {"seq": 150, "seed": 1}}


@pytest.mark.parametrize("probe_kind", sorted(PROBES))
@pytest.mark.parametrize("src", [LEGACY_A, TIED], ids=["legacy-a-gated", "std-tied-relu"])
def test_transformers_logits_match_t5x_reference(src, probe_kind, hf_dirs):
    inputs = probe(**PROBES[probe_kind])
    hf_logits, _ = run(load(hf_dirs[src.name]), inputs)
    ref = logits(load_params(src), *tokens(inputs))
    assert hf_logits.shape == ref.shape
    err = rel_error(hf_logits.numpy(), ref)
    assert err <= TOL, f"{src.name}: transformers vs T5X reference, max abs logit error {err:.3g} x scale"


def test_encoder_padding_masked_like_t5x(hf_dirs):
    """T5X masks encoder token id 0 (pairwise); transformers with attention_mask = ids > 0 gives the same logits."""
    inputs = probe(seq=12, seed=2)
    inputs["input_ids"][0, 8:] = 0
    inputs["input_ids"][1, 5:] = 0
    model = load(hf_dirs[LEGACY_A.name])
    with torch.no_grad():
        hf_logits = model(input_ids=inputs["input_ids"], attention_mask=(inputs["input_ids"] > 0).long(),
                          decoder_input_ids=inputs["decoder_input_ids"]).logits
    ref = logits(load_params(LEGACY_A), *tokens(inputs))
    assert rel_error(hf_logits.numpy(), ref) <= TOL
    # the mask matters: the same positions as real tokens (id 1, not masked) change the logits
    padded_as_tokens = inputs["input_ids"].numpy().copy()
    padded_as_tokens[padded_as_tokens == 0] = 1
    assert rel_error(logits(load_params(LEGACY_A), padded_as_tokens, tokens(inputs)[1]), ref) > TOL


def test_relative_position_buckets():
    """T5X's bucketing (32 buckets, max distance 128) at hand-checked distances and against transformers'."""
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-300, 301)  # memory - query
    bi = relative_position_bucket(rel, bidirectional=True)
    causal = relative_position_bucket(rel, bidirectional=False)
    at = dict(zip(rel.tolist(), zip(bi.tolist(), causal.tolist())))
    assert at[0] == (0, 0)
    assert at[-1] == (1, 1) and at[-7] == (7, 7) and at[-15] == (9, 15)  # past keys: exact up to 8 / 16
    assert at[1] == (17, 0) and at[7] == (23, 0)  # future keys: own half bidirectionally, bucket 0 causally
    # log-spaced beyond; 16, 32, 64 sit exactly on bidirectional bucket boundaries
    assert at[-8] == (8, 8) and at[-16] == (10, 16) and at[-32] == (12, 21) and at[-64] == (14, 26)
    assert at[-127] == (15, 31) and at[-300] == (15, 31)
    assert at[300] == (31, 0)
    for bidirectional, ours in ((True, bi), (False, causal)):
        theirs = T5Attention._relative_position_bucket(torch.from_numpy(rel), bidirectional=bidirectional,
                                                       num_buckets=32, max_distance=128).numpy()
        np.testing.assert_array_equal(ours, theirs)


def test_gelu_is_flax_default():
    """T5 1.1's ``mlp_activations = ('gelu', 'linear')`` resolves to flax's ``nn.gelu``: the tanh approximation."""
    import flax.linen as nn  # test extra
    x = np.linspace(-6, 6, 241, dtype=np.float32)
    np.testing.assert_allclose(gelu(x), np.asarray(nn.gelu(x)), rtol=0, atol=1e-6)


def test_self_fused_t5x_computes_the_source_function(tmp_path):
    """Reference on the T5X fused checkpoint itself: same logits, residual stream = [source, source]."""
    out = tmp_path / "self"
    cli("self-fuse", LEGACY_A, "--times", 2, "-o", out, "-q")
    src, fused = load_params(LEGACY_A), load_params(out)
    assert fused["target/encoder/relpos_bias/rel_embedding"].shape[0] == 2 * src[
        "target/encoder/relpos_bias/rel_embedding"].shape[0]
    inputs = tokens(probe(seq=40, seed=3))
    want, want_hidden = Reference(src)(*inputs)
    got, got_hidden = Reference(fused)(*inputs)
    assert rel_error(got, want) <= 1e-5
    for g, w in zip(got_hidden, want_hidden, strict=True):
        assert rel_error(g, np.concatenate([w, w], axis=-1)) <= 1e-5


def test_prop_fused_t5x_averages_the_sources_with_grouped_norms(tmp_path):
    out = tmp_path / "prop"
    cli("fuse", LEGACY_A, LEGACY_B, "--norm", "prop", "-o", out, "-q")
    inputs = tokens(probe(seq=40, seed=4))
    a, a_hidden = Reference(load_params(LEGACY_A))(*inputs)
    b, b_hidden = Reference(load_params(LEGACY_B))(*inputs)
    fused = load_params(out)
    got, got_hidden = Reference(fused, groups=[WIDTH, WIDTH])(*inputs)
    assert rel_error(got, (a + b) / 2) <= 1e-5
    for g, ha, hb in zip(got_hidden, a_hidden, b_hidden, strict=True):
        assert rel_error(g, np.concatenate([ha, hb], axis=-1)) <= 1e-5
    # the grouped norm is what makes it exact: one norm over the whole width does not give the average
    assert rel_error(logits(fused, *inputs), (a + b) / 2) > 1e-3
