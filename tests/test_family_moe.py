"""Mixture-of-experts families (Mixtral, Qwen3-MoE), as transformers 5 saves them (one tensor per expert).

Experts are concatenated: the fused model has every source's experts, each reading and writing only
its own source's slice; the router is block-diagonal and routes to the sum of the sources' top-k;
the experts' output kernels hold n times the source's (each of the n routes gets 1/n of the weight).
Self-fusion is exact in the stock runtime; different sources are exact with ``--norm prop`` and
``apply_grouped_norms`` (grouped norms and grouped routers), and the stock routing is a measured,
expected deviation."""

from __future__ import annotations

import functools
import json
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from deepfuse_cli import ops
from deepfuse_cli.cli import app
from deepfuse_cli.grouped_norm import apply_grouped_norms
from deepfuse_cli.grouped_router import GroupedRouter
from deepfuse_cli.rules.engine import load_preset, preset_for_config
from deepfuse_cli.rules.schema import Rule
from deepfuse_cli.verify.decompose import Layout, decompose

from .conftest import FIXTURES
from .helpers import assert_fused_function, clean_refusal, cli, load, probe, run

FAMILIES = ["mixtral", "qwen3_moe"]
runner = CliRunner()


@functools.cache
def fixture_outputs(name: str):
    return run(load(FIXTURES / "hf" / name), probe())


def outputs_of(path):
    return run(load(path), probe())


def verify_report(path, *extra) -> dict:
    return json.loads(cli("verify", path, "--json", "--probes", "2", "--seq-len", "6", *extra))


def checks_of(report: dict) -> dict[str, str]:
    return {c["name"]: c["status"] for c in report["checks"]}


def relative_error(fused: torch.Tensor, srcs, weights) -> float:
    expected = sum(w * lg for w, (lg, _) in zip(weights, srcs, strict=True))
    return float((fused - expected).abs().max() / max(float(expected.abs().max()), 1.0))


def copy_with(src, dst, config: dict | None = None, tensors=None):
    """A copy of a fixture directory, its config.json updated and its tensors edited by ``tensors(sd)``."""
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    if tensors:
        sd = load_file(dst / "model.safetensors")
        tensors(sd)
        save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("family", FAMILIES)
def test_detected_from_config_and_every_tensor_claimed_once(family, hf_fixtures):
    for side in "ab":
        config = json.loads((hf_fixtures / f"{family}-{side}" / "config.json").read_text())
        assert preset_for_config(config, "test").name == family
        assert "every tensor claimed by exactly one rule" in cli("rules", "check", family, hf_fixtures / f"{family}-{side}")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("times", [2, 3])
def test_self_fusion_is_exact_in_the_stock_runtime(family, times, hf_fixtures, tmp_path):
    out = tmp_path / "fused"
    cli("self-fuse", hf_fixtures / f"{family}-a", "--times", times, "-o", out, "-q")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_local_experts"] == 4 * times and cfg["num_experts_per_tok"] == 2 * times
    assert cfg["deepfuse_moe_experts"] == [4] * times and cfg["deepfuse_moe_top_k"] == [2] * times
    assert cfg["output_router_logits"] is False
    logits, hidden = outputs_of(out)  # no module swapped: the stock router
    assert_fused_function(logits, hidden, [fixture_outputs(f"{family}-a")] * times, [1.0 / times] * times)
    if times == 2:
        assert checks_of(verify_report(out))["function: logits vs source"] == "pass"


def test_self_fusion_without_renormalised_top_k_is_exact(hf_fixtures, tmp_path):
    """Qwen3-MoE with norm_topk_prob false: the fused softmax gives each of the K copies p / K."""
    src = copy_with(hf_fixtures / "qwen3_moe-a", tmp_path / "plain", {"norm_topk_prob": False})
    out = tmp_path / "fused"
    cli("self-fuse", src, "--times", "2", "-o", out, "-q")
    logits, hidden = outputs_of(out)
    assert_fused_function(logits, hidden, [outputs_of(src)] * 2, [0.5, 0.5])


