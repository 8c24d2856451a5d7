"""The model card (README.md) of every Hugging Face output, read back with huggingface_hub's ModelCard."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from tests.conftest import FIXTURES, HF
from tests.hub_cache import A, B, add_repo, hub_cache, invoke  # noqa: F401  (fixture)


@pytest.fixture
def repos(hub_cache):  # noqa: F811
    add_repo(hub_cache, "org/llama-a", HF / "llama-a", A)
    add_repo(hub_cache, "org/llama-b", HF / "llama-b-sharded", B, refs=("main", "v2"))
    return hub_cache


def card(out: Path) -> ModelCard:
    return ModelCard.load(out / "README.md")


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def test_self_fuse_of_a_hub_model(repos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    invoke("self-fuse", "org/llama-a", "--times", "2", "-o", "big/", "--noise-scale", "0.01", "--noise-mode",
           "preserving", "--seed", "3", "-q")
    c = card(tmp_path / "big")
    assert c.data.base_model == "org/llama-a"
    assert c.data.library_name == "transformers" and c.data.tags == ["deepfuse", "deep-fusion"]
    assert c.data.to_dict().get("base_model_relation") is None
    assert code_blocks(c.text, "bash") == [
        "deepfuse self-fuse org/llama-a --times 2 --noise-scale 0.01 --noise-mode preserving --seed 3 -o OUTPUT\n"]
    assert c.text.startswith("\n# org/llama-a x2: self Deep Fusion\n")
    assert "[org/llama-a](https://huggingface.co/org/llama-a) | main (aaaaaaaaaaaa) | 2 copies, 0.5 each" in c.text
    assert "scale 0.01 of the blocks' RMS, mode `preserving`, seed 3" in c.text
    assert "exactly the source's" in c.text and "apply_grouped_norms" not in c.text
    assert "## Verification" not in c.text
    assert 'AutoModelForCausalLM.from_pretrained("path/to/model")' in c.text


def test_fuse_with_norm_prop_the_loading_lines_work(repos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    invoke("fuse", "org/llama-a", "org/llama-b@v2", "-o", "fused", "--norm", "prop", "--weights", "0.25,0.75", "-q")
    c = card(tmp_path / "fused")
    assert c.data.base_model == ["org/llama-a", "org/llama-b"]
    assert c.data.to_dict()["base_model_relation"] == "merge"
    assert "weights: 0.25, 0.75" in c.text and "`--norm prop`, grouped per source (groups [16, 16])" in c.text
    assert "| 2 | [org/llama-b](https://huggingface.co/org/llama-b) | v2 (bbbbbbbbbbbb) | 0.75 |" in c.text
    [load] = code_blocks(c.text, "python")
    assert "from deepfuse_cli.grouped_norm import apply_grouped_norms" in load and "apply_grouped_norms(model)" in load
    scope: dict = {}
    exec(load.replace("path/to/model", "fused"), scope)  # the card's lines load it and make its norms grouped
    model = scope["model"]
    assert sum(type(m).__name__ == "GroupedNorm" for m in model.modules()) == 2 * 2 + 1  # 2 layers x 2, final
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_verify_figures_are_in_the_card_and_the_manifest_still_holds(repos, tmp_path):
    out = tmp_path / "fused"
    invoke("fuse", "org/llama-a", "org/llama-b", "-o", out, "--norm", "prop", "--verify", "-q")
    c = card(out)
    report = json.loads((out / "verify-report.json").read_text())
    assert "## Verification" in c.text and "`deepfuse verify`: **PASS**" in c.text
    for check in report["checks"]:
        assert f"| {check['name']} | {check['status']} |" in c.text
    assert "--verify" in code_blocks(c.text, "bash")[0]
    assert "README.md" not in json.loads((out / "deepfuse.json").read_text())["files"]  # a card is edited: not pinned
    invoke("verify", out, "--integrity-only")


def test_local_sources_are_named_not_listed_as_base_models(tmp_path):
    out = tmp_path / "ab"
    invoke("fuse", HF / "llama-a", HF / "llama-b", "-o", out, "-q")
    c = card(out)
    assert c.data.base_model is None and c.data.tags == ["deepfuse", "deep-fusion"]
    assert "| 1 | `llama-a` (local) | - | 0.5 |" in c.text
    assert "approximately the weighted average" in c.text and "`--norm rule`" in c.text
    assert code_blocks(c.text, "bash")[0] == f"deepfuse fuse {HF / 'llama-a'} {HF / 'llama-b'} -o OUTPUT\n"


def test_the_same_command_writes_the_same_card_wherever_it_writes(tmp_path):
    texts = []
    for where in ("one", "two/deeper"):
        out = tmp_path / where
        invoke("fuse", HF / "llama-a", HF / "llama-b", "-o", out, "--noise-std", "0.01", "--seed", "7", "-q")
        texts.append((out / "README.md").read_text())
    assert texts[0] == texts[1] and "# Deep Fusion of llama-a and llama-b" in texts[0]
    assert str(tmp_path) not in texts[0]


def test_a_source_card_is_not_copied(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in (HF / "llama-a").iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    (src / "README.md").write_text("---\nlicense: mit\n---\n# the source's own card\n")
    invoke("self-fuse", src, "--times", "2", "-o", tmp_path / "out", "-q")
    text = (tmp_path / "out" / "README.md").read_text()
    assert "the source's own card" not in text and "deep-fusion" in text


def test_conversion_to_hugging_face_gets_a_card_and_t5x_outputs_none(tmp_path):
    invoke("convert", FIXTURES / "t5x" / "legacy-a", "--to", "safetensors", "-o", tmp_path / "hf", "-q")
    c = card(tmp_path / "hf")
    assert c.data.library_name == "transformers" and "deepfuse" in c.data.tags
    assert "A conversion of one t5 checkpoint" in c.text
    assert 'T5ForConditionalGeneration.from_pretrained("path/to/model")' in c.text and "weights:" not in c.text
    assert "# legacy-a, converted to Hugging Face" in c.text
    invoke("self-fuse", FIXTURES / "t5x" / "legacy-a", "--times", "2", "-o", tmp_path / "t5x", "-q")
    assert not (tmp_path / "t5x" / "README.md").exists()
