"""deepfuse verify: passes on every family's fused fixtures and fails (exit 1, naming the tensor or
layer) on deliberately broken checkpoints."""

from __future__ import annotations

import hashlib
import json
import shutil
import xml.etree.ElementTree as ET

import pytest
import torch
from safetensors.torch import load_file, save_file

from .helpers import cli


def edit(out, name, fn, keep_manifest_digest=False):
    """Change one tensor of a fused output; by default also re-record its digest so that the
    tensor-level check (not the integrity check) is what must catch it."""
    path = out / "model.safetensors"
    state = load_file(path)
    state[name] = fn(state[name].clone())
    save_file(state, path, metadata={"format": "pt"})
    if not keep_manifest_digest:
        m = json.loads((out / "deepfuse.json").read_text())
        m["files"]["model.safetensors"] = hashlib.sha256(path.read_bytes()).hexdigest()
        (out / "deepfuse.json").write_text(json.dumps(m))


def verify_json(out, *extra, expect=0) -> dict:
    text = cli("verify", out, *extra, "--json", expect=expect)
    data, _ = json.JSONDecoder().raw_decode(text[text.index("{"):])
    return data


def messages(data) -> str:
    return "\n".join(f"{c['name']}: {c['status']}: {c['message']}" for c in data["checks"])


def fails(out, *contains, extra=()):
    text = cli("verify", out, *extra, expect=1)
    assert "Traceback" not in text
    for c in contains:
        assert c in text, f"{c!r} not in:\n{text}"
    return text


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "t5v11", "t5v10", "llama-tied", "mistral"])
def test_verify_passes_on_fused_fixtures(family, hf_fixtures, tmp_path):
    cli("self-fuse", hf_fixtures / f"{family}-a", "-o", tmp_path / "sf", "-q")
    assert verify_json(tmp_path / "sf", "--probes", "2")["passed"]
    cli("fuse", hf_fixtures / f"{family}-a", hf_fixtures / f"{family}-b", "--norm", "prop", "-o", tmp_path / "ab", "-q")
    data = verify_json(tmp_path / "ab", "--probes", "2", "--strict")
    assert data["passed"] and "fusion property holds in every layer" in messages(data)
    assert [(c["name"], c["status"]) for c in data["checks"]] == [
        ("integrity", "pass"), ("tensors: names", "pass"), ("tensors: shapes", "pass"),
        ("tensors: decomposition", "pass"), ("config", "pass"),
        ("function: logits vs weighted average of sources", "pass")]


def test_verify_noise_modes(hf_fixtures, tmp_path):
    cli("self-fuse", hf_fixtures / "llama-a", "-o", tmp_path / "p", "--noise-scale", "0.05", "--noise-mode", "preserving", "-q")
    assert "PASS" in cli("verify", tmp_path / "p", "--strict", "--tol", "5e-5")
    cli("self-fuse", hf_fixtures / "llama-a", "-o", tmp_path / "o", "--noise-std", "0.01", "-q")
    data = verify_json(tmp_path / "o")
    assert data["passed"] and "expected: deviation expected from off-diagonal noise" in messages(data)
    cli("verify", tmp_path / "o", "--strict", expect=1)


def test_verify_mlp_and_weighted(hf_fixtures, tmp_path):
    cli("fuse", hf_fixtures / "mlp-a", hf_fixtures / "mlp-wide", "--weights", "0.3,0.7", "-o", tmp_path / "m", "-q")
    data = verify_json(tmp_path / "m", "--strict")
    assert data["passed"] and "logits vs weighted average of sources: pass" in messages(data)