def test_different_sources_prop_with_grouped_routers_is_exact(hf_fixtures, tmp_path):
    out = tmp_path / "fused"
    cli("fuse", hf_fixtures / "mixtral-a", hf_fixtures / "mixtral-b", "-o", out, "--norm", "prop", "-q")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["deepfuse_moe_experts"] == [4, 4] and cfg["deepfuse_norm_groups"] == [16, 16]
    model = load(out)
    assert apply_grouped_norms(model) == 5 + 2  # 2 x 2 layer norms and the final norm; a router per layer
    assert sum(isinstance(m, GroupedRouter) for m in model.modules()) == 2
    logits, hidden = run(model, probe())
    srcs = [fixture_outputs("mixtral-a"), fixture_outputs("mixtral-b")]
    assert_fused_function(logits, hidden, srcs, [0.5, 0.5])
    assert checks_of(verify_report(out))["function: logits vs weighted average of sources"] == "pass"


def test_stock_routing_of_different_sources_is_a_measured_expected_deviation(hf_fixtures, tmp_path):
    a, b = hf_fixtures / "mixtral-a", hf_fixtures / "mixtral-b"
    srcs = [fixture_outputs("mixtral-a"), fixture_outputs("mixtral-b")]
    prop = tmp_path / "prop"
    cli("fuse", a, b, "-o", prop, "--norm", "prop", "-q")
    model = load(prop)
    apply_grouped_norms(model, routers=False)  # grouped norms, the stock router: the routing alone deviates
    logits, _ = run(model, probe())
    assert relative_error(logits, srcs, [0.5, 0.5]) > 1e-3
    rule = tmp_path / "rule"
    cli("fuse", a, b, "-o", rule, "-q")
    report = verify_report(rule)
    checks = checks_of(report)
    assert checks["function: logits vs weighted average of sources"] == "expected", checks
    assert checks["function: same weights with grouped norms"] == "pass", checks
    detail = next(c["message"] for c in report["checks"] if c["status"] == "expected")
    assert "stock router" in detail
    out = cli("verify", rule, "--json", "--probes", "2", "--seq-len", "6", "--strict", expect=1)
    strict, _ = json.JSONDecoder().raw_decode(out)
    assert not strict["passed"]


def test_sources_of_different_widths_and_expert_counts(hf_fixtures, tmp_path):
    """E_1 + E_2 experts, top k_1 + k_2, hidden d_1 + d_2: exact with grouped norms and routers."""
    import transformers as tf

    torch.manual_seed(7)
    config = tf.MixtralConfig(vocab_size=64, hidden_size=24, num_attention_heads=6, num_key_value_heads=3, head_dim=4,
                              intermediate_size=24, num_hidden_layers=2, max_position_embeddings=64,
                              num_local_experts=3, num_experts_per_tok=1, rms_norm_eps=1e-6)
    wide = tf.MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in wide.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    wide.save_pretrained(tmp_path / "wide")
    out = tmp_path / "fused"
    cli("fuse", hf_fixtures / "mixtral-a", tmp_path / "wide", "-o", out, "--norm", "prop", "-q")
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["hidden_size"]) == (7, 3, 40)
    assert cfg["deepfuse_moe_experts"] == [4, 3] and cfg["deepfuse_moe_top_k"] == [2, 1]
    model = load(out)
    apply_grouped_norms(model)
    logits, hidden = run(model, probe())
    assert_fused_function(logits, hidden, [fixture_outputs("mixtral-a"), outputs_of(tmp_path / "wide")], [0.5, 0.5])


def test_qwen3_moe_different_sources_are_exact_with_grouped_norms_and_routers(hf_fixtures, tmp_path):
    """Renormalised top-k, a dense layer (mlp_only_layers), grouped routers, and the per-head q/k norms
    (one scale shared by every head in the stock module) from the per-head norm file."""
    out = tmp_path / "fused"
    cli("fuse", hf_fixtures / "qwen3_moe-a", hf_fixtures / "qwen3_moe-b", "-o", out, "--norm", "prop", "-q")
    assert (out / "deepfuse_head_norms.safetensors").exists()
    model = load(out)
    apply_grouped_norms(model)
    logits, hidden = run(model, probe())
    assert_fused_function(logits, hidden, [fixture_outputs("qwen3_moe-a"), fixture_outputs("qwen3_moe-b")], [0.5, 0.5])


def test_a_missing_expert_is_refused_naming_the_tensor(hf_fixtures, tmp_path):
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    broken = copy_with(hf_fixtures / "mixtral-b", tmp_path / "b", tensors=lambda sd: sd.pop(name))
    out = tmp_path / "fused"
    result = runner.invoke(app, ["fuse", str(hf_fixtures / "mixtral-a"), str(broken), "-o", str(out)])
    clean_refusal(result, [name, "source 2"])
    assert not out.exists()


