"""Rules inferred from the model itself (issue 12, families no preset names).

``deepfuse rules infer SRC`` builds the causal LM transformers makes from SRC's config.json on the meta
device and classifies every parameter by its module. For the built-in families whose parameters are all
plain embeddings, Linear layers and norms, the inferred rules must fuse to *exactly* the bytes the
built-in preset writes; families with modules inference cannot read (fused q/k/v projections, scaled
embeddings, per-head norms, Conv1D) are refused naming the first such parameter, never guessed.
``fuse/self-fuse --rules infer`` keeps its output only when verify's function check passes on it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from deepfuse_cli.cli import app
from tests.conftest import FIXTURES
from tests.helpers import cli, runner

import transformers  # noqa: E402,F401 - the test extra installs it: the inference builds models with it

HF = FIXTURES / "hf"
#: families whose every parameter inference classifies (fused output checked byte for byte below)
INFERRED = ["llama-a", "llama-tied-a", "qwen2-a", "starcoder2-a", "olmo2-a"]
#: families refused, and the first parameter inference cannot classify
REFUSED = {
    "gpt_neox-a": "query_key_value.weight",  # fused q/k/v: per-head or [q; k; v] layout cannot be told from shapes
    "phi3-a": "qkv_proj.weight",
    "gemma-a": "embed_tokens.weight",  # a scaled embedding module (the runtime multiplies by sqrt(hidden))
    "qwen3-a": "q_norm.weight",  # a per-head norm of head_dim
    "gpt2-a": "c_attn.weight",  # Conv1D
}


def _tensors(directory: Path) -> dict:
    out = {}
    for p in sorted(directory.glob("*.safetensors")):
        out.update(load_file(p))
    return out


def _infer(src: Path, tmp_path: Path) -> Path:
    rules = tmp_path / f"{src.name}.json"
    cli("rules", "infer", src, "-o", rules)
    return rules


@pytest.mark.parametrize("fixture", INFERRED)
def test_inferred_rules_fuse_to_the_presets_bytes(fixture, tmp_path):
    src = HF / fixture
    rules = _infer(src, tmp_path)
    data = json.loads(rules.read_text())
    assert data["model_types"] == [json.loads((src / "config.json").read_text())["model_type"]]
    cli("rules", "check", rules, src)  # every tensor claimed by exactly one rule
    cli("self-fuse", src, "--rules", rules, "-o", tmp_path / "inferred", "-q")
    cli("self-fuse", src, "-o", tmp_path / "preset", "-q")
    inferred, preset = _tensors(tmp_path / "inferred"), _tensors(tmp_path / "preset")
    assert inferred.keys() == preset.keys()
    for name, t in preset.items():
        assert inferred[name].dtype == t.dtype and inferred[name].equal(t), name
    assert json.loads((tmp_path / "inferred" / "config.json").read_text()) == json.loads(
        (tmp_path / "preset" / "config.json").read_text())


def test_inferred_widths_name_roles_not_fixture_sizes(tmp_path):
    """Roles come from a probe config whose widths all differ, so a model whose heads x head_dim
    equals its hidden size (the fixtures) still gets q/k/v/o roles that hold for any size."""
    data = json.loads(_infer(HF / "llama-a", tmp_path).read_text())
    axes = {r["pattern"]: r["axes"] for r in data["rules"]}
    assert axes[r"model\.layers\.{layer}\.self_attn\.q_proj\.weight"] == ["heads", "hidden"]
    assert axes[r"model\.layers\.{layer}\.self_attn\.k_proj\.weight"] == ["kv", "hidden"]
    assert axes[r"model\.layers\.{layer}\.self_attn\.o_proj\.weight"] == ["hidden", "heads"]
    assert axes[r"model\.layers\.{layer}\.mlp\.down_proj\.weight"] == ["hidden", "mlp"]
    assert axes[r"lm_head\.weight"] == ["vocab", "hidden"]
    assert data["output"] == {"name": "lm_head.weight", "tied_to": "model.embed_tokens.weight"}
    assert data["config"]["sum"] == ["hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size"]
    assert {"vocab_size", "num_hidden_layers", "rms_norm_eps", "head_dim"} <= set(data["config"]["equal"])
    assert data["norms"][0]["kind"] == "rms"


@pytest.mark.parametrize("fixture,first", REFUSED.items())
def test_unclassified_parameters_are_refused(fixture, first, tmp_path):
    out = tmp_path / "rules.json"
    text = cli("rules", "infer", HF / fixture, "-o", out, expect=2)
    error = sorted({line for line in text.splitlines() if line.startswith("error:")})  # stderr may be echoed twice
    assert len(error) == 1 and first in error[0] and "cannot classify" in error[0]
    assert not out.exists()  # no rules without --partial


def test_partial_emits_the_classified_rules_and_lists_the_rest(tmp_path):
    result = runner.invoke(app, ["rules", "infer", str(HF / "gpt_neox-a"), "--json", "--partial"])
    assert result.exit_code == 2
    report = json.loads(result.stdout)
    names = [u["parameter"] for u in report["unclassified"]]
    assert "gpt_neox.layers.{layer}.attention.query_key_value.weight" in names
    assert "embed_out.weight" in names  # the files' name for the module transformers calls lm_head
    assert report["rules"]["rules"] and report["classified"] >= 10


def test_not_a_transformers_config_is_one_line(tmp_path):
    text = cli("rules", "infer", HF / "mlp-a", expect=2)
    assert "transformers has no configuration" in text
    text = cli("rules", "infer", tmp_path, expect=2)
    assert "no model weights found" in text


def test_fuse_with_rules_infer_keeps_only_a_function_exact_output(tmp_path):
    a, b = HF / "llama-a", HF / "llama-b"
    cli("fuse", a, b, "--rules", "infer", "--norm", "prop", "-o", tmp_path / "prop", "-q")
    assert (tmp_path / "prop" / "config.json").is_file()
    # norms over the concatenation are not the average of different sources: refused, output removed
    text = cli("fuse", a, b, "--rules", "infer", "-o", tmp_path / "rule", "-q", expect=2)
    assert "removed" in text and "--norm prop" in text
    assert not (tmp_path / "rule").exists()
    text = cli("self-fuse", HF / "gpt_neox-a", "--rules", "infer", "-o", tmp_path / "neox", "-q", expect=2)
    assert "cannot classify" in text and not (tmp_path / "neox").exists()


def test_two_different_sources_fuse_to_the_presets_bytes(tmp_path):
    a, b = HF / "qwen2-a", HF / "qwen2-b"
    rules = _infer(a, tmp_path)
    cli("fuse", a, b, "--rules", rules, "--norm", "prop", "-o", tmp_path / "inferred", "-q")
    cli("fuse", a, b, "--norm", "prop", "-o", tmp_path / "preset", "-q")
    inferred, preset = _tensors(tmp_path / "inferred"), _tensors(tmp_path / "preset")
    assert inferred.keys() == preset.keys() and all(inferred[k].equal(t) for k, t in preset.items())


def test_missing_transformers_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    text = cli("rules", "infer", HF / "llama-a", expect=2)
    assert "pip install 'deepfuse[verify]'" in text


def test_only_the_layer_index_is_generalised():
    from deepfuse_cli.rules.infer import template

    assert template("model.layers.3.mlp.experts.7.w1.weight") == "model.layers.{layer}.mlp.experts.7.w1.weight"
    assert template("lm_head.weight") == "lm_head.weight"