def test_rule_mode_passes_with_deviation_reported_and_fails_strict(hf_fixtures, tmp_path):
    out = tmp_path / "ab"
    cli("fuse", hf_fixtures / "gpt2-a", hf_fixtures / "gpt2-b", "-o", out, "-q")
    report = tmp_path / "r.json"
    text = cli("verify", out, "--report", report, "--markdown", tmp_path / "r.md", "--junit", tmp_path / "j.xml")
    assert "PASS" in text and "expected" in text
    assert "due to the norms alone" in messages(json.loads(report.read_text()))
    data = json.loads(report.read_text())
    assert data["passed"] is True and data["meta"]["probe_seed"] == 0 and data["meta"]["torch"]
    fn = next(c for c in data["checks"] if c["name"].startswith("function: logits"))
    assert fn["status"] == "expected" and fn["figures"]["relative_max_error"] > 1e-4
    assert set(fn["figures"]) >= {"max_abs_error", "relative_l2", "kl_divergence", "top1_agreement"}
    md = (tmp_path / "r.md").read_text()
    assert "Per-layer deviation" in md and "![per-layer deviation](r.png)" in md
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    suite = ET.parse(tmp_path / "j.xml").getroot()
    assert suite.get("tests") == str(len(data["checks"])) and suite.get("failures") == "0"
    fails(out, "--strict demands exactness", extra=("--strict", "--junit", tmp_path / "j2.xml"))
    assert ET.parse(tmp_path / "j2.xml").getroot().get("failures") == "1"


@pytest.fixture
def llama_sf(hf_fixtures, tmp_path):
    out = tmp_path / "sf"
    cli("self-fuse", hf_fixtures / "llama-a", "-o", out, "-q")
    return out


def test_perturbed_diagonal_block(llama_sf):
    name = "model.layers.1.mlp.up_proj.weight"
    edit(llama_sf, name, lambda t: t.index_put_((torch.tensor([30]), torch.tensor([20])), torch.tensor(9.0)))
    fails(llama_sf, name, "diagonal block 2 (source 2)")


def test_missing_output_scale(llama_sf):
    edit(llama_sf, "lm_head.weight", lambda t: t * 2)
    fails(llama_sf, "lm_head.weight", "scaled by 1, expected 0.5")


def test_swapped_heads_inside_one_source(llama_sf):
    def swap(t):  # heads 0 and 1 of source 1 (head_dim 4) exchanged in q_proj's rows
        t[[0, 1, 2, 3, 4, 5, 6, 7]] = t[[4, 5, 6, 7, 0, 1, 2, 3]]
        return t

    edit(llama_sf, "model.layers.0.self_attn.q_proj.weight", swap)
    fails(llama_sf, "model.layers.0.self_attn.q_proj.weight", "diagonal block 1 (source 1)")


def test_swapped_heads_function_level_names_the_layer(hf_fixtures, tmp_path):
    out = tmp_path / "sf"
    cli("self-fuse", hf_fixtures / "llama-a", "-o", out, "-q")

    def swap(t):
        t[[0, 1, 2, 3, 4, 5, 6, 7]] = t[[4, 5, 6, 7, 0, 1, 2, 3]]
        return t

    edit(out, "model.layers.0.self_attn.q_proj.weight", swap)
    text = fails(out, "model.layers.0.self_attn.q_proj.weight", extra=("--report", tmp_path / "r.json"))
    assert "diagonal block 1" in text
    report = json.loads((tmp_path / "r.json").read_text())
    fn = next(c for c in report["checks"] if c["name"].startswith("function: logits"))
    assert fn["status"] == "fail" and "first breaks at hidden state 1" in fn["message"]
    assert fn["figures"]["first_broken_layer"] == 1
    assert report["layers"][0]["max_abs"] < 1e-6 < report["layers"][1]["max_abs"]


def test_kv_heads_interleaved_across_sources(hf_fixtures, tmp_path):
    out = tmp_path / "ab"
    cli("fuse", hf_fixtures / "llama-a", hf_fixtures / "llama-b", "--norm", "prop", "-o", out, "-q")
    # 2 KV heads per source, head_dim 4: [a0 a1 b0 b1] -> [a0 b0 a1 b1]
    order = [*range(0, 4), *range(8, 12), *range(4, 8), *range(12, 16)]
    edit(out, "model.layers.0.self_attn.k_proj.weight", lambda t: t[order])
    fails(out, "model.layers.0.self_attn.k_proj.weight", "block")


def test_t5_v10_untied_without_rescale(hf_fixtures, tmp_path):
    out = tmp_path / "t5"
    cli("fuse", hf_fixtures / "t5v10-a", hf_fixtures / "t5v10-b", "--norm", "prop", "-o", out, "-q")
    edit(out, "lm_head.weight", lambda t: t * 16 ** 0.5)  # what a naive untie (no d_model**-0.5) gives
    fails(out, "lm_head.weight", "scaled by 0.5, expected 0.125")


