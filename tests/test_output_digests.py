"""Output bytes are pinned: every fixture in every mode writes exactly the committed digests.

Regenerate the table (``python tests/output_digests.py --write``) only for a change that is meant
to alter output bytes, and say so in the CHANGELOG.
"""

from __future__ import annotations

import json

import pytest

from tests.output_digests import CASES, GOLDEN, all_digests


@pytest.fixture(scope="module")
def produced() -> dict[str, dict[str, str]]:
    return all_digests()


@pytest.mark.parametrize("case", list(CASES))
def test_output_bytes_unchanged(case: str, produced) -> None:
    golden = json.loads(GOLDEN.read_text())
    assert case in golden, f"no committed digests for {case}: run python tests/output_digests.py --write"
    want, got = golden[case], produced[case]
    assert sorted(got) == sorted(want), f"{case}: files differ: {sorted(set(got) ^ set(want))}"
    changed = [f for f in want if got[f] != want[f]]
    assert not changed, f"{case}: output bytes changed in {changed}"
