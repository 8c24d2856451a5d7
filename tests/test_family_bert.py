"""BERT and RoBERTa (encoder-only, post-LayerNorm), one preset file each, with their masked-LM heads
(decoder tied to the word embeddings, and its bias tied to the head's bias: both untied in the fused
model) and their sequence-classification heads (pooler or classifier.dense block-diagonal, the
classifier's logits averaged); auto-detected from config.json, exact in transformers for self-fusion
and, with grouped norms, for different sources of any widths."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from deepfuse_cli.cli import app
from deepfuse_cli.grouped_norm import apply_grouped_norms
from deepfuse_cli.rules import load_preset
from deepfuse_cli.rules.engine import preset_for_config
from deepfuse_cli.rules.schema import OutputSpec, RuntimeSpec

from .conftest import FIXTURES
from .helpers import assert_fused_function, clean_refusal, cli

runner = CliRunner()
#: fixture -> its family; "-cls" fixtures carry the sequence-classification head (3 labels)
KINDS = {"bert": "bert", "bert-cls": "bert", "roberta": "roberta", "roberta-cls": "roberta"}
#: the masked-LM head's tensors a tied source leaves out, and what the untied fused model needs
MLM_HEAD = {"bert": ("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight",
                     "cls.predictions.bias", "cls.predictions.decoder.bias"),
            "roberta": ("roberta.embeddings.word_embeddings.weight", "lm_head.decoder.weight",
                        "lm_head.bias", "lm_head.decoder.bias")}


def encoder_probe(vocab: int = 64, batch: int = 3, seq: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids (no padding id), both token types, and right padding in two of the probes."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq - 3:] = 0
    mask[2, seq - 1:] = 0
    return {"input_ids": torch.randint(3, vocab, (batch, seq), generator=g),
            "token_type_ids": torch.randint(0, 2, (batch, seq), generator=g), "attention_mask": mask}


def load(path):
    """The checkpoint in the transformers class its config.json names; every key must match."""
    import transformers

    cfg = json.loads((path / "config.json").read_text())
    cls = getattr(transformers, cfg["architectures"][0])
    model, info = cls.from_pretrained(str(path), output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    assert not bad, f"{path}: {bad}"
    return model.eval()


def run(model, inputs=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with torch.no_grad():
        out = model(**(inputs or encoder_probe()), output_hidden_states=True)
    logits = out.logits if hasattr(out, "logits") else out.pooler_output
    return logits, list(out.hidden_states)


@functools.cache
def source_outputs(name: str):
    return run(load(FIXTURES / "hf" / name))


def verify_checks(path, seq_len: int = 6, want_seq_len: int | None = None) -> dict[str, str]:
    report = json.loads(cli("verify", path, "--json", "--probes", "2", "--seq-len", seq_len))
    assert report["passed"], report
    if want_seq_len is not None:
        assert report["meta"]["seq_len"] == want_seq_len
    return {c["name"]: c["status"] for c in report["checks"]}


# -- detection and coverage ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(KINDS))
def test_detected_from_config_and_every_tensor_claimed_once(kind, hf_fixtures):
    for side in "ab":
        config = json.loads((hf_fixtures / f"{kind}-{side}" / "config.json").read_text())
        assert preset_for_config(config, "test").name == KINDS[kind]
        out = cli("rules", "check", KINDS[kind], hf_fixtures / f"{kind}-{side}")
        assert "every tensor claimed by exactly one rule" in out


def _tiny(cls_name: str, path, seed: int = 0, **kw):
    import transformers

    torch.manual_seed(seed)
    prefix = cls_name.split("For")[0].removesuffix("Model")  # Bert, Roberta, XLMRoberta, Camembert
    config = getattr(transformers, f"{prefix}Config")(
        vocab_size=64, hidden_size=kw.pop("hidden_size", 16), num_attention_heads=kw.pop("heads", 4),
        intermediate_size=24, num_hidden_layers=2, num_labels=2 if "QuestionAnswering" in cls_name else 3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **{"max_position_embeddings": 34, **kw})
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():  # every parameter nonzero and distinct, norms away from 1 / 0
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape))
    model.save_pretrained(path)
    return model


OTHER_HEADS = ["BertModel", "BertForPreTraining", "BertForTokenClassification", "BertForQuestionAnswering",
               "RobertaModel", "RobertaForTokenClassification", "RobertaForQuestionAnswering",
               "XLMRobertaForMaskedLM", "CamembertForSequenceClassification"]


@pytest.mark.parametrize("cls_name", OTHER_HEADS)
def test_every_other_head_is_claimed_and_self_fuses(cls_name, tmp_path):
    """Bare encoders (pooler), next-sentence prediction, token classification, spans, and RoBERTa's
    relatives (XLM-RoBERTa, CamemBERT: the same tensors): the same two presets."""
    model = _tiny(cls_name, tmp_path / "src")
    family = "bert" if cls_name.startswith("Bert") else "roberta"
    assert preset_for_config(json.loads((tmp_path / "src" / "config.json").read_text()), "test").name == family
    assert "every tensor claimed by exactly one rule" in cli("rules", "check", family, tmp_path / "src")
    cli("self-fuse", tmp_path / "src", "-o", tmp_path / "x2", "-q")
    fused = load(tmp_path / "x2")
    inputs = encoder_probe()
    with torch.no_grad():
        a, b = model(**inputs, output_hidden_states=True), fused(**inputs, output_hidden_states=True)
    for h, g in zip(a.hidden_states, b.hidden_states, strict=True):
        torch.testing.assert_close(g, torch.cat([h, h], -1), rtol=0, atol=1e-5 * max(1.0, float(h.abs().max())))
    for key in ("logits", "start_logits", "end_logits", "prediction_logits", "seq_relationship_logits"):
        if key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5 * max(1.0, float(a[key].abs().max())))
    if "pooler_output" in a and a["pooler_output"] is not None:
        torch.testing.assert_close(b.pooler_output, torch.cat([a.pooler_output] * 2, -1), rtol=0, atol=1e-6)
    if cls_name == "BertModel":  # no head the function check runs: never a silent pass
        out = cli("verify", tmp_path / "x2", "--probes", "2", "--seq-len", "6", expect=1)
        assert "BertModel, which has no single logits output" in out and "--no-function" in out
        report = json.loads(cli("verify", tmp_path / "x2", "--json", "--no-function"))
        checks = {c["name"]: c["status"] for c in report["checks"]}
        assert report["passed"] and checks["tensors: decomposition"] == "pass", checks
    elif cls_name == "RobertaForTokenClassification":
        checks = verify_checks(tmp_path / "x2")
        assert checks["tensors: decomposition"] == "pass", checks
        assert checks["function: logits vs source"] == "pass", checks


# -- the tied masked-LM head ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_masked_lm_head_is_untied_with_its_decoder_bias(family, hf_fixtures, tmp_path):
    """transformers 5 saves a tied MLM head without its decoder weight and decoder bias; the fused model
    is untied (tie_word_embeddings false), so it gets both, and the head's own bias, averaged."""
    emb, decoder, bias, decoder_bias = MLM_HEAD[family]
    with safe_open(hf_fixtures / f"{family}-a" / "model.safetensors", "pt") as f:
        assert bias in f.keys() and decoder not in f.keys() and decoder_bias not in f.keys()
        src = {k: f.get_tensor(k) for k in (emb, bias)}
    with safe_open(hf_fixtures / f"{family}-b" / "model.safetensors", "pt") as f:
        src_b = {k: f.get_tensor(k) for k in (emb, bias)}
    out = tmp_path / "fused"
    cli("fuse", hf_fixtures / f"{family}-a", hf_fixtures / f"{family}-b", "--weights", "0.75,0.25", "-o", out, "-q")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    with safe_open(out / "model.safetensors", "pt") as f:
        torch.testing.assert_close(f.get_tensor(decoder), torch.cat([0.75 * src[emb], 0.25 * src_b[emb]], 1))
        for name in (bias, decoder_bias):
            torch.testing.assert_close(f.get_tensor(name), 0.75 * src[bias] + 0.25 * src_b[bias])
    load(out)  # no missing key: the untied decoder and its bias are in the files


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_a_source_that_saved_its_tied_head_fuses_the_same(family, hf_fixtures, tmp_path):
    """Older savers wrote the tied decoder weight and bias too: equal to what they are tied to, same output."""
    from safetensors.torch import load_file, save_file

    emb, decoder, bias, decoder_bias = MLM_HEAD[family]
    src = tmp_path / "old"
    src.mkdir()
    (src / "config.json").write_text((hf_fixtures / f"{family}-a" / "config.json").read_text())
    state = load_file(hf_fixtures / f"{family}-a" / "model.safetensors")
    save_file({**state, decoder: state[emb].clone(), decoder_bias: state[bias].clone()}, src / "model.safetensors",
              metadata={"format": "pt"})
    cli("self-fuse", src, "-o", tmp_path / "old-x2", "-q")
    cli("self-fuse", hf_fixtures / f"{family}-a", "-o", tmp_path / "new-x2", "-q")
    a, b = load_file(tmp_path / "old-x2" / "model.safetensors"), load_file(tmp_path / "new-x2" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- the function: self-fusion, n-way prop, n-way rule ---------------------------------------------------

@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("times", [2, 3])
def test_self_fusion_is_exact_and_verified(kind, times, hf_fixtures, tmp_path):
    out = tmp_path / "fused"
    cli("self-fuse", hf_fixtures / f"{kind}-a", "--times", times, "-o", out, "-q")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == KINDS[kind] and cfg["tie_word_embeddings"] is False
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["intermediate_size"]) == (16 * times, 4 * times, 24 * times)
    logits, hidden = run(load(out))
    assert_fused_function(logits, hidden, [source_outputs(f"{kind}-a")] * times, [1.0 / times] * times)
    if times == 2:  # probes as long as the model takes: BERT 32 positions, RoBERTa 34 starting after pad id 1
        checks = verify_checks(out, seq_len=40, want_seq_len=32)
        assert checks["function: logits vs source"] == "pass"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_different_sources_prop_mode_is_exact_with_grouped_norms(kind, hf_fixtures, tmp_path):
    out = tmp_path / "fused"
    srcs = [hf_fixtures / f"{kind}-a", hf_fixtures / f"{kind}-b", hf_fixtures / f"{kind}-a"]
    cli("fuse", *srcs, "--weights", "0.5,0.3,0.2", "--norm", "prop", "-o", out, "-q")
    model = load(out)
    assert json.loads((out / "config.json").read_text())["deepfuse_norm_groups"] == [16, 16, 16]
    assert apply_grouped_norms(model) > 0
    logits, hidden = run(model)
    outs = [source_outputs(f"{kind}-a"), source_outputs(f"{kind}-b"), source_outputs(f"{kind}-a")]
    assert_fused_function(logits, hidden, outs, [0.5, 0.3, 0.2])
    assert verify_checks(out)["function: logits vs weighted average of sources"] == "pass"
    head = json.loads((out / "config.json").read_text())["architectures"][0]
    assert f"{head}.from_pretrained(" in (out / "README.md").read_text()  # the model card loads its own head


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_different_sources_rule_mode_is_an_expected_deviation(kind, hf_fixtures, tmp_path):
    out = tmp_path / "fused"
    cli("fuse", hf_fixtures / f"{kind}-a", hf_fixtures / f"{kind}-b", "-o", out, "-q")
    checks = verify_checks(out)  # loads in the stock runtime, then with grouped norms
    assert checks["function: logits vs weighted average of sources"] == "expected", checks
    assert checks["function: same weights with grouped norms"] == "pass", checks


