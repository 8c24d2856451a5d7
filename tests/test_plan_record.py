"""The plan as typed data: ``plan --json`` is a PlanRecord, and reads back through the same class."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from deepfuse_cli.plan_record import PlanRecord

from .conftest import FIXTURES
from .helpers import cli


@pytest.mark.parametrize("args", [
    ["plan", FIXTURES / "hf" / "llama-a", FIXTURES / "hf" / "llama-b", "--json"],
    ["plan", FIXTURES / "t5x" / "legacy-a", "--times", "2", "--json"],
])
def test_plan_json_round_trips_through_its_model(args):
    text = cli(*args)
    record = PlanRecord.model_validate_json(text)
    assert record.to_json() == json.loads(text)
    assert record.n == 2 and record.tensors and all(t.bytes > 0 for t in record.tensors)
    assert sum(t.bytes for t in record.tensors) == record.total_bytes


def test_a_plan_record_with_wrong_types_or_extra_fields_is_refused():
    good = json.loads(cli("plan", FIXTURES / "hf" / "mlp-a", "--times", "2", "--json"))
    with pytest.raises(ValidationError):
        PlanRecord.model_validate({**good, "seed": "zero"})
    with pytest.raises(ValidationError):
        PlanRecord.model_validate({**good, "surprise": 1})
