"""T5X and Orbax end to end: fuse, convert and verify real fixtures written by the upstream formats.

The function is checked in transformers' T5 after `convert --to safetensors` (the same name table the
tool ships); Orbax outputs are also restored by orbax-checkpoint itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deepfuse_cli.grouped_norm import apply_grouped_norms
from deepfuse_cli.sources import open_source

from .conftest import FIXTURES
from .helpers import assert_fused_function, cli, digest_tree, load, probe, run

sys.path.insert(0, str(FIXTURES))
import t5x_trees  # noqa: E402

LEGACY_A = FIXTURES / "t5x" / "legacy-a"
LEGACY_B = FIXTURES / "t5x" / "legacy-b"
ORBAX_A = FIXTURES / "orbax" / "std-a"
ORBAX_B = FIXTURES / "orbax" / "std-b"
MGR_A = FIXTURES / "orbax" / "mgr-a"
TIED = FIXTURES / "orbax" / "std-tied"


def as_hf(path: Path, tmp: Path, *extra: str) -> Path:
    out = tmp / f"hf-{path.name}-{len(list(tmp.iterdir()))}"
    cli("convert", path, "--to", "safetensors", "-o", out, "-q", *extra)
    return out


def outputs_of(path: Path, tmp: Path, groups=None):
    model = load(as_hf(path, tmp) if not (path / "config.json").is_file() else path)
    if groups:
        apply_grouped_norms(model, groups)
    return run(model, probe())


def test_reader_infers_t5_dimensions():
    ck = open_source(LEGACY_A)
    assert ck.format == "t5x"
    d = t5x_trees.DIMS
    assert ck.config == {"model_type": "t5x", "vocab_size": d["vocab"], "d_model": d["emb"], "num_heads": d["heads"],
                         "head_dim": d["head_dim"], "mlp_dim": d["mlp"], "num_encoder_layers": d["layers"],
                         "num_decoder_layers": d["layers"], "num_buckets": d["buckets"], "gated": True,
                         "logits_via_embedding": False}


def test_rules_cover_t5x_tree_one_to_one():
    out = cli("rules", "check", "t5x", LEGACY_A, "--json")
    report = json.loads(out[out.index("{"):])
    assert report["unmatched"] == [] and report["ambiguous"] == {} and report["unused"] == []


@pytest.mark.parametrize("src", [LEGACY_A, ORBAX_A], ids=["legacy", "orbax"])
def test_self_fusion_keeps_format_and_is_exact(src, tmp_path):
    out = tmp_path / "fused"
    cli("self-fuse", src, "--times", 2, "-o", out, "-q")
    fused = open_source(out)
    source = open_source(src)
    assert fused.format == source.format
    assert fused.config["d_model"] == 2 * source.config["d_model"]
    assert fused.config["num_heads"] == 2 * source.config["num_heads"]
    assert fused.config["head_dim"] == source.config["head_dim"]
    gin = (out / "fused.gin").read_text()
    assert f"network.T5Config.emb_dim = {2 * source.config['d_model']}" in gin
    assert f"network.T5Config.head_dim = {source.config['head_dim']}" in gin
    # block-diagonal kernel, concatenated scale
    q = fused.tensors["target/encoder/layers_0/attention/query/kernel"].load()
    w = source.tensors["target/encoder/layers_0/attention/query/kernel"].load()
    d, hd = w.shape
    assert torch.equal(q[:d, :hd], w) and torch.equal(q[d:, hd:], w)
    assert not q[:d, hd:].any() and not q[d:, :hd].any()
    # the function: fused logits == source logits, hidden states concatenated (in transformers' T5)
    src_out = outputs_of(src, tmp_path)
    logits, hidden = outputs_of(out, tmp_path)
    assert_fused_function(logits, hidden, [src_out, src_out], [0.5, 0.5])
    assert "PASS" in cli("verify", out)


def test_fusion_prop_is_exact_average_and_rule_is_reported(tmp_path):
    prop, rule = tmp_path / "prop", tmp_path / "rule"
    cli("fuse", LEGACY_A, LEGACY_B, "--norm", "prop", "-o", prop, "-q")
    a, b = outputs_of(LEGACY_A, tmp_path), outputs_of(LEGACY_B, tmp_path)
    d = t5x_trees.DIMS["emb"]
    logits, hidden = outputs_of(prop, tmp_path, groups=[d, d])
    assert_fused_function(logits, hidden, [a, b], [0.5, 0.5])
    assert "PASS" in cli("verify", prop)
    cli("fuse", LEGACY_A, LEGACY_B, "-o", rule, "-q")
    report = tmp_path / "r.json"
    cli("verify", rule, "--report", report)
    checks = {c["name"]: c["status"] for c in json.loads(report.read_text())["checks"]}
    assert "expected" in checks.values() and "fail" not in checks.values()


def test_mixed_legacy_and_orbax_sources_fuse(tmp_path):
    out = tmp_path / "fused"
    cli("fuse", ORBAX_A, LEGACY_B, "--norm", "prop", "-o", out, "-q")
    assert open_source(out).format == "orbax"
    assert "PASS" in cli("verify", out)


def test_convert_to_safetensors_loads_in_transformers(tmp_path):
    hf = as_hf(LEGACY_A, tmp_path)
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["model_type"] == "t5" and cfg["d_model"] == t5x_trees.DIMS["emb"]
    load(hf)  # no missing / unexpected / mismatched keys
    # the same values, transposed where the layouts differ
    from safetensors import safe_open

    src = open_source(LEGACY_A)
    with safe_open(str(hf / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("encoder.block.1.layer.1.DenseReluDense.wi_1.weight"),
                           src.tensors["target/encoder/layers_1/mlp/wi_1/kernel"].load().t())
        assert torch.equal(f.get_tensor("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
                           src.tensors["target/decoder/relpos_bias/rel_embedding"].load().t())
    assert "PASS" in cli("verify", hf)


def test_fuse_to_safetensors_and_back_to_t5x(tmp_path):
    hf = tmp_path / "hf"
    cli("self-fuse", LEGACY_A, "--times", 2, "--to", "safetensors", "-o", hf, "-q")
    src_out = outputs_of(LEGACY_A, tmp_path)
    logits, hidden = run(load(hf), probe())
    assert_fused_function(logits, hidden, [src_out, src_out], [0.5, 0.5])
    back = tmp_path / "t5x"
    cli("convert", hf, "--to", "t5x", "-o", back, "-q")
    ck = open_source(back)
    assert ck.format == "t5x"
    fused_t5x = tmp_path / "fused-t5x"
    cli("self-fuse", LEGACY_A, "--times", 2, "-o", fused_t5x, "-q")
    direct = open_source(fused_t5x)
    assert sorted(ck.tensors) == sorted(direct.tensors)
    for name, ref in direct.tensors.items():
        assert torch.equal(ck.tensors[name].load(), ref.load()), name


def test_hf_t5_fused_to_t5x_and_orbax(tmp_path):
    a, b = as_hf(LEGACY_A, tmp_path), as_hf(LEGACY_B, tmp_path)
    for fmt in ("t5x", "orbax"):
        out = tmp_path / fmt
        cli("fuse", a, b, "--norm", "prop", "--to", fmt, "-o", out, "-q")
        assert open_source(out).format == fmt
        assert "PASS" in cli("verify", out)


def test_hf_t5_with_other_relative_attention_refused_for_t5x(hf_fixtures, tmp_path):
    """T5X's T5 network fixes 32 buckets / max distance 128; the HF fixtures use 8 / 16."""
    out = cli("convert", hf_fixtures / "t5v11-a", "--to", "t5x", "-o", tmp_path / "x", expect=2)
    assert "max distance 16" in out and "Traceback" not in out
    assert not (tmp_path / "x").exists()


