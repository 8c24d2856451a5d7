"""Gemma, Gemma 2 and Gemma 3 text (issue 12): presets auto-detected from config.json.

What is particular to these families and held here:

* the runtime multiplies the embedding by sqrt(hidden_size), which grows with the width: source m's
  block of the fused embedding is stored times sqrt(d_m / D) (the rule's ``runtime_scale``), so the
  fused model's sqrt(D) gives each slice back as sqrt(d_m) x E_m; the tied output is untied and built
  from the *unscaled* embeddings;
* norms compute (1 + w) x RMSNorm(x): concatenating w keeps (1 + w_m) on each slice, and the grouped
  norm of ``apply_grouped_norms`` applies the same offset, so ``--norm prop`` is exact;
* Gemma 2's final logit softcapping caps the *averaged* logits: different sources are an expected
  deviation that ``verify`` reports (``--strict`` fails it), and the fused logits are exactly the
  capped average of the sources' uncapped logits;
* Gemma 3's per-head q_norm/k_norm: different sources are refused (as Qwen3's);
* a fused config the runtime would not load (hidden_size not a multiple of the heads) is refused.

The second fixture of each family is wider (hidden 24) than the first (16), so the embedding factors
differ between the sources.
"""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from deepfuse_cli.architectures import family_of
from deepfuse_cli.cli import app
from deepfuse_cli.grouped_norm import GroupedNorm, apply_grouped_norms
from deepfuse_cli.ops import FuseContext
from deepfuse_cli.ops import get as get_op
from deepfuse_cli.rules import load_preset
from deepfuse_cli.rules.engine import preset_for_config
from deepfuse_cli.rules.schema import Rule
from deepfuse_cli.verify.decompose import Layout, decompose

from .conftest import FIXTURES
from .helpers import assert_fused_function, clean_refusal, cli, load, probe, run
from .test_verify_independent import tensor_checks

FAMILIES = ["gemma", "gemma2", "gemma3_text"]
EMBED = "model.embed_tokens.weight"
AVERAGE = "function: logits vs weighted average of sources"
runner = CliRunner()


@functools.cache
def source_outputs(name: str):
    """A fixture model's logits and hidden states on the probe (each source run once)."""
    return run(load(FIXTURES / "hf" / name), probe())


def verify_report(path, *extra: str, expect: int = 0) -> dict:
    text = cli("verify", path, "--json", "--probes", "2", "--seq-len", "6", *extra, expect=expect)
    return json.JSONDecoder().raw_decode(text[text.index("{"):])[0]  # stderr lines may follow


