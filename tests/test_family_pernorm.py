"""Grouped norms for per-head and kv-width norms, and the families that need them (issue 12).

* Qwen3's and Gemma 3's q_norm/k_norm (one [head_dim] scale for every head): the fused tensor is the sources'
  weighted average (source 1 bit for bit when they agree), each head's own scale is written to the
  per-head norm file, and grouped norms read it back: different sources exact with --norm prop.
* OLMo 2 under grouped-query attention: q_norm spans heads * head_dim, k_norm kv_heads * head_dim;
  each role's groups are recorded in config.json and grouped norms pick them by the rule of the norm.
* OLMo (1): LayerNorms without parameters, grouped by width; clip_qkv.
* Llama 3 rope scaling (rope_parameters as transformers 5 saves it).
* mT5: T5 v1.1-shaped; the t5 family lists model_type 'mt5'. UMT5: its own
  preset (a relative attention bias in every self-attention layer).
"""

from __future__ import annotations

import functools
import json
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from deepfuse_cli import ops
from deepfuse_cli.cli import app
from deepfuse_cli.grouped_norm import (HEAD_NORMS_FILE, ROLE_GROUPS_KEY, GroupedHeadNorm, apply_grouped_norms,
                                       save_head_norms)
from deepfuse_cli.rules import load_preset
from deepfuse_cli.verify.decompose import Layout, decompose

from .conftest import FIXTURES
from .helpers import assert_fused_function, clean_refusal, cli, load, probe, run

settings.register_profile("pernorm", deadline=None, max_examples=40)
runner = CliRunner()
#: fixture families of this file; all of them self-fuse exactly in the stock runtime
FAMILIES = ["qwen3", "olmo2-gqa", "olmo", "llama3"]


@functools.cache
def source_outputs(name: str):
    return run(load(FIXTURES / "hf" / name), probe())


def verify_checks(path, *extra) -> dict[str, str]:
    report = json.loads(cli("verify", path, "--json", "--probes", "2", "--seq-len", "6", *extra))
    assert report["passed"], report
    return {c["name"]: c["status"] for c in report["checks"]}


def grouped_outputs(path):
    model = load(path)
    assert apply_grouped_norms(model) > 0
    return run(model, probe())


# -- self-fusion: exact in the stock runtime ---------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES[1:])
@pytest.mark.parametrize("times", [2, 3])
def test_self_fusion_is_exact(family, times, hf_fixtures, tmp_path):
    out = tmp_path / "fused"
    cli("self-fuse", hf_fixtures / f"{family}-a", "--times", times, "-o", out, "-q")
    assert not (out / HEAD_NORMS_FILE).exists()
    logits, hidden = run(load(out), probe())
    assert_fused_function(logits, hidden, [source_outputs(f"{family}-a")] * times, [1.0 / times] * times)
    if times == 2:
        assert verify_checks(out)["function: logits vs source"] == "pass"


# -- different sources, --norm prop: exact with grouped norms ---------------------------------------

@pytest.mark.parametrize("family", [*FAMILIES, "gemma3_text"])
def test_different_sources_prop_mode_is_exact_with_grouped_norms(family, hf_fixtures, tmp_path):
    out = tmp_path / "fused"
    cli("fuse", hf_fixtures / f"{family}-a", hf_fixtures / f"{family}-b", "-o", out, "--norm", "prop", "-q")
    logits, hidden = grouped_outputs(out)
    assert_fused_function(logits, hidden, [source_outputs(f"{family}-a"), source_outputs(f"{family}-b")], [0.5, 0.5])
    assert verify_checks(out)["function: logits vs weighted average of sources"] == "pass"


@pytest.mark.parametrize("family", ["qwen3", "olmo2-gqa"])
def test_three_sources_with_weights_prop_mode_is_exact(family, hf_fixtures, tmp_path):
    out = tmp_path / "fused"
    a, b = hf_fixtures / f"{family}-a", hf_fixtures / f"{family}-b"
    cli("fuse", a, b, a, "-o", out, "--norm", "prop", "--weights", "0.5,0.3,0.2", "-q")
    logits, hidden = grouped_outputs(out)
    sa, sb = source_outputs(f"{family}-a"), source_outputs(f"{family}-b")
    assert_fused_function(logits, hidden, [sa, sb, sa], [0.5, 0.3, 0.2])