def test_tied_t5x_sources_are_untied_exactly(tmp_path):
    """T5 1.0-style (relu, logits via the embedding / sqrt(d)): the fused model gets its own logits_dense."""
    ck = open_source(TIED)
    assert ck.config["logits_via_embedding"] and not ck.config["gated"]
    assert "target/decoder/logits_dense/kernel" not in ck.tensors
    hf = as_hf(TIED, tmp_path)
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["feed_forward_proj"] == "relu" and cfg["scale_decoder_outputs"] is True
    out = tmp_path / "fused"
    cli("self-fuse", TIED, "--times", 2, "-o", out, "-q")
    fused = open_source(out)
    assert "target/decoder/logits_dense/kernel" in fused.tensors
    assert "logits_via_embedding = False" in (out / "fused.gin").read_text()
    # block of the tied source = embedding^T / sqrt(d) / 2
    emb = ck.tensors["target/token_embedder/embedding"].load()
    d = emb.shape[1]
    block = fused.tensors["target/decoder/logits_dense/kernel"].load()[:d]
    torch.testing.assert_close(block, emb.t() * d ** -0.5 / 2, rtol=0, atol=1e-7)
    src_out = run(load(hf), probe())
    logits, hidden = outputs_of(out, tmp_path)
    assert_fused_function(logits, hidden, [src_out, src_out], [0.5, 0.5])
    assert "PASS" in cli("verify", out)


def test_gated_and_ungated_sources_refused(tmp_path):
    out = cli("fuse", TIED, ORBAX_B, "--norm", "prop", "-o", tmp_path / "x", "--dry-run", expect=2)
    assert "gated" in out