def checks_of(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def tensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("family", FAMILIES)
def test_detected_from_config_and_every_tensor_claimed_once(family, hf_fixtures):
    for side in "ab":
        config = json.loads((hf_fixtures / f"{family}-{side}" / "config.json").read_text())
        assert config["model_type"] == family and config["tie_word_embeddings"] is True
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
    assert cfg["head_dim"] == 4 and cfg.get("query_pre_attn_scalar") == (None if family == "gemma" else 8)
    fused, src = tensors(out), tensors(hf_fixtures / f"{family}-a")
    assert "lm_head.weight" in fused and "lm_head.weight" not in src  # untied, from the unscaled embedding
    torch.testing.assert_close(fused["lm_head.weight"], torch.cat([src[EMBED] / times] * times, dim=1),
                               rtol=3e-7, atol=0)  # x / K vs x * (1 / K): one ulp
    logits, hidden = run(load(out), probe())
    assert_fused_function(logits, hidden, [source_outputs(f"{family}-a")] * times, [1.0 / times] * times)
    if times == 2:
        assert checks_of(verify_report(out))["function: logits vs source"]["status"] == "pass"


def test_fused_embedding_times_the_fused_scale_is_each_sources_scaled_embedding(hf_fixtures, tmp_path):
    """E_fused = concat_m(E_m x sqrt(d_m) / sqrt(D)): the runtime's sqrt(D) gives sqrt(d_m) x E_m per slice."""
    out = tmp_path / "fused"
    plan = json.loads(cli("fuse", hf_fixtures / "gemma-a", hf_fixtures / "gemma-b", "-o", out, "-q", "--json"))
    fused = tensors(out)[EMBED].double()
    a, b = tensors(hf_fixtures / "gemma-a")[EMBED].double(), tensors(hf_fixtures / "gemma-b")[EMBED].double()
    assert fused.shape == (64, 40)
    torch.testing.assert_close(fused * math.sqrt(40), torch.cat([a * 4, b * math.sqrt(24)], dim=1), rtol=1e-6, atol=0)
    model = load(out)
    ids = torch.arange(64)[None]
    torch.testing.assert_close(model.model.embed_tokens(ids)[0].double(), torch.cat([a * 4, b * math.sqrt(24)], 1),
                               rtol=1e-6, atol=1e-6)
    assert any("hidden_size ** 0.5" in note and "0.632456, 0.774597" in note for note in plan["notes"]), plan["notes"]


@pytest.mark.parametrize("family", ["gemma", "gemma2"])
def test_different_widths_prop_mode_keeps_the_fusion_property_in_every_layer(family, hf_fixtures, tmp_path):
    """(1 + w) grouped norms and the rescaled embedding: every hidden state is the concatenation of the
    sources' (16 + 24 wide); Gemma's logits are their average."""
    out = tmp_path / "fused"
    cli("fuse", hf_fixtures / f"{family}-a", hf_fixtures / f"{family}-b", "-o", out, "--norm", "prop", "-q")
    model = load(out)
    assert json.loads((out / "config.json").read_text())["deepfuse_norm_groups"] == [16, 24]
    assert apply_grouped_norms(model) == (5 if family == "gemma" else 9)
    logits, hidden = run(model, probe())
    srcs = [source_outputs(f"{family}-a"), source_outputs(f"{family}-b")]
    if family == "gemma":
        assert_fused_function(logits, hidden, srcs, [0.5, 0.5])
        assert checks_of(verify_report(out))[AVERAGE]["status"] == "pass"
        return
    # Gemma 2: the fusion property holds in every layer; the runtime caps the averaged logits
    assert_fused_function(logits, hidden, srcs, [0.5, 0.5], rel=float("inf"))
    c = json.loads((out / "config.json").read_text())["final_logit_softcapping"]
    uncapped = [run(load_uncapped(hf_fixtures / f"{family}-{s}"), probe())[0] for s in "ab"]
    capped_average = c * torch.tanh((uncapped[0] + uncapped[1]) / 2 / c)
    torch.testing.assert_close(logits, capped_average, rtol=0, atol=1e-5 * c)
    average = (srcs[0][0] + srcs[1][0]) / 2
    assert float((logits - average).abs().max()) > 1e-2 * c  # the cap does not commute with the average


def load_uncapped(path):
    """A source with its final logit softcapping switched off (its pre-cap logits)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    config.final_logit_softcapping = None
    return AutoModelForCausalLM.from_pretrained(path, config=config).eval()


def test_gemma2_different_sources_are_an_expected_deviation_that_strict_fails(hf_fixtures, tmp_path):
    out = tmp_path / "fused"
    plan = json.loads(cli("plan", hf_fixtures / "gemma2-a", hf_fixtures / "gemma2-b", "--norm", "prop", "--json"))
    assert any(n.startswith("final_logit_softcapping:") for n in plan["notes"]), plan["notes"]
    cli("fuse", hf_fixtures / "gemma2-a", hf_fixtures / "gemma2-b", "-o", out, "--norm", "prop", "-q")
    report = verify_report(out)
    check = checks_of(report)[AVERAGE]
    assert report["passed"] and check["status"] == "expected", check
    assert "final_logit_softcapping" in check["message"] and "norm mode" not in check["message"]
    strict = verify_report(out, "--strict", expect=1)
    assert checks_of(strict)[AVERAGE]["status"] == "fail"
    self_plan = json.loads(cli("plan", hf_fixtures / "gemma2-a", "--times", "2", "--json"))
    assert not any("softcapping" in n for n in self_plan["notes"])  # equal sources: exact


@pytest.mark.parametrize("family", ["gemma", "gemma2"])
def test_different_sources_rule_mode_is_an_expected_deviation(family, hf_fixtures, tmp_path):
    out = tmp_path / "fused"
    cli("fuse", hf_fixtures / f"{family}-a", hf_fixtures / f"{family}-b", "-o", out, "-q")
    checks = checks_of(verify_report(out))
    assert checks[AVERAGE]["status"] == "expected", checks
    assert "norm mode 'rule'" in checks[AVERAGE]["message"]
    if family == "gemma":  # the deviation is due to the norms alone
        assert checks["function: same weights with grouped norms"]["status"] == "pass", checks
    else:
        assert "final_logit_softcapping" in checks[AVERAGE]["message"]


@pytest.mark.parametrize("norm", ["rule", "prop"])
def test_gemma3_different_sources_are_refused_at_the_shared_head_norm(norm, hf_fixtures, tmp_path):
    out = tmp_path / "fused"
    result = runner.invoke(app, ["fuse", str(hf_fixtures / "gemma3_text-a"), str(hf_fixtures / "gemma3_text-b"),
                                 "-o", str(out), "--norm", norm])
    error = clean_refusal(result, ["model.layers.0.self_attn.", "_norm.weight", "must be identical"])
    assert "source 2" in error
    assert not out.exists()


def test_gemma3_sources_sharing_their_head_norms_fuse_exactly_with_grouped_norms(hf_fixtures, tmp_path):
    """Only the shared per-head norm stops Gemma 3: a wider source given the first one's q_norm/k_norm
    (as a fine-tune that froze them) fuses, and --norm prop is exact."""
    import shutil

    from safetensors.torch import save_file

    b = tmp_path / "b"
    shutil.copytree(hf_fixtures / "gemma3_text-b", b)
    state, first = tensors(b), tensors(hf_fixtures / "gemma3_text-a")
    state.update({k: first[k] for k in state if k.endswith(("q_norm.weight", "k_norm.weight"))})
    save_file(state, str(b / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "fused"
    cli("fuse", hf_fixtures / "gemma3_text-a", b, "-o", out, "--norm", "prop", "-q")
    model = load(out)
    assert apply_grouped_norms(model) == 9  # 4 per layer and the final norm; q_norm/k_norm stay per head
    logits, hidden = run(model, probe())
    assert_fused_function(logits, hidden, [source_outputs("gemma3_text-a"), run(load(b), probe())], [0.5, 0.5])


def test_rules_of_another_family_are_refused_on_gemma(hf_fixtures, tmp_path):
    result = runner.invoke(app, ["self-fuse", str(hf_fixtures / "gemma-a"), "--rules", "llama", "-o", str(tmp_path / "o")])
    clean_refusal(result, ["'gemma'", "'llama'", "gemma-a"])
    result = runner.invoke(app, ["self-fuse", str(hf_fixtures / "gemma2-a"), "--rules", "gemma", "-o", str(tmp_path / "o")])
    clean_refusal(result, ["'gemma2'", "'gemma'"])
    assert not (tmp_path / "o").exists()


def test_a_fused_config_the_runtime_would_refuse_is_refused_before_writing(tmp_path):
    """Gemma 2 requires hidden_size % num_attention_heads == 0: 16/4 + 18/2 sums to 34/6."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    for name, hidden, heads in (("s1", 16, 4), ("s2", 18, 2)):
        Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=hidden, num_attention_heads=heads,
                                       num_key_value_heads=heads // 2, head_dim=4, intermediate_size=24,
                                       num_hidden_layers=1, max_position_embeddings=32)).save_pretrained(tmp_path / name)
    result = runner.invoke(app, ["fuse", str(tmp_path / "s1"), str(tmp_path / "s2"), "-o", str(tmp_path / "out")])
    clean_refusal(result, ["hidden_size % num_attention_heads == 0", "hidden_size = 34", "num_attention_heads = 6"])
    assert not (tmp_path / "out").exists()


