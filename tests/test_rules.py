"""Rules are data: schema validation, coverage both ways, and a user rules file for an architecture
deepfuse does not ship (OPT), checked in the real runtime."""

from __future__ import annotations

import json

import pytest
import torch

from deepfuse_cli.errors import RuleError
from deepfuse_cli.rules import RuleSet, list_presets, load_preset, load_rules
from deepfuse_cli.rules.engine import parse_preset

from .helpers import assert_fused_function, cli, load, probe, run

PRESET_FIXTURES = {"llama": ["llama-a", "qwen2-a", "mistral-a", "llama-tied-a"], "gpt2": ["gpt2-a"],
                   "t5": ["t5v11-a", "t5v10-a"], "mlp": ["mlp-a"], "qwen3": ["qwen3-a"],
                   "starcoder2": ["starcoder2-a"], "olmo2": ["olmo2-a"], "gpt_neox": ["gpt_neox-a"], "opt": ["opt-a", "opt-proj-a"],
                   "mixtral": ["mixtral-a", "mixtral-a-stacked"], "qwen3_moe": ["qwen3_moe-a", "qwen3_moe-a-stacked"],
                   "phi3": ["phi3-a", "phi3-longrope-a"], "falcon": ["falcon-a", "falcon-mq-a", "falcon-mha-a"],
                   "gemma": ["gemma-a"], "gemma2": ["gemma2-a"], "gemma3_text": ["gemma3_text-a"]}


def test_every_preset_is_valid_and_has_a_fixture():
    assert set(list_presets()) >= set(PRESET_FIXTURES)
    for name in list_presets():
        assert load_preset(name).name == name


@pytest.mark.parametrize("preset", sorted(PRESET_FIXTURES))
def test_every_rule_claims_something_in_the_presets_own_fixtures(preset, hf_fixtures):
    """A rule that claims nothing in any of its preset's fixtures is dead (optional ones included)."""
    from deepfuse_cli.formats import open_checkpoint
    from deepfuse_cli.plan import virtualise_output

    p = load_preset(preset)
    used: set[int] = set()
    for fixture in PRESET_FIXTURES[preset]:
        refs, _ = virtualise_output(open_checkpoint(hf_fixtures / fixture), 0, p)
        matched, unmatched, ambiguous, _ = RuleSet(p).coverage(list(refs))
        assert not unmatched and not ambiguous, (fixture, unmatched, ambiguous)
        used |= {m.index for m in matched.values()}
    dead = [p.rules[i].pattern for i in range(len(p.rules)) if i not in used]
    # the buffers of old checkpoints and the optional attention/MLP biases (attention_bias, mlp_bias) have no fixture
    allowed = {r.pattern for r in p.rules if r.op == "passthrough_identical" or
               (r.optional and ("self_attn" in r.pattern or "mlp" in r.pattern or "embed_tokens" in r.pattern))}
    assert set(dead) <= allowed, dead