def test_gpt2_c_attn_without_qkv_split(hf_fixtures, tmp_path):
    out = tmp_path / "g"
    cli("fuse", hf_fixtures / "gpt2-a", hf_fixtures / "gpt2-b", "--norm", "prop", "-o", out, "-q")
    from safetensors import safe_open

    with safe_open(str(hf_fixtures / "gpt2-a" / "model.safetensors"), "pt") as f:
        a = f.get_tensor("transformer.h.0.attn.c_attn.weight")
    with safe_open(str(hf_fixtures / "gpt2-b" / "model.safetensors"), "pt") as f:
        b = f.get_tensor("transformer.h.0.attn.c_attn.weight")
    edit(out, "transformer.h.0.attn.c_attn.weight", lambda t: torch.block_diag(a, b))
    fails(out, "transformer.h.0.attn.c_attn.weight", "part")


def test_shard_edited_after_manifest(llama_sf):
    edit(llama_sf, "model.norm.weight", lambda t: t + 1, keep_manifest_digest=True)
    fails(llama_sf, "integrity", "model.safetensors was modified after the manifest was written",
          extra=("--integrity-only",))
    fails(llama_sf, "modified after the manifest")


def test_integrity_only_passes_without_sources(llama_sf, tmp_path):
    assert "PASS" in cli("verify", llama_sf, "--integrity-only")


def test_verify_without_manifest_needs_sources(hf_fixtures, llama_sf):
    (llama_sf / "deepfuse.json").unlink()
    out = cli("verify", llama_sf, expect=2)
    assert "--sources" in out
    assert "PASS" in cli("verify", llama_sf, "--sources", hf_fixtures / "llama-a", "--times", "2")
    cli("verify", llama_sf, "--integrity-only", expect=2)


def test_fuse_with_verify_stores_report(hf_fixtures, tmp_path):
    out = tmp_path / "v"
    cli("self-fuse", hf_fixtures / "gpt2-a", "--times", "3", "-o", out, "--verify")
    data = json.loads((out / "verify-report.json").read_text())
    assert data["passed"] and any(c["name"] == "tensors: decomposition" for c in data["checks"])


def test_moved_sources_are_bad_input(hf_fixtures, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hf_fixtures / "llama-a", src)
    cli("self-fuse", src, "-o", tmp_path / "sf", "-q")
    shutil.rmtree(src)
    out = cli("verify", tmp_path / "sf", expect=2)
    assert "is not there" in out and "--sources" in out


def test_bf16_output_judged_with_bf16_tolerance(hf_fixtures, tmp_path):
    out = tmp_path / "bf"
    cli("self-fuse", hf_fixtures / "llama-a", "-o", out, "--dtype", "bfloat16", "-q")
    data = verify_json(out)
    assert data["passed"] and data["meta"]["tol"] == 3e-2
    failed = verify_json(out, "--tol", "1e-6", expect=1)
    assert not failed["passed"]


def test_nonfinite_sources_verified_at_tensor_level(tmp_path):
    """A fusion made with --allow-nonfinite: NaN/Inf must sit where the rules put them; the rest is checked."""
    from pathlib import Path

    corpus = Path(__file__).parent / "corpus"
    out = tmp_path / "fused"
    cli("fuse", corpus / "good", corpus / "nonfinite", "--allow-nonfinite", "-o", out, "-q")
    report = tmp_path / "r.json"
    cli("verify", out, "--report", report)
    checks = {c["name"]: c["status"] for c in json.loads(report.read_text())["checks"]}
    assert checks["tensors: decomposition"] == "pass" and checks["function"] == "skip"
    # a NaN moved into the other source's block is caught
    name = "model.layers.0.mlp.up_proj.weight"
    state = load_file(out / "model.safetensors")
    w = state[name].clone()
    bad = torch.isnan(w) | torch.isinf(w)
    w[bad] = 0.0
    w[0, -1] = float("nan")
    edit(out, name, lambda _: w)
    msg = cli("verify", out, expect=1)
    assert name in msg