def test_optimizer_state_dropped_by_default_and_step_kept(tmp_path):
    out = tmp_path / "fused"
    cli("self-fuse", LEGACY_A, "--times", 2, "-o", out, "-q")
    ck = open_source(out)
    assert ck.metadata["step"] == 1000
    assert not ck.metadata.get("optimizer_state")
    gin = (out / "fused.gin").read_text()
    assert "assignment_map = ((r'state/param_states.*', None),)" in gin
    manifest = json.loads((out / "deepfuse.json").read_text())
    assert manifest["optimizer_state"] == "drop" and manifest["output_format"] == "t5x"


def test_step_selection_and_manifest_step(tmp_path):
    out = tmp_path / "fused"
    cli("self-fuse", MGR_A, "--step", 500, "--times", 2, "-o", out, "-q")
    assert open_source(out).metadata["step"] == 500
    assert json.loads((out / "deepfuse.json").read_text())["sources"][0]["step"] == 500
    assert "PASS" in cli("verify", out)


def test_orbax_output_restores_with_orbax(tmp_path):
    import orbax.checkpoint as ocp  # test extra: proves the output restores upstream
    out = tmp_path / "fused"
    cli("fuse", ORBAX_A, ORBAX_B, "--norm", "prop", "-o", out, "-q")
    restored = ocp.StandardCheckpointer().restore(out.resolve())
    q = np.asarray(restored["target"]["decoder"]["layers_1"]["mlp"]["wo"]["kernel"])
    a = t5x_trees.t5_params(0)["decoder"]["layers_1"]["mlp"]["wo"]["kernel"]
    b = t5x_trees.t5_params(1)["decoder"]["layers_1"]["mlp"]["wo"]["kernel"]
    expected = np.zeros((a.shape[0] + b.shape[0], a.shape[1] + b.shape[1]), np.float32)
    expected[: a.shape[0], : a.shape[1]] = a
    expected[a.shape[0]:, a.shape[1]:] = b
    np.testing.assert_array_equal(q, expected)


def test_reproducible_bytes(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for out in (one, two):
        cli("self-fuse", LEGACY_A, "--times", 2, "--noise-scale", "0.01", "-o", out, "-q")
    a, b = digest_tree(one), digest_tree(two)
    a.pop("deepfuse.json"), b.pop("deepfuse.json")  # records the output's own digests only
    assert a == b


def test_inputs_never_modified(tmp_path):
    before = {p: digest_tree(p) for p in (LEGACY_A, ORBAX_A)}
    cli("fuse", LEGACY_A, ORBAX_A, "-o", tmp_path / "out", "-q")
    assert before == {p: digest_tree(p) for p in (LEGACY_A, ORBAX_A)}


def test_optimizer_state_fused_with_lemma1_scaling(tmp_path):
    """Self-fusion x2: second moments scaled by w^2 (1 for the output projection), placed by the parameter's
    rule, re-factored for the fused shape exactly as T5X's Adafactor defines its row/column statistics."""
    out = tmp_path / "fused"
    cli("self-fuse", LEGACY_A, "--times", 2, "--optimizer-state", "fuse", "-o", out, "-q")
    ck = open_source(out)
    assert ck.metadata["step"] == 1000
    state = {k: v.load().numpy() for k, v in ck.metadata["optimizer_state"].items()}
    src = t5x_trees.train_state(0)["state"]["param_states"]
    w2 = 0.25

    # factored kernel [16, 16] -> [32, 32]: d1 = 0 (rows), d0 = 1 (cols)
    s = src["encoder"]["layers_0"]["attention"]["query"]["kernel"]
    vhat = np.outer(s["v_row"], s["v_col"]) / s["v_row"].mean()
    full = np.zeros((32, 32))
    full[:16, :16] = full[16:, 16:] = vhat * w2
    base = "state/param_states/encoder/layers_0/attention/query/kernel/"
    np.testing.assert_allclose(state[base + "v_row"], full.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(state[base + "v_col"], full.mean(axis=0), rtol=1e-6)
    assert state[base + "v"].shape == (1,) and not state[base + "v"].any()

    # unfactored relpos [4, 32] -> [8, 32]: concatenated along heads, scaled by w^2
    s = src["encoder"]["relpos_bias"]["rel_embedding"]
    np.testing.assert_allclose(state["state/param_states/encoder/relpos_bias/rel_embedding/v"],
                               np.concatenate([s["v"] * w2, s["v"] * w2]), rtol=1e-6)

    # output projection [16, 64] -> [32, 64]: gradient unscaled; d1 = 0, d0 = 1
    s = src["decoder"]["logits_dense"]["kernel"]
    vhat = np.outer(s["v_row"], s["v_col"]) / s["v_row"].mean()
    full = np.concatenate([vhat, vhat])
    base = "state/param_states/decoder/logits_dense/kernel/"
    np.testing.assert_allclose(state[base + "v_row"], full.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(state[base + "v_col"], full.mean(axis=0), rtol=1e-6)
    gin = (out / "fused.gin").read_text()
    assert "assignment_map" not in gin
    assert "PASS" in cli("verify", out)
