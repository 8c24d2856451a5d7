"""The format registry: one adapter per on-disk format, looked up by name, by checkpoint and by path;
``--to`` offers exactly the registered names (any case) and refuses others in one line."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from deepfuse_cli.errors import UsageError
from deepfuse_cli.formats import open_checkpoint, registry
from deepfuse_cli.formats.adapter import FormatAdapter

from .conftest import FIXTURES
from .helpers import cli


def test_names_aliases_and_reader_names_are_unique():
    spellings = [s for a in registry.ADAPTERS for s in a.spellings]
    assert len(spellings) == len(set(spellings)) == len(registry.spellings())
    reads = [f for a in registry.ADAPTERS for f in a.reads]
    assert len(reads) == len(set(reads))
    assert all(isinstance(a, FormatAdapter) for a in registry.ADAPTERS)
    assert sum(a.fallback for a in registry.ADAPTERS) == 1  # detection always ends somewhere


@pytest.mark.parametrize("spelling", ["hf", "safetensors", "SafeTensors", "t5x", "T5X", "orbax"])
def test_every_spelling_finds_its_adapter(spelling):
    adapter = registry.get(spelling)
    assert spelling.lower() in adapter.spellings


def test_unknown_name_is_a_usage_error_listing_the_choices():
    with pytest.raises(UsageError) as exc:
        registry.get("gguf")
    assert all(s in exc.value.message for s in registry.spellings())


@pytest.mark.parametrize("path, name", [
    ("hf/llama-a", "hf"), ("hf/llama-b-sharded", "hf"), ("hf/llama-a-bin", "hf"),
    ("t5x/legacy-a", "t5x"), ("t5x/legacy-a/checkpoint_1000", "t5x"),
    ("orbax/std-a", "orbax"), ("orbax/mgr-a", "orbax"),
])
def test_detection_and_reading_agree(path, name):
    adapter = registry.detect(FIXTURES / path)
    assert adapter.name == name
    assert registry.for_checkpoint(open_checkpoint(FIXTURES / path)) is adapter


def test_a_bare_weights_file_is_read_by_the_hugging_face_adapter(tmp_path):
    f = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(2, 2)}, str(f))
    ck = open_checkpoint(f)
    assert registry.detect(f) is registry.HUGGING_FACE is registry.for_checkpoint(ck)


def test_step_is_refused_for_formats_without_steps(hf_fixtures):
    out = cli("inspect", hf_fixtures / "llama-a", "--step", "3", expect=2)
    assert out.startswith("error: ") and "--step applies to T5X/Orbax checkpoints only" in out


def test_to_lists_the_registered_names_in_help():
    out = cli("convert", "--help")
    for spelling in registry.spellings():
        assert spelling in out


def test_to_takes_any_case():
    out = cli("convert", FIXTURES / "t5x" / "legacy-a", "--to", "SafeTensors", "--dry-run", "--json")
    assert '"output_format": "hf"' in out


def test_unknown_to_is_refused_in_one_line(tmp_path):
    out = cli("convert", FIXTURES / "t5x" / "legacy-a", "--to", "gguf", "-o", tmp_path / "out", expect=2)
    lines = out.strip().splitlines()  # the helper shows stderr twice: output, then stderr alone
    assert lines[0].startswith("error: ") and "'gguf'" in lines[0] and "--to" in lines[0], out
    assert lines[1].startswith("hint: ") and "Traceback" not in out and "╭" not in out, out
    assert all(repr(s) in lines[0] for s in registry.spellings())
    assert not (tmp_path / "out").exists()
