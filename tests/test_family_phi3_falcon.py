"""Phi-3, Falcon and OPT with project_in/project_out: presets detected from config.json, exact in
transformers for self-fusion and (with grouped norms) for different sources, refused clearly where no
exact fused config exists; and the split op with parts of unequal, per-source sizes named by role
(Phi-3's qkv_proj [q; k; v] under grouped-query attention), with its independent decomposition."""

from __future__ import annotations

import functools
import json
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from typer.testing import CliRunner

from deepfuse_cli import ops
from deepfuse_cli.cli import app
from deepfuse_cli.grouped_norm import apply_grouped_norms
from deepfuse_cli.ops.noise import OffDiagonalNoise
from deepfuse_cli.rules import RuleSet, load_preset
from deepfuse_cli.rules.engine import preset_for_config
from deepfuse_cli.rules.schema import Rule
from deepfuse_cli.verify.decompose import CannotDecompose, Layout, Noise, decompose
from deepfuse_cli.verify.tensor_level import check_block

from .conftest import FIXTURES
from .helpers import assert_fused_function, clean_refusal, cli, load, probe, run

HF = FIXTURES / "hf"
runner = CliRunner()
#: fixture -> preset; each is self-fused x2 and x3
SELF_FUSED = {"phi3-a": "phi3", "phi3-longrope-a": "phi3", "falcon-a": "falcon", "falcon-mq-a": "falcon",
              "falcon-mha-a": "falcon", "opt-proj-a": "opt"}
#: pairs of different sources (a, b)
PAIRS = ["phi3", "falcon", "falcon-mq", "opt-proj"]


@functools.cache
def source_outputs(name: str):
    return run(load(HF / name), probe())


def verify_report(path) -> dict:
    report = json.loads(cli("verify", path, "--json", "--probes", "2", "--seq-len", "6"))
    assert report["passed"], report
    return {c["name"]: c for c in report["checks"]}


def config(path) -> dict:
    return json.loads((path / "config.json").read_text())


# ---- presets: detection and coverage ---------------------------------------------------------------

@pytest.mark.parametrize("fixture", [*SELF_FUSED, "phi3-b", "falcon-b", "falcon-mq-b", "opt-proj-b"])
def test_detected_from_config_and_every_tensor_claimed_once(fixture):
    preset = {"phi3": "phi3", "falcon": "falcon", "opt": "opt"}[fixture.split("-")[0]]
    assert preset_for_config(config(HF / fixture), "test").name == preset
    assert "every tensor claimed by exactly one rule" in cli("rules", "check", preset, HF / fixture)


@pytest.mark.parametrize("preset, fixtures", [("phi3", ["phi3-a", "phi3-longrope-a"]),
                                              ("falcon", ["falcon-a", "falcon-mq-a", "falcon-mha-a"])])
def test_every_rule_claims_something_in_the_fixtures(preset, fixtures):
    from deepfuse_cli.formats import open_checkpoint
    from deepfuse_cli.plan import virtualise_output

    p = load_preset(preset)
    used: set[int] = set()
    for fixture in fixtures:
        refs, _ = virtualise_output(open_checkpoint(HF / fixture), 0, p)
        used |= {m.index for m in RuleSet(p).coverage(list(refs))[0].values()}
    assert used == set(range(len(p.rules)))


# ---- exact in transformers -------------------------------------------------------------------------

@pytest.mark.parametrize("fixture", list(SELF_FUSED))
@pytest.mark.parametrize("times", [2, 3])
def test_self_fusion_is_exact_in_transformers(fixture, times, tmp_path):
    out = tmp_path / "fused"
    cli("self-fuse", HF / fixture, "--times", times, "-o", out, "-q")
    cfg, src = config(out), config(HF / fixture)
    assert cfg["tie_word_embeddings"] is False
    assert cfg["hidden_size"] == src["hidden_size"] * times
    assert cfg["num_attention_heads"] == src["num_attention_heads"] * times
    logits, hidden = run(load(out), probe())  # no missing/unexpected/mismatched keys
    assert_fused_function(logits, hidden, [source_outputs(fixture)] * times, [1.0 / times] * times)
    if fixture == "falcon-mq-a":  # one KV head per copy: the new decoder architecture, one norm per layer
        assert cfg["new_decoder_architecture"] is True and cfg["num_kv_heads"] == times
        assert cfg["num_ln_in_parallel_attn"] == 1
    if fixture == "opt-proj-a":
        assert cfg["word_embed_proj_dim"] == 8 * times and cfg["do_layer_norm_before"] is False
    if times == 2 and fixture == "phi3-a":  # verify's run time: one self-fusion, two pairs, one rule mode
        checks = verify_report(out)
        assert checks["tensors: decomposition"]["status"] == "pass"
        assert checks["function: logits vs source"]["status"] == "pass"