@pytest.mark.parametrize("family", [*FAMILIES, "gemma3_text"])
def test_different_sources_rule_mode_deviation_is_due_to_the_norms_alone(family, hf_fixtures, tmp_path):
    out = tmp_path / "fused"
    cli("fuse", hf_fixtures / f"{family}-a", hf_fixtures / f"{family}-b", "-o", out, "-q")
    load(out)  # the stock runtime loads it, every key matched
    checks = verify_checks(out)
    assert checks["function: logits vs weighted average of sources"] == "expected", checks
    assert checks["function: same weights with grouped norms"] == "pass", checks


# -- what the checkpoint records ----------------------------------------------------------------------

def test_qwen3_stock_tensor_is_the_average_and_the_head_file_holds_each_heads_scale(hf_fixtures, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "fused"
    cli("fuse", hf_fixtures / "qwen3-a", hf_fixtures / "qwen3-b", "-o", out, "--norm", "prop", "--weights", "0.75,0.25",
        "-q")
    config = json.loads((out / "config.json").read_text())
    assert config["deepfuse_head_norms"] == HEAD_NORMS_FILE and ROLE_GROUPS_KEY not in config
    fused, heads = load_file(out / "model.safetensors"), load_file(out / HEAD_NORMS_FILE)
    a, b = load_file(hf_fixtures / "qwen3-a" / "model.safetensors"), load_file(hf_fixtures / "qwen3-b" / "model.safetensors")
    assert sorted(heads) == sorted(k for k in fused if k.endswith(("q_norm.weight", "k_norm.weight")))
    for name, rows in heads.items():
        count = 4 if "q_norm" in name else 2  # each source: 4 query heads, 2 key/value heads
        assert torch.equal(rows, torch.cat([a[name].expand(count, -1), b[name].expand(count, -1)]))
        torch.testing.assert_close(fused[name], 0.75 * a[name] + 0.25 * b[name])
    manifest = json.loads((out / "deepfuse.json").read_text())
    assert HEAD_NORMS_FILE in manifest["files"]


def test_olmo2_gqa_records_groups_per_role(hf_fixtures, tmp_path):
    out = tmp_path / "fused"
    cli("fuse", hf_fixtures / "olmo2-gqa-a", hf_fixtures / "olmo2-gqa-b", "-o", out, "--norm", "prop", "-q")
    config = json.loads((out / "config.json").read_text())
    assert config["deepfuse_norm_groups"] == [16, 16]
    assert config[ROLE_GROUPS_KEY] == {"heads": [16, 16], "kv": [8, 8]}
    model = load(out)
    apply_grouped_norms(model)
    attn = model.model.layers[0].self_attn
    assert attn.q_norm.groups == [16, 16] and attn.k_norm.groups == [8, 8]


def test_olmo_weightless_layer_norms_are_grouped(hf_fixtures, tmp_path):
    out = tmp_path / "fused"
    cli("fuse", hf_fixtures / "olmo-a", hf_fixtures / "olmo-b", "-o", out, "--norm", "prop", "-q")
    model = load(out)
    assert apply_grouped_norms(model) == 2 * 2 + 1  # two per layer, and the final one
    assert model.model.norm.weight is None and model.model.norm.groups == [16, 16]


def test_grouped_head_norms_train_and_save_in_the_stock_layout(hf_fixtures, tmp_path):
    out, again = tmp_path / "fused", tmp_path / "again"
    cli("fuse", hf_fixtures / "qwen3-a", hf_fixtures / "qwen3-b", "-o", out, "--norm", "prop", "-q")
    model = load(out)
    apply_grouped_norms(model)
    assert not any(k.endswith("head_weight") for k in model.state_dict())
    assert any(n.endswith("head_weight") for n, _ in model.named_parameters())
    with torch.no_grad():  # a training step moved one head's scale
        model.model.layers[0].self_attn.q_norm.head_weight[5].mul_(1.5)
    before = run(model, probe())[0]
    model.save_pretrained(again)
    assert save_head_norms(model, again) == again / HEAD_NORMS_FILE
    reloaded = load(again)
    apply_grouped_norms(reloaded)
    torch.testing.assert_close(run(reloaded, probe())[0], before, rtol=0, atol=0)


def test_a_config_naming_a_missing_head_file_is_an_error(hf_fixtures, tmp_path):
    out = tmp_path / "fused"
    cli("fuse", hf_fixtures / "qwen3-a", hf_fixtures / "qwen3-b", "-o", out, "--norm", "prop", "-q")
    (out / HEAD_NORMS_FILE).unlink()
    with pytest.raises(ValueError, match=HEAD_NORMS_FILE):
        apply_grouped_norms(load(out))


def test_llama3_sources_with_other_rope_scaling_are_refused(hf_fixtures, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(hf_fixtures / "llama3-b", other)
    config = json.loads((other / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "llama3"
    config["rope_parameters"]["factor"] = 4.0
    (other / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["fuse", str(hf_fixtures / "llama3-a"), str(other), "-o", str(tmp_path / "o")])
    clean_refusal(result, ["rope_parameters"])
    assert not (tmp_path / "o").exists()


# -- mT5 (the t5 family lists model_type 'mt5') and UMT5 (its own preset) ---------------------------

def seq2seq_outputs(path):
    import transformers

    config = json.loads((path / "config.json").read_text())
    # mT5 in its own class (its norms are MT5LayerNorm, which the t5 family's norms list)
    cls = {"mt5": transformers.MT5ForConditionalGeneration, "umt5": transformers.UMT5ForConditionalGeneration}
    model, info = cls[config["model_type"]].from_pretrained(str(path), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    if config.get("deepfuse_norm_groups"):
        apply_grouped_norms(model)
    p = probe()
    with torch.no_grad():
        out = model.eval()(input_ids=p["input_ids"], decoder_input_ids=p["decoder_input_ids"], output_hidden_states=True)
    return out.logits, list(out.encoder_hidden_states) + list(out.decoder_hidden_states)


@pytest.mark.parametrize("family", ["mt5", "umt5"])
def test_mt5_and_umt5_are_exact(family, hf_fixtures, tmp_path):
    rules = []  # mT5 is detected as the t5 family (model_type 'mt5'), UMT5 as its own
    a, b = seq2seq_outputs(hf_fixtures / f"{family}-a"), seq2seq_outputs(hf_fixtures / f"{family}-b")
    cli("self-fuse", hf_fixtures / f"{family}-a", *rules, "-o", tmp_path / "self", "-q")
    assert_fused_function(*seq2seq_outputs(tmp_path / "self"), [a, a], [0.5, 0.5])
    cli("fuse", hf_fixtures / f"{family}-a", hf_fixtures / f"{family}-b", *rules, "--norm", "prop",
        "-o", tmp_path / "ab", "-q")
    assert_fused_function(*seq2seq_outputs(tmp_path / "ab"), [a, b], [0.5, 0.5])
    checks = verify_checks(tmp_path / "ab", *rules)
    assert checks["function: logits vs weighted average of sources"] == "pass"


# -- properties of the new op and module --------------------------------------------------------------

def _weights(n):
    return st.lists(st.floats(0.05, 1.0), min_size=n, max_size=n).map(lambda w: [x / sum(w) for x in w])


@settings(settings.get_profile("pernorm"))
@given(st.integers(1, 4), st.integers(1, 8), st.data())
def test_shared_average_is_source_one_when_sources_agree_else_the_weighted_average(n, size, data):
    weights = data.draw(_weights(n))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    rule = load_preset("qwen3").rules[4]
    op = ops.get("shared_average")
    same = torch.randn(size, generator=g).to(torch.bfloat16)
    got = torch.cat(list(op.rows([same] * n, rule, ops.FuseContext(dtype=torch.bfloat16, weights=weights))))
    assert torch.equal(got, same)
    srcs = [torch.randn(size, generator=g) for _ in range(n)]
    got = torch.cat(list(op.rows(srcs, rule, ops.FuseContext(dtype=torch.float32, weights=weights))))
    torch.testing.assert_close(got, sum(w * s for w, s in zip(weights, srcs)), rtol=1e-6, atol=1e-6)
    # verify's decomposition, from the mathematics, gives the same value
    (block,) = decompose(Layout("t", rule, [(size,)] * n, weights))
    expected = sum(t.coef * srcs[t.source][t.region] for t in block.terms)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@settings(settings.get_profile("pernorm"))
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.sampled_from([2, 4, 6]), st.data())
def test_grouped_head_norm_applies_each_heads_scale_on_either_head_axis(batch, heads, seq, head_dim, data):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    stock = Qwen3RMSNorm(head_dim, eps=1e-6)
    scales = 1 + 0.3 * torch.randn(heads, head_dim, generator=g)
    x = torch.randn(batch, seq, heads, head_dim, generator=g)
    per_head = GroupedHeadNorm(stock, scales, -2, 1e-6)(x)
    for h in range(heads):  # head h is the stock norm with that head's scale
        with torch.no_grad():
            stock.weight.copy_(scales[h])
        torch.testing.assert_close(per_head[:, :, h], stock(x[:, :, h]), rtol=1e-6, atol=1e-6)
    moved = GroupedHeadNorm(stock, scales, -3, 1e-6)(x.transpose(1, 2))
    torch.testing.assert_close(moved, per_head.transpose(1, 2), rtol=0, atol=0)


def test_verify_checks_each_heads_scale_in_the_head_file(hf_fixtures, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "fused"
    cli("fuse", hf_fixtures / "qwen3-a", hf_fixtures / "qwen3-b", "-o", out, "-q")  # rule mode writes it too
    assert verify_checks(out, "--no-function")["tensors: per-head norms"] == "pass"
    heads = load_file(out / HEAD_NORMS_FILE)
    heads["model.layers.1.self_attn.k_norm.weight"][2, 0] += 0.5  # first key head of source 2
    save_file(heads, out / HEAD_NORMS_FILE)
    result = runner.invoke(app, ["verify", str(out), "--json", "--no-function"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    check = next(c for c in report["checks"] if c["name"] == "tensors: per-head norms")
    assert check["status"] == "fail" and "rows 2..3 (the heads of source 2)" in check["message"], check


def test_a_base_model_without_the_head_finds_its_per_head_norms(hf_fixtures, tmp_path):
    from transformers import AutoModel

    out = tmp_path / "fused"
    cli("fuse", hf_fixtures / "qwen3-a", hf_fixtures / "qwen3-b", "-o", out, "--norm", "prop", "-q")
    base = AutoModel.from_pretrained(str(out)).eval()
    apply_grouped_norms(base)
    assert sum(isinstance(m, GroupedHeadNorm) for m in base.modules()) == 2 * 2  # q_norm and k_norm, 2 layers
    with torch.no_grad():
        hidden = base(input_ids=probe()["input_ids"]).last_hidden_state
    model = load(out)
    apply_grouped_norms(model)
    logits, _ = run(model, probe())
    with torch.no_grad():
        torch.testing.assert_close(model.lm_head(hidden), logits, rtol=1e-5, atol=1e-5)


@settings(settings.get_profile("pernorm"))
@given(st.lists(st.integers(1, 6), min_size=1, max_size=4), st.integers(1, 3), st.data())
def test_grouped_weightless_layer_norm_is_olmos_norm_of_each_slice(groups, seq, data):
    from transformers.models.olmo.modeling_olmo import OlmoLayerNorm

    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    x = 3 * torch.randn(2, seq, sum(groups), generator=g) + 1
    model = torch.nn.Sequential(OlmoLayerNorm(sum(groups)))
    model.config = type("Config", (), {"model_type": "olmo", "deepfuse_norm_groups": groups})()
    assert apply_grouped_norms(model) == 1
    expected = torch.cat([OlmoLayerNorm(d)(part) for d, part in zip(groups, torch.split(x, groups, dim=-1))], dim=-1)
    torch.testing.assert_close(model[0](x), expected, rtol=1e-5, atol=1e-5)


def test_every_rule_of_the_new_presets_claims_a_tensor_and_tied_biased_olmo_self_fuses(hf_fixtures, tmp_path):
    """olmo and umt5 rules against their fixtures, plus an OLMo with attention biases and tied embeddings
    (OLMo-1B's choice), which also self-fuses exactly."""
    import transformers

    from deepfuse_cli.formats import open_checkpoint
    from deepfuse_cli.plan import virtualise_output
    from deepfuse_cli.rules import RuleSet

    torch.manual_seed(0)
    transformers.OlmoForCausalLM(transformers.OlmoConfig(
        vocab_size=64, hidden_size=16, num_attention_heads=4, intermediate_size=24, num_hidden_layers=1,
        max_position_embeddings=32, attention_bias=True, tie_word_embeddings=True, clip_qkv=0.5, pad_token_id=0,
        eos_token_id=1)).save_pretrained(tmp_path / "olmo-tied")
    for preset, fixtures in {"olmo": [hf_fixtures / "olmo-a", tmp_path / "olmo-tied"],
                             "umt5": [hf_fixtures / "umt5-a"]}.items():
        p = load_preset(preset)
        used: set[int] = set()
        for fixture in fixtures:
            refs, _ = virtualise_output(open_checkpoint(fixture), 0, p)
            matched, unmatched, ambiguous, _ = RuleSet(p).coverage(list(refs))
            assert not unmatched and not ambiguous, (fixture, unmatched, ambiguous)
            used |= {m.index for m in matched.values()}
        dead = [p.rules[i].pattern for i in range(len(p.rules)) if i not in used]
        assert all("embed_tokens" in d or "DenseReluDense\\.wi\\." in d for d in dead), dead
    out = tmp_path / "fused"
    cli("self-fuse", tmp_path / "olmo-tied", "-o", out, "-q")
    source = run(load(tmp_path / "olmo-tied"), probe())
    logits, hidden = run(load(out), probe())
    assert_fused_function(logits, hidden, [source, source], [0.5, 0.5])
