"""verify's function check streams layer by layer in fp32: the same logits as transformers loading the
whole model, peak memory independent of depth, fp32 tolerance for half storage in exact modes, any
checkpoint transformers can load checked (whatever the rules file), never a silent pass without it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from deepfuse_cli.sources import open_source
from deepfuse_cli.verify.streamed import Weights, model_class, run_streamed

from .helpers import cli

FIXTURES = Path(__file__).parent.parent / "fixtures" / "hf"
MiB = 2**20


def verify_json(out, *extra, expect=0) -> dict:
    text = cli("verify", out, *extra, "--json", expect=expect)
    data, _ = json.JSONDecoder().raw_decode(text[text.index("{"):])
    return data


@pytest.mark.parametrize("name", ["llama-tied-a", "gpt2-a", "gpt_neox-a", "opt-a", "t5v10-a", "t5v11-a"])
def test_streamed_forward_is_transformers_forward(name):
    """Layer by layer from the files, fp32: the logits transformers computes with the whole model loaded
    (tied embeddings, renamed checkpoint keys, encoder-decoder)."""
    import transformers

    ck = open_source(FIXTURES / name)
    cls = model_class(ck.config)
    ids = torch.randint(2, ck.config["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(0))
    logits, hidden, held = run_streamed(cls, Weights(ck.config, ck.tensors), ids, ids[:, :4])
    model = getattr(transformers, cls.name).from_pretrained(str(FIXTURES / name), dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(input_ids=ids, decoder_input_ids=ids[:, :4]) if cls.inputs == "seq2seq" else model(input_ids=ids)
    torch.testing.assert_close(logits, want.logits, rtol=0, atol=1e-6)
    assert 0 < held < sum(t.numel for t in ck.tensors.values()) * 4  # never the whole model at once


def make_llama(path: Path, layers: int, hidden: int = 128, inter: int = 352, vocab: int = 1024) -> None:
    """A Llama-shaped bf16 checkpoint of ``layers`` layers (random weights), config.json and safetensors."""
    g = torch.Generator().manual_seed(layers)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
              "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + f"self_attn.{x}_proj.weight": (hidden, hidden) for x in "qkvo"})
        shapes.update({p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    tensors = {k: (1 + 0.1 * torch.randn(s, generator=g) if len(s) == 1 else 0.05 * torch.randn(s, generator=g))
               .to(torch.bfloat16) for k, s in shapes.items()}
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": hidden // 4,
              "num_hidden_layers": layers, "vocab_size": vocab, "rms_norm_eps": 1e-6, "hidden_act": "silu",
              "max_position_embeddings": 256, "tie_word_embeddings": False, "dtype": "bfloat16"}
    (path / "config.json").write_text(json.dumps(config))


#: verify in a child process; prints its report's verdict, meta and its own peak RSS
CHILD = r"""
import json, sys
from deepfuse_cli.verify import VerifyOptions, run_verify

def peak():
    # this process's own high-water mark (VmHWM: reset by exec); getrusage's ru_maxrss keeps the
    # forking parent's mark across exec on Linux, which is the whole test session's
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
report = run_verify(sys.argv[1], VerifyOptions(probes=1, seq_len=8))
print(json.dumps({"passed": report.passed, "meta": report.meta,
                  "checks": {c.name: c.status for c in report.checks},
                  "peak": peak()}, default=str))