@pytest.mark.parametrize("pair", PAIRS)
def test_different_sources_prop_mode_is_exact_with_grouped_norms(pair, tmp_path):
    out = tmp_path / "fused"
    cli("fuse", HF / f"{pair}-a", HF / f"{pair}-b", "-o", out, "--norm", "prop", "-q")
    model = load(out)
    assert config(out)["deepfuse_norm_groups"] == [16, 16]
    assert apply_grouped_norms(model) > 0
    logits, hidden = run(model, probe())
    assert_fused_function(logits, hidden, [source_outputs(f"{pair}-a"), source_outputs(f"{pair}-b")], [0.5, 0.5])
    if pair not in ("phi3", "falcon-mq"):
        return
    checks = verify_report(out)
    assert checks["tensors: decomposition"]["status"] == "pass"
    assert checks["function: logits vs weighted average of sources"]["status"] == "pass"


def test_different_sources_rule_mode_is_a_measured_deviation(tmp_path):
    out = tmp_path / "fused"
    cli("fuse", HF / "phi3-a", HF / "phi3-b", "-o", out, "-q")
    checks = verify_report(out)
    assert checks["function: logits vs weighted average of sources"]["status"] == "expected"
    assert checks["function: same weights with grouped norms"]["status"] == "pass"


def test_phi3_sources_of_different_widths_split_qkv_at_each_sources_offsets(tmp_path):
    """Three sources, one wider (6 heads, 3 KV heads): part sizes differ per source and per part."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(3)
    wide = Phi3ForCausalLM(Phi3Config(vocab_size=64, hidden_size=24, num_attention_heads=6, num_key_value_heads=3,
                                      intermediate_size=40, num_hidden_layers=2, max_position_embeddings=64,
                                      original_max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=1))
    wide.save_pretrained(tmp_path / "wide")
    out = tmp_path / "fused"
    cli("fuse", HF / "phi3-a", HF / "phi3-b", tmp_path / "wide", "-o", out, "--norm", "prop", "--weights", "1,2,1", "-q")
    cfg = config(out)
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (56, 14, 7)
    model = load(out)
    apply_grouped_norms(model)
    logits, hidden = run(model, probe())
    srcs = [source_outputs("phi3-a"), source_outputs("phi3-b"), run(load(tmp_path / "wide"), probe())]
    assert_fused_function(logits, hidden, srcs, [0.25, 0.5, 0.25])


# ---- refusals --------------------------------------------------------------------------------------

def _edited(tmp_path, fixture: str, **fields):
    path = tmp_path / fixture
    shutil.copytree(HF / fixture, path)
    (path / "config.json").write_text(json.dumps({**config(path), **fields}))
    return path


@pytest.mark.parametrize("fixture, fields, contains", [
    ("falcon-mha-a", {"alibi": True}, ["ALiBi", "number of heads"]),
    ("falcon-mq-a", {"parallel_attn": False}, ["multi-query", "parallel_attn false"]),
])
def test_falcon_layouts_without_an_exact_fused_config_are_refused(fixture, fields, contains, tmp_path):
    src = _edited(tmp_path, fixture, **fields)
    out = tmp_path / "out"
    result = runner.invoke(app, ["self-fuse", str(src), "-o", str(out)])
    clean_refusal(result, ["source 1", *contains])
    assert not out.exists()


def test_phi3_config_that_does_not_tile_qkv_is_refused_naming_the_tensor(tmp_path):
    src = _edited(tmp_path, "phi3-a", num_key_value_heads=1)  # q 16 + k 4 + v 4 != 32 rows
    result = runner.invoke(app, ["self-fuse", str(src), "-o", str(tmp_path / "out")])
    clean_refusal(result, ["source 1", "qkv_proj.weight", "32 entries", "heads 16 + kv 4 + kv 4 = 24"])


def test_falcon_config_without_its_defaulted_fields_fuses_as_transformers_reads_it(tmp_path):
    """multi_query and parallel_attn default to true in transformers: a config.json without them is Falcon-7B's
    layout, and fuses into the same config as one that says so."""
    src = tmp_path / "bare-config"
    shutil.copytree(HF / "falcon-mq-a", src)
    cfg = config(src)
    for key in ("multi_query", "parallel_attn", "num_kv_heads", "num_ln_in_parallel_attn", "new_decoder_architecture"):
        del cfg[key]
    (src / "config.json").write_text(json.dumps(cfg))
    cli("self-fuse", src, "-o", tmp_path / "a", "-q")
    cli("self-fuse", HF / "falcon-mq-a", "-o", tmp_path / "b", "-q")
    got, want = config(tmp_path / "a"), config(tmp_path / "b")
    for key in ("new_decoder_architecture", "num_kv_heads", "num_ln_in_parallel_attn", "num_attention_heads"):
        assert got[key] == want[key], key


def test_sources_of_different_falcon_layouts_are_refused(tmp_path):
    result = runner.invoke(app, ["fuse", str(HF / "falcon-a"), str(HF / "falcon-mha-a"), "-o", str(tmp_path / "o")])
    clean_refusal(result, ["source 2", "differ in"])


# ---- the split op with parts named by role: properties ---------------------------------------------

def sized_rule(axes: list[str], roles: list[str], input_axis: int | None) -> Rule:
    return Rule(pattern="t", op="split_fuse_concat", axes=axes, parts=roles, input_axis=input_axis)


def gather(blocks) -> torch.Tensor:
    held = [b.clone() for b in blocks]  # ring buffers are reused
    return torch.cat(held)


@st.composite
def sized_sources(draw, equal: bool = False):
    """n sources of a [parts, hidden] projection: per source a hidden width and a size per part."""
    n = draw(st.integers(2, 3))
    nparts = draw(st.integers(2, 3))
    first = ([draw(st.integers(1, 4)) for _ in range(nparts)], draw(st.integers(1, 4)))
    per = [first if equal else ([draw(st.integers(0, 4)) for _ in range(nparts)], draw(st.integers(1, 4)))
           for _ in range(n)]
    if sum(sum(p) for p, _ in per) == 0:
        per[0] = ([1] * nparts, per[0][1])
    return per


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sized_sources(), st.integers(0, 2**31 - 1), st.sampled_from([0, 1]), st.sampled_from([None, 24, 100]))
def test_unequal_parts_each_fuse_block_diagonally_in_order(case, seed, layout, chunk):
    """y = [x_1; ...; x_n] through the fused projection gives, part by part, the sources' own outputs
    side by side; in a torch [out, in] layout (parts on axis 0) or Conv1D [in, out] (parts on axis 1,
    rows cut at different places in each part: tiny row blocks)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [p for p, _ in case]
    ws = [torch.randn(sum(p), d, generator=g, dtype=torch.float64) for p, d in case]
    xs = [torch.randn(2, d, generator=g, dtype=torch.float64) for _, d in case]
    roles = ["heads", "kv", "mlp"][:len(sizes[0])]
    if layout == 0:
        r, srcs = sized_rule(["qkv", "hidden"], roles, 1), ws
    else:
        r, srcs = sized_rule(["hidden", "qkv"], roles, 0), [w.t().contiguous() for w in ws]
    ctx = ops.FuseContext(dtype=torch.float64, part_sizes=sizes, chunk_bytes=chunk)
    fused = gather(ops.get("split_fuse_concat").rows(srcs, r, ctx))
    y = torch.cat(xs, dim=1) @ (fused.t() if layout == 0 else fused)
    outs = [x @ w.t() for x, w in zip(xs, ws)]
    start = 0
    for p in range(len(roles)):
        for m, o in enumerate(outs):
            lo = sum(sizes[m][:p])
            want = o[:, lo:lo + sizes[m][p]]
            torch.testing.assert_close(y[:, start:start + sizes[m][p]], want, rtol=0, atol=1e-12)
            start += sizes[m][p]
    assert start == y.shape[1]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.integers(0, 2**31 - 1), st.sampled_from([0, 1]),
       st.sampled_from([None, "offdiag", "preserving"]), st.booleans())
