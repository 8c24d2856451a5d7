"""Options: one typed model per command, validated once; a broken rule is one error line naming its flag."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

from deepfuse_cli.cli import app
from deepfuse_cli.errors import UsageError
from deepfuse_cli.options import ConvertState, DType, FuseOptions, NoiseMode, NormMode, OptimizerState
from deepfuse_cli.verify import VerifyOptions


def parse(n: int = 2, **values) -> FuseOptions:
    return FuseOptions.parse({"sources": n}, **values)


def refused(text: list[str], n: int = 2, model=None, **values) -> str:
    with pytest.raises(UsageError) as info:
        FuseOptions.parse({"sources": n}, **values) if model is None else model.parse(**values)
    message = info.value.message
    assert "\n" not in message
    for t in text:
        assert t in message, f"{t!r} not in {message!r}"
    return message


# ---- the model ---------------------------------------------------------------------------------
def test_defaults_are_the_cli_defaults():
    o = parse(3)
    assert o.weights == (1 / 3, 1 / 3, 1 / 3) and not o.weights_rescaled
    assert (o.norm, o.noise_mode, o.optimizer_state) == ("rule", "offdiag", "drop")
    assert o.dtype is None and o.max_shard_size == 5 * 10**9 and o.max_memory is None
    assert not o.noisy and o.describe_noise() == {"std": 0.0, "scale": 0.0, "mode": "none"}


def test_enum_members_are_their_strings():
    o = parse(norm="prop", noise_std=0.1, self_fusion=True, noise_mode="preserving")
    assert o.norm is NormMode.prop and o.norm == "prop" and f"{o.norm}" == "prop" and str(o.noise_mode) == "preserving"
    # what the plan and the manifest write stays plain strings
    assert json.dumps({"mode": o.norm, "noise": o.describe_noise()}) == \
        '{"mode": "prop", "noise": {"std": 0.1, "scale": 0.0, "mode": "preserving"}}'
    assert repr(o.describe_noise()["mode"]) == "'preserving'"


@pytest.mark.parametrize("raw, weights, rescaled", [
    (None, (0.5, 0.5), False),
    ("0.25,0.75", (0.25, 0.75), False),
    ("0.25, 0.75,", (0.25, 0.75), False),
    ([2, 1], (2 / 3, 1 / 3), True),
    ("2,1", (2 / 3, 1 / 3), True),
])
def test_weights_are_normalised_one_per_source(raw, weights, rescaled):
    o = parse(weights=raw)
    assert o.weights == weights and o.weights_rescaled is rescaled


@pytest.mark.parametrize("raw, text", [
    ("0.5", "--weights has 1 values for 2 sources"),
    ("1,2,3", "--weights has 3 values for 2 sources"),
    ("1,-1", "--weights '1,-1': -1.0 is not a positive finite number"),
    ("1,0", "0.0 is not a positive"),
    ("1,nan", "nan is not a positive"),
    ("1,inf", "inf is not a positive"),
    ("a,b", "--weights 'a,b': not a comma-separated list of numbers"),
])
def test_bad_weights(raw, text):
    refused([text], weights=raw)


def test_recorded_weights_are_kept_bit_for_bit():
    # a manifest's weights were divided by their sum once; dividing again could move them by an ulp
    w = (0.1, 0.2, 0.7000000000000001)
    assert FuseOptions(weights=w).weights == w
    with pytest.raises(ValidationError, match="sum to"):
        FuseOptions(weights=(0.5, 0.6))


@pytest.mark.parametrize("field, flag", [("noise_std", "--noise-std"), ("noise_scale", "--noise-scale")])
@pytest.mark.parametrize("value", [-1.0, -1e-12, math.inf, math.nan])
def test_noise_is_finite_and_not_negative(field, flag, value):
    refused([flag, "noise must be a finite number >= 0"], **{field: value})


def test_noise_rules_over_several_options():
    refused(["--noise-std or --noise-scale, not both"], noise_std=0.1, noise_scale=0.1)
    msg = refused(["--noise-mode preserving", "self-fusion only"], noise_mode=NoiseMode.preserving, noise_scale=0.1)
    assert msg.startswith("--noise-mode preserving: ")
    assert parse(noise_mode=NoiseMode.preserving, noise_scale=0.1, self_fusion=True).noisy


@pytest.mark.parametrize("given, expected", [
    (DType.keep, None), ("keep", None), (None, None), (DType.bfloat16, torch.bfloat16), ("float16", torch.float16),
    (torch.float32, torch.float32),
])
def test_dtype_is_a_torch_dtype(given, expected):
    assert parse(dtype=given).dtype == expected


@pytest.mark.parametrize("bad", ["int8", torch.int8, "fp32"])
def test_bad_dtype(bad):
    refused(["--dtype", "choose keep, float32, bfloat16, float16"], dtype=bad)


@pytest.mark.parametrize("raw, size", [
    ("5GB", 5 * 10**9),  # decimal, as huggingface_hub counts
    ("500MB", 500 * 10**6), ("20KB", 20_000), ("4GiB", 4 * 2**30), ("64MiB", 64 * 2**20), ("1.5GB", 1_500_000_000),
    ("30000", 30_000), (30_000, 30_000),
])
def test_sizes(raw, size):
    assert parse(max_shard_size=raw).max_shard_size == size
    assert parse(max_memory=raw).max_memory == size


@pytest.mark.parametrize("raw", ["lots", "0", "-1", "5XB", ""])
@pytest.mark.parametrize("field, flag", [("max_shard_size", "--max-shard-size"), ("max_memory", "--max-memory")])
def test_bad_sizes(raw, field, flag):
    with pytest.raises(UsageError) as info:
        parse(**{field: raw})
    assert info.value.message == f"{flag} {raw!r} is not a size" and "4GiB" in info.value.hint


def test_optimizer_state():
    assert parse(1, convert_only=True, optimizer_state=ConvertState.keep).optimizer_state is OptimizerState.fuse
    assert parse(1, convert_only=True, optimizer_state=ConvertState.drop).optimizer_state is OptimizerState.drop
    refused(["--optimizer-state 'keep'"], optimizer_state="keep")  # keep is for convert
    refused(["a conversion takes exactly one source"], convert_only=True)


def test_model_is_frozen_and_refuses_unknown_fields():
    o = parse()
    with pytest.raises(ValidationError):
        o.norm = NormMode.prop
    refused(["--colour", "extra"], colour="red")


def test_json_round_trip():
    o = parse(weights="2,1", norm="prop", noise_std=0.01, seed=3, dtype="bfloat16", max_shard_size="4GiB",
              max_memory="2GiB", output_format="t5x", optimizer_state="fuse", allow_nonfinite=True)
    data = json.loads(json.dumps(o.model_dump(mode="json")))
    assert data["dtype"] == "bfloat16" and data["norm"] == "prop" and data["max_shard_size"] == 4 * 2**30
    assert FuseOptions.model_validate(data) == o


def test_options_sit_below_the_plan():
    import ast

    import deepfuse_cli.options as module

    tree = ast.parse(Path(module.__file__).read_text())
    local = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level}
    assert local <= {"errors"}, f"options imports {local}: it must not depend on plan, fuse or the CLI"


def test_plan_module_still_exports_the_options():
    from deepfuse_cli import plan

    assert plan.FuseOptions is FuseOptions


# ---- verify's options ----------------------------------------------------------------------------
@pytest.mark.parametrize("values, text", [
    ({"probes": 0}, "--probes 0"), ({"seq_len": 1}, "--seq-len 1"), ({"tol": 0.0}, "--tol 0.0"),
    ({"tol": -1.0}, "--tol -1.0"), ({"tol": math.inf}, "--tol inf"), ({"times": 1}, "--times 1"),
    ({"times": 2, "sources": ["a", "b"]}, "--times 2: needs exactly one source"),
])
def test_bad_verify_options(values, text):
    refused([text], model=VerifyOptions, **values)


def test_verify_options():
    o = VerifyOptions.parse(sources=["a"], times=3, tol=1e-4)
    assert o.sources == ("a",) and o.times == 3 and o.probes == 4 and o.seq_len == 16


# ---- the CLI -------------------------------------------------------------------------------------
runner = CliRunner()


@pytest.mark.parametrize("command, choices", [
    ("fuse", ["rule|prop", "offdiag|preserving", "keep|float32|bfloat16|float16", "drop|fuse"]),
    ("self-fuse", ["rule|prop", "offdiag|preserving", "keep|float32|bfloat16|float16", "drop|fuse"]),
    ("plan", ["rule|prop", "offdiag|preserving", "keep|float32|bfloat16|float16", "drop|fuse"]),
    ("convert", ["keep|float32|bfloat16|float16", "keep|drop"]),
])
def test_help_lists_the_choices(command, choices):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "300", "TERMINAL_WIDTH": "300"})
    assert result.exit_code == 0, result.output
    for c in choices:
        assert c in result.output, f"{c!r} not in the help of {command}"


@pytest.mark.parametrize("args, text", [
    (["--norm", "both"], "--norm: 'both' is not one of 'rule', 'prop'"),
    (["--dtype", "int8"], "--dtype: 'int8' is not one of"),
    (["--optimizer-state", "keep"], "--optimizer-state: 'keep' is not one of"),
    (["--seed", "abc"], "--seed: "),
])
def test_a_value_outside_the_choices_is_one_error_line(args, text, tmp_path):
    result = runner.invoke(app, ["self-fuse", str(tmp_path), *args, "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"error: {text}"), result.output
    assert len(lines) == 2 and lines[1] == "hint: see `deepfuse self-fuse --help`"