"""


def verify_peak(out: Path) -> dict:
    env = {"PYTHONPATH": str(Path(__file__).parent.parent), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(out)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_peak_memory_is_independent_of_depth(tmp_path):
    """4 and 48 layers, self-fused x2 (bf16): verify's peak RSS is the same within 100 MiB, although the
    48-layer fused model alone is ~150 MiB in fp32, and below 2 x the largest fused layer (fp32) + 600 MiB."""
    runs = {}
    for layers in (4, 48):
        make_llama(tmp_path / f"src{layers}", layers)
        out = tmp_path / f"out{layers}"
        cli("self-fuse", tmp_path / f"src{layers}", "--times", "2", "-o", out, "-q")
        runs[layers] = verify_peak(out)
        assert runs[layers]["passed"], runs[layers]
        assert runs[layers]["checks"]["function: logits vs source"] == "pass"
        assert runs[layers]["meta"]["function_loading"] == {"sources": "streamed", "fused": "streamed"}
    whole = 4 * sum(t.numel for t in open_source(tmp_path / "out48").tensors.values())
    assert whole > 140 * MiB  # what loading the whole fused model in fp32 would hold
    # the largest fused layer in fp32: the embedding or output projection (vocab x 2 hidden), or a block
    hidden, inter, vocab = 256, 704, 1024
    block = 4 * (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden)
    largest = max(4 * vocab * hidden, block)
    for layers, r in runs.items():
        assert r["meta"]["function_weight_bytes_held"] <= 2 * largest  # a unit, and the next one read ahead
        assert r["peak"] <= 2 * largest + 600 * MiB, (layers, r["peak"] / MiB)
    assert abs(runs[48]["peak"] - runs[4]["peak"]) < 100 * MiB, {k: r["peak"] / MiB for k, r in runs.items()}


def bf16_copy(src: Path, dest: Path) -> Path:
    from safetensors.torch import load_file

    dest.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            save_file({k: v.to(torch.bfloat16) for k, v in load_file(f).items()}, str(dest / f.name),
                      metadata={"format": "pt"})
        elif f.is_file():
            (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_half_storage_is_held_to_fp32_tolerance(tmp_path):
    """bf16 sources fused in bf16, computed in fp32 with scale factors that are powers of two: the fp32
    tolerance; weights that are not powers of two round in bf16: the bf16 tolerance, and the report
    says why (as for fp32 sources stored as bf16)."""
    a, b = bf16_copy(FIXTURES / "llama-a", tmp_path / "a"), bf16_copy(FIXTURES / "llama-b", tmp_path / "b")
    cli("self-fuse", a, "-o", tmp_path / "self", "-q")
    data = verify_json(tmp_path / "self")
    assert data["passed"] and data["meta"]["tol"] == 1e-5 and data["meta"]["function_dtype"] == "float32"
    cli("fuse", a, b, "--norm", "prop", "-o", tmp_path / "prop", "-q")
    data = verify_json(tmp_path / "prop")
    assert data["passed"] and data["meta"]["tol"] == 1e-5
    cli("fuse", a, b, "--weights", "0.3,0.7", "--norm", "prop", "-o", tmp_path / "w", "-q")
    data = verify_json(tmp_path / "w")
    assert data["passed"] and data["meta"]["tol"] == 3e-2 and "0.3" in data["meta"]["tol_reason"]


def rules_file(tmp_path: Path, **changes) -> Path:
    from deepfuse_cli.rules import load_preset

    rules = load_preset("llama").model_dump(mode="json")
    rules.update(name="my-llama", architecture=None, runtime=None, **changes)
    path = tmp_path / "my-llama.json"
    path.write_text(json.dumps(rules))
    return path


def test_rules_without_runtime_still_get_the_function_check(tmp_path):
    """A user's rules file naming no runtime: transformers loads the checkpoint from its config.json."""
    path = rules_file(tmp_path)
    cli("self-fuse", FIXTURES / "llama-a", "--times", 2, "--rules", path, "-o", tmp_path / "out", "-q")
    data = verify_json(tmp_path / "out", "--rules", path)
    checks = {c["name"]: c["status"] for c in data["checks"]}
    assert checks["function: logits vs source"] == "pass" and data["meta"]["function_runtime"] == \
        "transformers LlamaForCausalLM"


def test_no_runtime_is_never_a_silent_pass(tmp_path):
    """A model_type transformers does not know: the function check is skipped, saying why, and verify
    exits 1 (not a pass) unless --no-function asks for the tensor level only."""
    src = tmp_path / "src"
    src.mkdir()
    for f in (FIXTURES / "llama-a").iterdir():
        if f.name == "config.json":
            config = json.loads(f.read_text())
            config.update(model_type="my-llama-like", architectures=["MyLlamaLikeForCausalLM"])
            (src / "config.json").write_text(json.dumps(config))
        elif f.is_file():
            (src / f.name).write_bytes(f.read_bytes())
    path = rules_file(tmp_path, model_types=["my-llama-like"])
    cli("self-fuse", src, "--times", 2, "--rules", path, "-o", tmp_path / "out", "-q")
    data = verify_json(tmp_path / "out", "--rules", path, expect=1)
    fn = {c["name"]: c for c in data["checks"]}["function"]
    assert fn["status"] == "skip" and fn["unverified"] and "my-llama-like" in fn["message"]
    assert data["passed"] is False and data["failed"] == "function"
    assert {c["name"]: c["status"] for c in data["checks"]}["tensors: decomposition"] == "pass"
    ok = verify_json(tmp_path / "out", "--rules", path, "--no-function")
    assert ok["passed"] and {c["name"]: c["status"] for c in ok["checks"]}["function"] == "skip"


@pytest.mark.parametrize("family", ["qwen3", "olmo2-gqa", "gemma3_text"])
def test_grouped_norms_per_role_and_per_head_stream_too(family, tmp_path):
    """Different sources with --norm prop whose grouped norms need more than the hidden groups (OLMo 2's
    q/k norms under GQA; Qwen3's and Gemma 3's per-head scales from the file beside the weights): the
    fused model is still run one layer at a time, and exact."""
    out = tmp_path / "ab"
    cli("fuse", FIXTURES / f"{family}-a", FIXTURES / f"{family}-b", "--norm", "prop", "-o", out, "-q")
    report = json.loads(cli("verify", out, "--json"))
    assert report["passed"], report
    assert report["meta"]["function_loading"] == {"sources": "streamed", "fused": "streamed"}
    function = next(c for c in report["checks"] if c["name"].startswith("function: logits"))
    assert function["status"] == "pass" and function["figures"]["relative_max_error"] < 1e-5
