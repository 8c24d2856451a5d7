from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
HF = FIXTURES / "hf"


@pytest.fixture(scope="session")
def hf_fixtures() -> Path:
    if not HF.is_dir():
        raise RuntimeError(f"missing fixtures in {HF}: run `python fixtures/make_fixtures.py`")
    return HF