def test_decomposition_of_unequal_parts_tiles_and_matches_the_op(data, seed, layout, noise_mode, two_widened):
    """verify's blocks (written from the mathematics) tile the fused tensor the op wrote, every block
    holds what it should (noise of both modes included), and a changed element fails its block only."""
    case = data.draw(sized_sources(equal=noise_mode == "preserving"))
    sizes = [p for p, _ in case]
    roles = ["heads", "kv", "mlp"][:len(sizes[0])]
    g = torch.Generator().manual_seed(seed)
    if two_widened:
        r = sized_rule(["qkv", "hidden"] if layout == 0 else ["hidden", "qkv"], roles, 1 - layout)
        shapes = [(sum(p), d) if layout == 0 else (d, sum(p)) for p, d in case]
    else:
        r = sized_rule(["qkv"], roles, None)
        shapes = [(sum(p),) for p, _ in case]
        noise_mode = None
    sources = [torch.randn(s, generator=g) for s in shapes]
    if noise_mode == "preserving":
        sources = [sources[0]] * len(sources)
    noise = None if noise_mode is None else Noise(seed=seed, std=0.1, preserving=noise_mode == "preserving")
    ctx = ops.FuseContext(dtype=torch.float32, part_sizes=sizes, chunk_bytes=data.draw(st.sampled_from([None, 16])),
                          noise=None if noise is None else OffDiagonalNoise(seed, "t", 0.1, preserving=noise.preserving))
    fused = gather(ops.get("split_fuse_concat").rows(sources, r, ctx))
    lay = Layout(name="t", rule=r, source_shapes=shapes, weights=[1 / len(shapes)] * len(shapes), noise=noise,
                 part_sizes=sizes)
    blocks = decompose(lay)
    assert tuple(fused.shape) == lay.shape
    cover = torch.zeros(lay.shape, dtype=torch.int32)
    for b in blocks:
        cover[b.where] += 1
    assert bool((cover == 1).all())
    verdicts = [check_block(b, lay, fused, sources, exact=True, tol=0.0) for b in blocks]
    assert all(v.ok for v in verdicts), [(v.block.label, v.err) for v in verdicts if not v.ok]
    flat = data.draw(st.integers(0, fused.numel() - 1))
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), fused.shape))
    tampered = fused.clone()
    tampered[index] += 1.0 + abs(float(tampered[index]))
    failed = [v for v in (check_block(b, lay, tampered, sources, exact=True, tol=0.0) for b in blocks) if not v.ok]
    assert len(failed) == 1 and failed[0].index == index