# The module and the ops, property-tested ---------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(groups=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=3),
       renormalise=st.booleans(), seed=st.integers(0, 2**16))
def test_grouped_router_routes_each_source_as_its_own_router(groups, renormalise, seed):
    """For a block-diagonal router weight, source m's weights are its own top-k (renormalised or
    not) divided by n, at its experts' fused indices."""
    g = torch.Generator().manual_seed(seed)
    experts = [e for e, _ in groups]
    top_k = [min(k, e) for e, k in groups]
    widths = [int(torch.randint(1, 6, (), generator=g)) for _ in groups]
    gates = [torch.randn(e, d, generator=g) for e, d in zip(experts, widths, strict=True)]
    router = GroupedRouter(torch.nn.Linear(sum(widths), sum(experts), bias=False), experts, top_k, renormalise)
    with torch.no_grad():
        router.weight.copy_(torch.block_diag(*gates))
    xs = [torch.randn(5, d, generator=g) for d in widths]
    _, weights, index = router(torch.cat(xs, -1))
    assert weights.shape == index.shape == (5, sum(top_k))
    col = offset = 0
    for gate, x, e, k in zip(gates, xs, experts, top_k, strict=True):
        probs = torch.softmax(x @ gate.T, -1)
        top, idx = torch.topk(probs, k, -1)
        if renormalise:
            top = top / top.sum(-1, keepdim=True)
        torch.testing.assert_close(weights[:, col:col + k], top / len(experts))
        assert torch.equal(index[:, col:col + k], idx + offset)
        col, offset = col + k, offset + e


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 4), owner=st.integers(0, 3), rows=st.integers(1, 6), seed=st.integers(0, 2**16),
       op=st.sampled_from(["expert_in", "expert_out"]))
def test_expert_ops_place_one_source_in_its_slice_and_agree_with_verify(n, owner, rows, seed, op):
    owner %= n
    g = torch.Generator().manual_seed(seed)
    widths = [int(torch.randint(1, 6, (), generator=g)) for _ in range(n)]
    axes = ["expert_mlp", "hidden"] if op == "expert_in" else ["hidden", "expert_mlp"]
    axis = axes.index("hidden")
    rule = Rule(pattern="w", op=op, axes=axes)

    def shaped(d):
        return (rows, d) if axis == 1 else (d, rows)

    tensors = [torch.randn(shaped(d), generator=g) if m == owner else torch.zeros(shaped(d))
               for m, d in enumerate(widths)]
    blocks = ops.get(op).rows(tensors, rule, ops.FuseContext(dtype=torch.float32))
    fused = torch.cat([b.clone() for b in blocks], dim=0)  # blocks may live in reused buffers
    scale = n if op == "expert_out" else 1
    start = sum(widths[:owner])
    assert torch.equal(fused.narrow(axis, start, widths[owner]), tensors[owner] * scale)
    assert int(fused.ne(0).sum()) == int(tensors[owner].ne(0).sum())  # zeros outside its slice
    lay = Layout(name="w", rule=rule, source_shapes=[t.shape for t in tensors], weights=[1 / n] * n)
    for block in decompose(lay):  # verify's independent statement of the same blocks
        want = sum(t.coef * tensors[t.source][t.region] for t in block.terms)
        assert torch.equal(fused[block.where], want)


def test_presets_record_their_router_and_expert_counts():
    for family, router in [("mixtral", "MixtralTopKRouter"), ("qwen3_moe", "Qwen3MoeTopKRouter")]:
        preset = load_preset(family)
        assert preset.moe is not None and preset.moe.router == router
        assert any(r.per_expert for r in preset.rules)
    assert load_preset("llama").moe is None


def test_a_config_that_miscounts_the_experts_is_refused(hf_fixtures, tmp_path):
    lying = copy_with(hf_fixtures / "mixtral-b", tmp_path / "b", {"num_local_experts": 5})
    out = tmp_path / "fused"
    result = runner.invoke(app, ["fuse", str(hf_fixtures / "mixtral-a"), str(lying), "-o", str(out)])
    clean_refusal(result, ["source 2", "4 experts", "num_local_experts = 5"])
    assert not out.exists()