@pytest.mark.parametrize("bad, message", [
    ({"name": "x", "rules": [{"pattern": "a", "op": "concat", "axes": ["hidden"], "colour": 1}]}, "rules[0].colour"),
    ({"name": "x", "rules": [{"pattern": "a(", "op": "concat", "axes": ["hidden"]}]}, "invalid regular expression"),
    ({"name": "x", "rules": [{"pattern": "a", "op": "concat", "axes": ["width"]}]}, "unknown axis role"),
    ({"name": "x", "rules": [{"pattern": "a", "op": "block_diagonal", "axes": ["hidden", "vocab"]}]}, "2 widened"),
    ({"name": "x", "rules": [{"pattern": "a", "op": "block_diagonal", "axes": ["hidden", "mlp"]}]}, "input_axis"),
    ({"name": "x", "rules": [{"pattern": "a", "op": "explode", "axes": []}]}, "rules[0].op"),
    ({"name": "x", "rules": []}, "at least one rule"),
    ({"name": "x", "rules": [{"pattern": "a", "op": "concat", "axes": ["hidden"]}], "extra": 1}, "extra"),
])
def test_invalid_rules_files_are_refused_with_a_pointer(bad, message, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(RuleError) as exc:
        load_rules(path)
    assert message in str(exc.value) and str(path) in str(exc.value)
    out = cli("rules", "check", path, expect=2)
    assert message in out and "Traceback" not in out


def test_rules_are_never_evaluated(tmp_path):
    path = tmp_path / "evil.json"
    path.write_text(json.dumps({"name": "__import__('os').system('touch pwned')", "rules": [
        {"pattern": "(?P<x>__import__)", "op": "concat", "axes": ["hidden"], "note": "eval('1')"}]}))
    load_rules(path)
    assert not (tmp_path / "pwned").exists()


def test_coverage_is_checked_both_ways(hf_fixtures, tmp_path):
    rules = load_preset("llama").model_dump(mode="json")
    rules["rules"] = [r for r in rules["rules"] if "mlp" not in r["pattern"]]
    path = tmp_path / "partial.json"
    path.write_text(json.dumps(rules))
    out = cli("rules", "check", path, hf_fixtures / "llama-a", expect=2)
    assert "unmatched tensor: model.layers.0.mlp.down_proj.weight" in out
    out = cli("fuse", hf_fixtures / "llama-a", hf_fixtures / "llama-b", "--rules", path, "-o", tmp_path / "o", expect=2)
    assert "claimed by no rule" in out and not (tmp_path / "o").exists()
    rules = load_preset("gpt2").model_dump(mode="json")
    rules["rules"].append({"pattern": "transformer\\.never\\.weight", "op": "concat", "axes": ["hidden"]})
    path.write_text(json.dumps(rules))
    out = cli("rules", "check", path, hf_fixtures / "gpt2-a", expect=2)
    assert "claims nothing: transformer\\.never\\.weight" in out
    rules["rules"][-1] = {"pattern": "transformer\\.wte\\..*", "op": "concat", "axes": ["vocab", "hidden"]}
    path.write_text(json.dumps(rules))
    out = cli("fuse", hf_fixtures / "gpt2-a", hf_fixtures / "gpt2-b", "--rules", path, "-o", tmp_path / "o", expect=2)
    assert "more than one rule" in out


OPT_RULES = {
    "name": "opt",
    "description": "OPT decoders, written by a user (not shipped)",
    "output": {"name": "lm_head.weight", "tied_to": "model.decoder.embed_tokens.weight"},
    "config": {"sum": ["hidden_size", "num_attention_heads", "ffn_dim", "word_embed_proj_dim"],
               "equal": ["model_type", "vocab_size", "num_hidden_layers", "max_position_embeddings"],
               "set": {"tie_word_embeddings": False}, "width": "hidden_size"},
    "rules": [
        {"pattern": "model\\.decoder\\.embed_tokens\\.weight", "op": "concat", "axes": ["vocab", "hidden"]},
        {"pattern": "model\\.decoder\\.embed_positions\\.weight", "op": "concat", "axes": ["positions", "hidden"]},
        {"pattern": "model\\.decoder\\.layers\\.{layer}\\.self_attn\\.(q|k|v)_proj\\.weight", "op": "block_diagonal",
         "axes": ["heads", "hidden"], "input_axis": 1},
        {"pattern": "model\\.decoder\\.layers\\.{layer}\\.self_attn\\.(q|k|v)_proj\\.bias", "op": "concat", "axes": ["heads"]},
        {"pattern": "model\\.decoder\\.layers\\.{layer}\\.self_attn\\.out_proj\\.weight", "op": "block_diagonal",
         "axes": ["hidden", "heads"], "input_axis": 1},
        {"pattern": "model\\.decoder\\.layers\\.{layer}\\.fc1\\.weight", "op": "block_diagonal", "axes": ["mlp", "hidden"], "input_axis": 1},
        {"pattern": "model\\.decoder\\.layers\\.{layer}\\.fc1\\.bias", "op": "concat", "axes": ["mlp"]},
        {"pattern": "model\\.decoder\\.layers\\.{layer}\\.fc2\\.weight", "op": "block_diagonal", "axes": ["hidden", "mlp"], "input_axis": 1},
        {"pattern": "model\\.decoder\\.layers\\.{layer}\\.(self_attn\\.out_proj|fc2)\\.bias", "op": "concat", "axes": ["hidden"]},
        {"pattern": "model\\.decoder\\.(layers\\.{layer}\\.)?(self_attn_layer_norm|final_layer_norm)\\.(weight|bias)",
         "op": "concat", "axes": ["hidden"], "norm": True},
        {"pattern": "lm_head\\.weight", "op": "output_average", "axes": ["vocab", "hidden"]},
    ],
}


def test_user_rules_file_for_an_unshipped_architecture(tmp_path):
    """A user writes OPT rules (listing no model_type); the fused model runs in transformers' OPT."""
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=64, hidden_size=16, num_attention_heads=4, ffn_dim=24, num_hidden_layers=2,
                    max_position_embeddings=32, word_embed_proj_dim=16, dropout=0.0)
    torch.manual_seed(0)
    model = OPTForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name and name.endswith("weight") else 0.2 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "opt")
    rules = tmp_path / "opt-rules.json"
    rules.write_text(json.dumps(OPT_RULES, indent=2))
    cli("rules", "check", rules, tmp_path / "opt")
    out = cli("self-fuse", tmp_path / "opt", "--times", 2, "--rules", rules, "-o", tmp_path / "fused")
    assert "untied" in out
    fused = load(tmp_path / "fused")
    assert fused.config.hidden_size == 32 and fused.config.num_attention_heads == 8
    logits, hidden = run(fused, probe())
    assert_fused_function(logits, hidden, [run(load(tmp_path / "opt"), probe())] * 2, [0.5, 0.5])
    # without --rules the shipped opt preset fuses it to the same weights and config
    cli("self-fuse", tmp_path / "opt", "--times", 2, "-o", tmp_path / "shipped", "-q")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "shipped" / name).read_bytes() == (tmp_path / "fused" / name).read_bytes()


def test_parse_preset_reports_json_errors():
    with pytest.raises(RuleError, match="invalid JSON at line 1"):
        parse_preset("{nope", "inline")


@pytest.mark.parametrize("preset", ["llama", "gpt2", "mlp", "starcoder2", "olmo2", "gpt_neox"])
def test_fields_a_preset_does_not_use_are_left_out_of_its_dump(preset):
    """Schema fields added later are dumped only when set, so a preset that does not use them keeps the
    digest recorded in manifests written before they existed (verify matches built-in rules by digest)."""
    data = load_preset(preset).model_dump(mode="json")
    assert not {"deviations", "moe"} & set(data)
    assert not {"require", "refuse"} & set(data["config"])
    assert not any({"runtime_scale", "per_head", "head_axis"} & set(r) for r in data["rules"])
