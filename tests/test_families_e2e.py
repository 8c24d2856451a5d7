"""Families that fit the existing ops, one preset file each (Qwen3, StarCoder2, OLMo 2, GPT-NeoX, OPT):
auto-detected from config.json, exact in transformers for self-fusion, exact with grouped norms for
different sources where the family's norms allow it, refused clearly where they cannot, and
``--rules NAME`` refused on a checkpoint of a model_type the rules do not serve."""

from __future__ import annotations

import functools
import json

import pytest
from typer.testing import CliRunner

from deepfuse_cli.cli import app
from deepfuse_cli.grouped_norm import apply_grouped_norms
from deepfuse_cli.rules import load_preset
from deepfuse_cli.rules.engine import preset_for_config

from .conftest import FIXTURES
from .helpers import assert_fused_function, clean_refusal, cli, load, probe, run

FAMILIES = ["qwen3", "starcoder2", "olmo2", "gpt_neox", "opt"]
#: families whose norms a module swap groups exactly for different sources
GROUPABLE = ["starcoder2", "olmo2", "gpt_neox", "opt"]
runner = CliRunner()


@functools.cache
def source_outputs(name: str):
    """A fixture model's logits and hidden states on the probe (each source run once)."""
    return run(load(FIXTURES / "hf" / name), probe())


def verify_checks(path) -> dict[str, str]:
    report = json.loads(cli("verify", path, "--json", "--probes", "2", "--seq-len", "6"))
    assert report["passed"], report
    return {c["name"]: c["status"] for c in report["checks"]}


@pytest.mark.parametrize("family", FAMILIES)
def test_detected_from_config_and_every_tensor_claimed_once(family, hf_fixtures):
    for side in "ab":
        config = json.loads((hf_fixtures / f"{family}-{side}" / "config.json").read_text())
        assert preset_for_config(config, "test").name == family
        out = cli("rules", "check", family, hf_fixtures / f"{family}-{side}")
        assert "every tensor claimed by exactly one rule" in out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("times", [2, 3])
def test_self_fusion_is_exact_and_verified(family, times, hf_fixtures, tmp_path):
    out = tmp_path / "fused"
    cli("self-fuse", hf_fixtures / f"{family}-a", "--times", times, "-o", out, "-q")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == family and cfg["tie_word_embeddings"] is False
    assert cfg["hidden_size"] == 16 * times and cfg["num_attention_heads"] == 4 * times
    logits, hidden = run(load(out), probe())
    assert_fused_function(logits, hidden, [source_outputs(f"{family}-a")] * times, [1.0 / times] * times)
    if times == 2:
        checks = verify_checks(out)
        assert checks["function: logits vs source"] == "pass", checks


@pytest.mark.parametrize("family", GROUPABLE)
def test_different_sources_prop_mode_is_exact_with_grouped_norms(family, hf_fixtures, tmp_path):
    out = tmp_path / "fused"
    cli("fuse", hf_fixtures / f"{family}-a", hf_fixtures / f"{family}-b", "-o", out, "--norm", "prop", "-q")
    model = load(out)
    assert json.loads((out / "config.json").read_text())["deepfuse_norm_groups"] == [16, 16]
    assert apply_grouped_norms(model) > 0
    logits, hidden = run(model, probe())
    assert_fused_function(logits, hidden, [source_outputs(f"{family}-a"), source_outputs(f"{family}-b")], [0.5, 0.5])
    assert verify_checks(out)["function: logits vs weighted average of sources"] == "pass"


@pytest.mark.parametrize("family", GROUPABLE)
def test_different_sources_rule_mode_is_an_expected_deviation(family, hf_fixtures, tmp_path):
    out = tmp_path / "fused"
    cli("fuse", hf_fixtures / f"{family}-a", hf_fixtures / f"{family}-b", "-o", out, "-q")
    checks = verify_checks(out)
    assert checks["function: logits vs weighted average of sources"] == "expected", checks
    assert checks["function: same weights with grouped norms"] == "pass", checks