def test_bare_weights_without_a_config_are_refused_for_the_embedding_factor(hf_fixtures, tmp_path):
    """The factor sqrt(d_m / D) needs the widths from config.json: bare weight files are refused, not
    fused with a plain concatenation."""
    import shutil

    bare = tmp_path / "gemma.safetensors"
    shutil.copy(hf_fixtures / "gemma-a" / "model.safetensors", bare)
    result = runner.invoke(app, ["self-fuse", str(bare), "--rules", "gemma", "-o", str(tmp_path / "out")])
    clean_refusal(result, [f"tensor {EMBED!r}", "hidden_size ** 0.5", "config.json"])
    assert not (tmp_path / "out").exists()


def test_tensor_level_verify_catches_a_concat_that_drops_the_runtime_scale(hf_fixtures, tmp_path, monkeypatch):
    """The embedding's blocks are checked against sqrt(d_m / D) x E_m, from the rule: a concat op that
    ignores the factors writes a plain concatenation, and verify names the block."""
    from dataclasses import replace

    from deepfuse_cli import ops

    concat = type(ops.get("concat"))
    rows = concat.rows
    monkeypatch.setattr(concat, "rows", lambda self, t, rule, ctx: rows(self, t, rule, replace(ctx, scales=None)))
    out = tmp_path / "fused"
    cli("fuse", hf_fixtures / "gemma-a", hf_fixtures / "gemma-b", "-o", out, "--norm", "prop", "-q")
    check = tensor_checks(out)["tensors: decomposition"]
    assert check.status == "fail" and check.figures["tensor"] == EMBED, check.message
    assert "slice of source 1 times 0.632456" in check.message, check.message


