"""The family registry: a family is its preset file (plus hooks only where data cannot say it).

Config expressions, namings (T5 described once, its T5X names derived), the widths check against
the tensors, norm modules by family, and a family added as one file running the function check.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from deepfuse_cli.architectures import family_of
from deepfuse_cli.formats import open_checkpoint
from deepfuse_cli.grouped_norm import GroupedNorm
from deepfuse_cli.rules import RuleSet, load_preset, load_rules
from deepfuse_cli.rules.engine import builtin_presets, parse_preset
from deepfuse_cli.rules.expr import ExprError, evaluate, names

from .conftest import FIXTURES
from .helpers import cli


# -- config expressions -----------------------------------------------------------------------------

def test_expressions_compute_from_the_config():
    cfg = {"hidden_size": 16, "num_attention_heads": 4, "head_dim": None, "tie": False}
    assert evaluate("head_dim or hidden_size // num_attention_heads", cfg) == 4
    assert evaluate("num_key_value_heads or num_attention_heads", cfg) == 4
    assert evaluate("num_attention_heads / (num_key_value_heads or 2)", cfg) == 2.0
    assert evaluate("d_model ** -0.5 if tie is not False else 1.0", {"d_model": 16, "tie": True}) == 0.25
    assert evaluate("d_model ** -0.5 if tie is not False else 1.0", {"d_model": 16, "tie": False}) == 1.0
    assert evaluate("hidden_size * missing", cfg) is None  # absent fields cannot be derived
    assert evaluate("hidden_size // 0", cfg) is None
    assert names("num_key_value_heads * head_dim") == {"num_key_value_heads", "head_dim"}


@pytest.mark.parametrize("text", ["__import__('os')", "config.x", "a[0]", "lambda: 1", "'text'", "[1, 2]",
                                  "x" * 600, "f(1)", "(y := 2)"])
def test_expressions_refuse_anything_but_arithmetic(text):
    with pytest.raises(ExprError):
        evaluate(text, {})


def test_huge_powers_are_not_computed():
    assert evaluate("10 ** 10 ** 10", {}) is None


@given(st.integers(1, 1 << 20), st.integers(1, 64))
def test_expression_arithmetic_is_python_arithmetic(a, b):
    cfg = {"a": a, "b": b}
    assert evaluate("a // b * b + a % b", cfg) == a
    assert math.isclose(evaluate("a / b", cfg), a / b)


def test_a_rules_file_with_a_bad_expression_is_refused():
    preset = load_preset("llama").model_dump(mode="json")
    preset["config"]["derived"]["head_dim"] = "open('x').read()"
    with pytest.raises(Exception, match="not allowed"):
        parse_preset(json.dumps(preset), "inline")


# -- namings -----------------------------------------------------------------------------------------

def test_every_builtin_preset_in_every_naming_is_valid_and_round_trips():
    for p in builtin_presets():
        again = parse_preset(json.dumps(p.model_dump(mode="json")), "round trip")
        assert again == p
        back = p.for_naming(load_preset(p.name).naming)
        base = load_preset(p.name)
        assert [(r.pattern, r.axes, r.input_axis, r.op) for r in back.rules] == \
               [(r.pattern, r.axes, r.input_axis, r.op) for r in base.rules if all(
                   c.name is not None for c in r.names.values())] or p.naming == base.naming


def test_t5_is_described_once_and_its_t5x_naming_is_derived():
    t5 = load_preset("t5")
    t5x = t5.for_naming("t5x")
    assert load_rules("t5x") == t5x  # the old preset name still works
    q = next(r for r in t5x.rules if r.pattern.endswith("attention/query/kernel"))
    assert q.axes == ["hidden", "heads"] and q.input_axis == 0  # [in, out] in T5X
    relpos = next(r for r in t5x.rules if "relpos_bias" in r.pattern)
    assert relpos.axes == ["head_count", "buckets"]
    assert t5x.output.name == "target/decoder/logits_dense/kernel"
    assert t5x.output.tied_to == "target/token_embedder/embedding" and t5x.output.transpose


def test_t5x_names_convert_to_transformers_names_and_back():
    """Every tensor of a T5X checkpoint has exactly the name transformers' T5 gives it, and back."""
    from deepfuse_cli.convert import conversion_for
    from deepfuse_cli.formats.registry import HUGGING_FACE, T5X_LEGACY

    t5x_names = sorted(open_checkpoint(FIXTURES / "t5x" / "legacy-a").tensors)
    to_hf = conversion_for(load_rules("t5x"), t5x_names, HUGGING_FACE)
    hf_names = sorted(to_hf.out_name(n) for n in t5x_names)
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_heads=4, num_layers=2,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    with torch.device("meta"):
        model = T5ForConditionalGeneration(cfg)
    expected = sorted(n for n in model.state_dict()
                      if n not in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"))
    assert hf_names == expected
    assert to_hf.transpose == {n for n in t5x_names if n.endswith("/kernel") or n.endswith("rel_embedding")}
    back = conversion_for(load_preset("t5"), hf_names + ["encoder.embed_tokens.weight"], T5X_LEGACY)
    assert sorted(back.out_name(n) for n in hf_names) == t5x_names
    assert back.drop == {"encoder.embed_tokens.weight"}


def test_a_family_without_the_target_naming_does_not_convert(tmp_path):
    out = cli("convert", FIXTURES / "hf" / "llama-a", "--to", "t5x", "-o", tmp_path / "x", expect=2)
    assert "has no names in the t5x naming" in out


# -- widths against the tensors (config.json must describe the weights) ----------------------------

@pytest.mark.parametrize("field, value, role", [("hidden_size", 10**12, "hidden"), ("intermediate_size", 7, "mlp"),
                                                ("num_key_value_heads", 1, "kv")])
def test_a_config_that_lies_about_the_widths_is_refused(tmp_path, field, value, role):
    import shutil

    src = tmp_path / "lying"
    shutil.copytree(FIXTURES / "hf" / "llama-a", src)
    cfg = json.loads((src / "config.json").read_text())
    cfg[field] = value
    (src / "config.json").write_text(json.dumps(cfg))
    out = cli("self-fuse", src, "--times", 2, "-o", tmp_path / "out", expect=2)
    assert out.startswith("error: ") and f"({role})" in out and "config.json" in out, out
    assert not (tmp_path / "out").exists()


def test_widths_come_from_the_family_file():
    fam = family_of(load_preset("llama"))
    cfg = json.loads((FIXTURES / "hf" / "llama-a" / "config.json").read_text())
    assert fam.widths(cfg) == {"hidden": 16, "heads": 16, "kv": 8, "mlp": cfg["intermediate_size"]}
    gpt2 = family_of(load_preset("gpt2"))
    g = json.loads((FIXTURES / "hf" / "gpt2-a" / "config.json").read_text())
    assert gpt2.widths(g)["qkv"] == 3 * g["n_embd"]


# -- output scale and norms as data ------------------------------------------------------------------

def test_output_scale_is_the_family_expression():
    t5 = family_of(load_preset("t5"))
    v10 = json.loads((FIXTURES / "hf" / "t5v10-a" / "config.json").read_text())
    v11 = json.loads((FIXTURES / "hf" / "t5v11-a" / "config.json").read_text())
    assert t5.output_scale(v10) == pytest.approx(v10["d_model"] ** -0.5)
    assert t5.output_scale(v11) == 1.0
    # a rules file saying otherwise is obeyed (it used to be ignored)
    custom = load_preset("llama").model_copy(update={"output": load_preset("llama").output.model_copy(
        update={"scale": "0.5"})})
    assert family_of(custom).output_scale({"hidden_size": 16}) == 0.5


def test_grouped_norm_offset_is_one_plus_weight_per_group():
    norm = torch.nn.Module()
    norm.weight = torch.nn.Parameter(0.1 * torch.randn(12))
    x = torch.randn(3, 12)
    g = GroupedNorm(norm, [4, 8], "rms", 1e-6, offset=1.0)
    want = []
    for part, w in ((x[:, :4], norm.weight[:4]), (x[:, 4:], norm.weight[4:])):
        want.append(part * torch.rsqrt(part.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + w))
    torch.testing.assert_close(g(x), torch.cat(want, -1))


def test_norm_modules_are_looked_up_in_the_family():
    from transformers import AutoModelForCausalLM

    from deepfuse_cli.grouped_norm import norm_specs

    model = AutoModelForCausalLM.from_pretrained(str(FIXTURES / "hf" / "gpt2-a"))
    assert [s.module for s in norm_specs(model)] == ["LayerNorm"]


def test_a_new_family_is_one_file_and_verify_runs_its_function_check(tmp_path):
    """A rules file naming its runtime: fused, and verify's function check runs (not skipped)."""
    rules = load_preset("llama").model_dump(mode="json")
    rules.update(name="my-llama", model_types=["llama"], architecture=None)
    path = tmp_path / "my-llama.json"
    path.write_text(json.dumps(rules))
    cli("self-fuse", FIXTURES / "hf" / "llama-a", "--times", 2, "--rules", path, "-o", tmp_path / "out", "-q")
    out = cli("verify", tmp_path / "out", "--rules", path, "--json")  # rules files are not taken from manifests
    checks = {c["name"]: c["status"] for c in json.loads(out)["checks"]}
    assert checks.get("function: logits vs source") == "pass", checks
    # without a runtime transformers still loads it from its config.json: the function check runs
    rules["runtime"] = None
    path.write_text(json.dumps(rules))
    cli("self-fuse", FIXTURES / "hf" / "llama-a", "--times", 2, "--rules", path, "-o", tmp_path / "out2", "-q")
    report = json.loads(cli("verify", tmp_path / "out2", "--rules", path, "--json"))
    assert {c["name"]: c["status"] for c in report["checks"]}.get("function: logits vs source") == "pass"


def test_ruleset_reports_the_layer_it_matched():
    rs = RuleSet(load_preset("llama"))
    (m,) = rs.claims("model.layers.12.mlp.down_proj.weight")
    assert m.layer == "12"


def test_no_function_is_reported_as_skipped(tmp_path):
    cli("self-fuse", FIXTURES / "hf" / "mlp-a", "--times", 2, "-o", tmp_path / "out", "-q")
    report = json.loads(cli("verify", tmp_path / "out", "--no-function", "--json"))
    checks = {c["name"]: c["status"] for c in report["checks"]}
    assert checks["function"] == "skip" and checks["tensors: decomposition"] == "pass"