def test_different_widths_fuse_exactly_with_grouped_norms(hf_fixtures, tmp_path):
    """Width 16 (4 heads) with width 24 (6 heads): head size 4 in both, so heads concatenate."""
    _tiny("BertForMaskedLM", tmp_path / "wide", seed=3, hidden_size=24, heads=6, max_position_embeddings=32)
    cfg = json.loads((tmp_path / "wide" / "config.json").read_text())
    base = json.loads((hf_fixtures / "bert-a" / "config.json").read_text())
    cfg.update({k: base[k] for k in ("max_position_embeddings", "layer_norm_eps", "hidden_act", "pad_token_id")})
    (tmp_path / "wide" / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "fused"
    cli("fuse", hf_fixtures / "bert-a", tmp_path / "wide", "--norm", "prop", "-o", out, "-q")
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["deepfuse_norm_groups"]) == (40, 10, [16, 24])
    model = load(out)
    apply_grouped_norms(model)
    logits, hidden = run(model)
    assert_fused_function(logits, hidden, [source_outputs("bert-a"), run(load(tmp_path / "wide"))], [0.5, 0.5])


def test_a_different_head_size_is_refused_naming_it(hf_fixtures, tmp_path):
    """BERT has no head_dim field: hidden_size / num_attention_heads must be equal (16/4 vs 24/4)."""
    _tiny("BertForMaskedLM", tmp_path / "odd", hidden_size=24, heads=4, max_position_embeddings=32)
    result = runner.invoke(app, ["fuse", str(hf_fixtures / "bert-a"), str(tmp_path / "odd"), "-o", str(tmp_path / "o")])
    clean_refusal(result, ["head_dim", "4", "6"])
    assert not (tmp_path / "o").exists()