# -- units: the preset data, the op with scales, its decomposition, the grouped (1 + w) norm -----------

def test_runtime_scale_is_only_for_ops_that_take_scales():
    with pytest.raises(ValueError, match="runtime_scale is only meaningful for concat"):
        Rule(pattern="w", op="block_diagonal", axes=["hidden", "hidden"], input_axis=1, runtime_scale="hidden_size")
    with pytest.raises(ValueError, match="not allowed"):
        Rule(pattern="w", op="concat", axes=["vocab", "hidden"], runtime_scale="len(x)")


def test_family_factors_and_deviations_from_the_config():
    fam = family_of(load_preset("gemma2"))
    rule = next(r for r in fam.preset.rules if r.runtime_scale)
    configs = [{"hidden_size": 16}, {"hidden_size": 24}]
    scales = fam.runtime_scales(rule, configs, {"hidden_size": 40}, EMBED)
    assert scales == pytest.approx([math.sqrt(16 / 40), math.sqrt(24 / 40)])
    assert fam.deviations([{"final_logit_softcapping": 30.0}, {"final_logit_softcapping": 30.0}])
    assert fam.deviations([{"final_logit_softcapping": None}, {}]) == []
    assert family_of(load_preset("gemma")).deviations([{"final_logit_softcapping": 30.0}]) == []


@settings(max_examples=30, deadline=None)
@given(widths=st.lists(st.integers(1, 9), min_size=1, max_size=4), vocab=st.integers(1, 7),
       seed=st.integers(0, 2**16))
def test_concat_with_scales_matches_its_decomposition(widths, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    srcs = [torch.randn(vocab, w, generator=g) for w in widths]
    scales = [math.sqrt(w / sum(widths)) for w in widths]
    rule = Rule(pattern="e", op="concat", axes=["vocab", "hidden"], runtime_scale="hidden_size ** 0.5")
    fused = torch.cat(list(get_op("concat").rows(srcs, rule, FuseContext(dtype=torch.float32, scales=scales))), 0)
    torch.testing.assert_close(fused, torch.cat([s * f for s, f in zip(srcs, scales)], 1))
    blocks = decompose(Layout(name="e", rule=rule, source_shapes=[s.shape for s in srcs], weights=[], scales=scales))
    assert [b.kind for b in blocks] == ["slice"] * len(widths)
    for b, s, f in zip(blocks, srcs, scales):
        (term,) = b.terms
        assert term.coef == pytest.approx(f) and term.source == blocks.index(b)
        torch.testing.assert_close(fused[b.where], s * f)


@settings(max_examples=25, deadline=None)
@given(groups=st.lists(st.integers(1, 8), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_grouped_one_plus_w_norm_is_each_sources_gemma_norm(groups, seed):
    """GroupedNorm(offset 1) over concat(w_m) == concat of each source's Gemma RMSNorm on its slice."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    g = torch.Generator().manual_seed(seed)
    norms = []
    for d in groups:
        n = GemmaRMSNorm(d, eps=1e-6)
        n.weight.data = 0.3 * torch.randn(d, generator=g)
        norms.append(n)
    fused = GemmaRMSNorm(sum(groups), eps=1e-6)
    fused.weight.data = torch.cat([n.weight.data for n in norms])
    grouped = GroupedNorm(fused, groups, "rms", 1e-6, offset=1.0)
    xs = [3 * torch.randn(2, 3, d, generator=g) for d in groups]
    with torch.no_grad():
        torch.testing.assert_close(grouped(torch.cat(xs, -1)), torch.cat([n(x) for n, x in zip(norms, xs)], -1))
        if len(set(groups)) == 1:  # K equal copies: the plain norm over the concatenation is exact too
            copies = torch.cat([xs[0]] * len(groups), -1)
            fused.weight.data = torch.cat([norms[0].weight.data] * len(groups))
            torch.testing.assert_close(fused(copies), torch.cat([norms[0](xs[0])] * len(groups), -1))