@pytest.mark.parametrize("norm", ["rule", "prop"])
def test_qwen3_different_sources_are_refused_at_the_shared_head_norm(norm, hf_fixtures, tmp_path):
    """Qwen3's q_norm/k_norm is one [head_dim] scale for every head: two sources cannot both keep theirs."""
    out = tmp_path / "fused"
    result = runner.invoke(app, ["fuse", str(hf_fixtures / "qwen3-a"), str(hf_fixtures / "qwen3-b"), "-o", str(out),
                                 "--norm", norm])
    error = clean_refusal(result, ["model.layers.0.self_attn.", "_norm.weight", "must be identical"])
    assert "source 2" in error
    assert not out.exists()


def test_olmo2_prop_under_grouped_query_attention_is_refused_at_the_kv_norm(tmp_path):
    """OLMo 2's k_norm spans kv_heads * head_dim; grouped norms group the hidden size only, so under
    grouped-query attention --norm prop could not be exact: refused, naming the tensor."""
    import torch
    from transformers import Olmo2Config, Olmo2ForCausalLM

    for seed in (1, 2):
        torch.manual_seed(seed)
        Olmo2ForCausalLM(Olmo2Config(vocab_size=64, hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
                                     intermediate_size=24, num_hidden_layers=1, max_position_embeddings=32,
                                     pad_token_id=0, eos_token_id=1)).save_pretrained(tmp_path / f"s{seed}")
    args = ["fuse", str(tmp_path / "s1"), str(tmp_path / "s2"), "-o", str(tmp_path / "out")]
    result = runner.invoke(app, [*args, "--norm", "prop"])
    clean_refusal(result, ["model.layers.0.self_attn.k_norm.weight", "'kv'", "8+8", "16+16"])
    cli(*args, "--norm", "rule", "-q")  # the stock-runtime fusion is still available


# -- --rules NAME against the checkpoint's model_type (issue 12, deliverable 5) ----------------------

def test_rules_for_another_model_type_are_refused(hf_fixtures, tmp_path):
    result = runner.invoke(app, ["self-fuse", str(hf_fixtures / "qwen3-a"), "--rules", "llama", "-o", str(tmp_path / "o")])
    clean_refusal(result, ["'qwen3'", "'llama'", "qwen3-a"])
    result = runner.invoke(app, ["fuse", str(hf_fixtures / "llama-a"), str(hf_fixtures / "olmo2-a"), "--rules", "llama",
                                 "-o", str(tmp_path / "o")])
    clean_refusal(result, ["source 2", "'olmo2'", "'llama'"])
    assert not (tmp_path / "o").exists()


def test_rules_listing_the_model_type_or_none_are_accepted(hf_fixtures, tmp_path):
    rules = load_preset("qwen3").model_dump(mode="json")
    for i, model_types in enumerate([["qwen3", "my-qwen"], []]):
        path = tmp_path / f"rules{i}.json"
        path.write_text(json.dumps({**rules, "name": "my-qwen", "model_types": model_types}))
        cli("self-fuse", hf_fixtures / "qwen3-a", "--rules", path, "-o", tmp_path / f"out{i}", "-q")
    path.write_text(json.dumps({**rules, "name": "my-qwen", "model_types": ["qwen2"]}))
    result = runner.invoke(app, ["self-fuse", str(hf_fixtures / "qwen3-a"), "--rules", str(path), "-o", str(tmp_path / "x")])
    clean_refusal(result, ["'qwen3'", "'my-qwen'", "'qwen2'"])


def test_t5x_checkpoints_keep_working_with_the_t5_rules(tmp_path):
    """A T5X train state has an inferred config (model_type 't5x'), which the t5 preset lists."""
    for rules in ("t5x", "t5"):
        cli("self-fuse", FIXTURES / "t5x" / "legacy-a", "--rules", rules, "-o", tmp_path / rules, "--dry-run")
