"""The Hugging Face format: a model directory (config.json, safetensors or pickle weights, tokenizer
files) or a bare weights file. Written as a directory of safetensors shards (:mod:`.hf`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .adapter import FormatAdapter, Naming, OutputInfo, write_sidecar
from .files import sha256_file
from .hf_layout import CONFIG

if TYPE_CHECKING:
    from ..ir import Checkpoint
    from .base import CheckpointWriter, OutputTensor


class HuggingFaceAdapter(FormatAdapter):
    """Hugging Face directories: what transformers' ``from_pretrained`` loads."""

    name: ClassVar[str] = "hf"
    aliases: ClassVar[tuple[str, ...]] = ("safetensors",)
    label: ClassVar[str] = "safetensors"
    description: ClassVar[str] = "a Hugging Face directory"
    naming: ClassVar[Naming] = Naming.HF
    reads: ClassVar[tuple[str, ...]] = ("hf", "safetensors", "torch")  # a directory, a bare file of each kind
    fallback: ClassVar[bool] = True
    model_card: ClassVar[bool] = True

    def detect(self, path: Path) -> bool:
        """Any path: a model directory or a weights file (the reader says what is missing)."""
        return True

    def read(self, path: Path, step: int | None = None) -> Checkpoint:
        from .hf import read_hf

        return read_hf(path)

    def writer_metadata(self, first: Checkpoint, max_shard_size: int | str) -> dict[str, Any]:
        return {"max_shard_size": max_shard_size, "safetensors_metadata": {"format": "pt"}}

    def writer(self, directory: Path, outputs: list[OutputTensor], metadata: dict[str, Any]) -> CheckpointWriter:
        from .hf import HFWriter

        return HFWriter(directory, outputs, metadata)

    def write_sidecars(self, directory: Path, info: OutputInfo) -> dict[str, str]:
        """config.json (widened), and the first source's other files (tokenizer, generation config) copied."""
        files: dict[str, str] = {}
        if info.config is not None:
            data = (json.dumps(info.config, indent=2, sort_keys=True) + "\n").encode()
            files.update(write_sidecar(directory, CONFIG, data))
        for extra in info.first.extra_files:
            shutil.copyfile(extra, directory / extra.name)
            files[extra.name] = sha256_file(directory / extra.name)
        return files

    def summary(self, files: dict[str, str]) -> str:
        return f"{sum(1 for f in files if f.endswith('.safetensors'))} shard(s)"

    def runtime_loadable(self, ck: Checkpoint) -> bool:
        """A directory or a safetensors file; a bare pickle (``.bin``/``.pt``) is not."""
        return ck.format in ("hf", "safetensors")


HUGGING_FACE = HuggingFaceAdapter()
