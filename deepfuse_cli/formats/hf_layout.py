"""File names of a Hugging Face model directory (no heavy imports: the CLI uses this at start-up)."""

from __future__ import annotations

from pathlib import Path

CONFIG = "config.json"
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def likely_weight_files(path: Path) -> list[Path]:
    """The weight files a run over ``path`` will most likely read, found from names alone (nothing is
    opened): the file itself, or a directory's ``model*.safetensors`` (else ``pytorch_model*.bin``).
    Only a guess, used to start hashing early; the reader decides what is read."""
    path = Path(path)
    if path.is_file():
        return [path] if path.suffix in WEIGHT_SUFFIXES else []
    if not path.is_dir():
        return []
    for pattern in ("model*.safetensors", "pytorch_model*.bin"):
        found = sorted(p for p in path.glob(pattern) if p.is_file())
        if found:
            return found
    return []