def test_experts_of_another_size_are_refused(hf_fixtures, tmp_path):
    """The fused model has more experts, not wider ones: every source's experts must have one size."""
    def shrink(sd):
        for k in [k for k in sd if ".experts." in k]:
            sd[k] = (sd[k][:8] if k.endswith(("w1.weight", "w3.weight")) else sd[k][:, :8]).contiguous()
    other = copy_with(hf_fixtures / "mixtral-b", tmp_path / "b", {"intermediate_size": 8}, tensors=shrink)
    out = tmp_path / "fused"
    result = runner.invoke(app, ["fuse", str(hf_fixtures / "mixtral-a"), str(other), "-o", str(out),
                                 "--rules", "mixtral"])
    assert result.exit_code == 2 and not out.exists()
    assert "intermediate_size" in result.stderr  # the config says it first
    bare = copy_with(hf_fixtures / "mixtral-a", tmp_path / "a")
    for path in (bare, other):  # bare weights: the tensors say it
        (path / "config.json").unlink()
    result = runner.invoke(app, ["fuse", str(bare), str(other), "-o", str(out), "--rules", "mixtral"])
    clean_refusal(result, ["experts", "shape"])


# The stacked layout transformers holds in its modules (save_pretrained(save_original_format=False)) ----

@pytest.mark.parametrize("family", FAMILIES)
def test_stacked_experts_self_fusion_is_exact_and_stays_stacked(family, hf_fixtures, tmp_path):
    out = tmp_path / "fused"
    cli("self-fuse", hf_fixtures / f"{family}-a-stacked", "--times", "2", "-o", out, "-q")
    names = load_file(out / "model.safetensors")
    assert names["model.layers.0.mlp.experts.gate_up_proj"].shape[0] == 8
    assert names["model.layers.0.mlp.experts.down_proj"].shape[:2] == (8, 32)
    logits, hidden = outputs_of(out)
    assert_fused_function(logits, hidden, [fixture_outputs(f"{family}-a")] * 2, [0.5, 0.5])


def test_stacked_experts_different_sources_are_exact_with_grouped_routers(hf_fixtures, tmp_path):
    out = tmp_path / "fused"
    cli("fuse", hf_fixtures / "mixtral-a-stacked", hf_fixtures / "mixtral-b-stacked", "-o", out, "--norm", "prop", "-q")
    model = load(out)
    apply_grouped_norms(model)
    logits, hidden = run(model, probe())
    assert_fused_function(logits, hidden, [fixture_outputs("mixtral-a"), fixture_outputs("mixtral-b")], [0.5, 0.5])


def test_preserving_noise_keeps_self_fusion_exact_in_the_stacked_experts(hf_fixtures, tmp_path):
    """Noise in the router and in the stacked experts' off-diagonal blocks, compensated on the
    diagonal (along the experts axis for the output kernels): the function is unchanged."""
    out = tmp_path / "fused"
    cli("self-fuse", hf_fixtures / "mixtral-a-stacked", "--times", "2", "--noise-scale", "0.05",
        "--noise-mode", "preserving", "-o", out, "-q")
    down = load_file(out / "model.safetensors")["model.layers.0.mlp.experts.down_proj"]
    assert float(down[:4, 16:].abs().max()) > 0  # off-diagonal noise is there
    logits, hidden = outputs_of(out)
    assert_fused_function(logits, hidden, [fixture_outputs("mixtral-a")] * 2, [0.5, 0.5])
    assert checks_of(verify_report(out))["function: logits vs source"] == "pass"


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_stacked_output_kernels_are_n_times_the_block_diagonal_and_agree_with_verify(n, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(int(torch.randint(1, 4, (), generator=g)), int(torch.randint(1, 5, (), generator=g)), 3)
              for _ in range(n)]
    tensors = [torch.randn(s, generator=g) for s in shapes]
    rule = Rule(pattern="w", op="expert_stack_out", axes=["experts", "hidden", "expert_mlp"], input_axis=0)
    blocks = ops.get("expert_stack_out").rows(tensors, rule, ops.FuseContext(dtype=torch.float32))
    fused = torch.cat([b.clone() for b in blocks], dim=0)
    e0 = d0 = 0
    for t in tensors:
        e, d, _ = t.shape
        assert torch.equal(fused[e0:e0 + e, d0:d0 + d], t * n)
        e0, d0 = e0 + e, d0 + d
    assert int(fused.ne(0).sum()) == sum(int(t.ne(0).sum()) for t in tensors)
    lay = Layout(name="w", rule=rule, source_shapes=[t.shape for t in tensors], weights=[1 / n] * n)
    for block in decompose(lay):
        want = sum((t.coef * tensors[t.source][t.region] for t in block.terms), torch.zeros(block.shape))
        assert torch.equal(fused[block.where], want)