def test_masked_lm_and_classification_heads_do_not_mix(hf_fixtures, tmp_path):
    result = runner.invoke(app, ["fuse", str(hf_fixtures / "bert-a"), str(hf_fixtures / "bert-cls-a"),
                                 "-o", str(tmp_path / "o")])
    clean_refusal(result, ["source 2"])
    assert not (tmp_path / "o").exists()


# -- the schema additions ----------------------------------------------------------------------------------

def test_added_fields_are_recorded_only_when_set():
    """Presets that do not use the new output/runtime fields dump (and digest) as before."""
    llama = load_preset("llama").model_dump(mode="json")
    assert set(llama["output"]) == {"name", "tied_to", "scale", "transpose"}
    assert set(llama["runtime"]) == {"model_class", "inputs"}
    bert = load_preset("bert")
    assert OutputSpec.model_validate(bert.output.model_dump(mode="json")) == bert.output
    assert RuntimeSpec.model_validate(bert.runtime.model_dump(mode="json")) == bert.runtime


def test_the_runtime_class_is_the_head_config_names():
    rt = load_preset("bert").runtime
    assert rt.class_for({"architectures": ["BertForSequenceClassification"]}) == "BertForSequenceClassification"
    assert rt.class_for({}) == rt.model_class and rt.unsupported_head({}) is None
    assert rt.class_for({"architectures": ["os.system"]}) == rt.model_class  # only the family's listed heads
    assert rt.unsupported_head({"architectures": ["BertModel"]}) == "BertModel"