def test_equal_parts_decompose_as_before_and_sized_parts_need_their_sizes():
    r = Rule(pattern="t", op="split_fuse_concat", axes=["qkv", "hidden"], parts=3, input_axis=1)
    lay = Layout(name="t", rule=r, source_shapes=[(6, 2), (9, 3)], weights=[0.5, 0.5])
    sized = Layout(name="t", rule=sized_rule(["qkv", "hidden"], ["kv", "kv", "kv"], 1), source_shapes=lay.source_shapes,
                   weights=[0.5, 0.5], part_sizes=[[2, 2, 2], [3, 3, 3]])
    assert [b.where for b in decompose(lay)] == [b.where for b in decompose(sized)]
    with pytest.raises(CannotDecompose, match="part sizes"):
        decompose(Layout(name="t", rule=sized.rule, source_shapes=lay.source_shapes, weights=[0.5, 0.5]))
    with pytest.raises(ValueError, match="part sizes"):
        list(ops.get("split_fuse_concat").rows([torch.zeros(6, 2)] * 2, sized.rule, ops.FuseContext(torch.float32)))
    with pytest.raises(ops.FusionMismatch, match=r"is not its parts 2 \+ 2 \+ 3") as exc:
        list(ops.get("split_fuse_concat").rows([torch.zeros(6, 2)] * 2, sized.rule,
                                               ops.FuseContext(torch.float32, part_sizes=[[2, 2, 2], [2, 2, 3]])))
    assert exc.value.source == 1


@pytest.mark.parametrize("parts, message", [
    (["heads"], "at least 2 parts"), (["heads", "vocab"], "'vocab' is not a widened axis role"),
    (["qkv", "kv"], "'qkv' is not a widened axis role"), (1, "at least 2 parts"),
])
def test_invalid_parts_are_refused_by_the_schema(parts, message):
    with pytest.raises(ValidationError, match=message):
        Rule(pattern="t", op="split_fuse_concat", axes=["qkv", "hidden"], parts=parts, input_axis=1)


def test_sized_parts_need_a_config_to_fuse_but_not_to_convert(tmp_path):
    """Part sizes come from config.json: a bare weights file cannot be fused (refused, naming the tensor),
    while a conversion (one source) keeps the tensor as it is."""
    from safetensors.torch import load_file

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(HF / "phi3-a" / "model.safetensors", bare / "model.safetensors")
    result = runner.invoke(app, ["self-fuse", str(bare / "model.safetensors"), "--rules", "phi3",
                                 "-o", str(tmp_path / "out")])
    clean_refusal(result, ["source 1", "gate_up_proj.weight", "no config.json"])
    cli("convert", HF / "phi3-a", "--to", "safetensors", "-o", tmp_path / "conv", "-q")
    a, b = load_file(HF / "phi3-a" / "model.safetensors"), load_file(tmp_path / "conv" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
