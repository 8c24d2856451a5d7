"""File names of a Hugging Face model directory (no heavy imports: the CLI uses this at start-up)."""

from __future__ import annotations

from pathlib import Path

from .. import untrusted
from ..errors import DeepfuseError

CONFIG = "config.json"
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
#: a directory's weights, in the order the reader looks for them: safetensors before pickles (as
#: transformers prefers them), an index before a single file
WEIGHT_LAYOUTS = (SAFE_INDEX, SAFE_SINGLE, BIN_INDEX, BIN_SINGLE)


def is_shard_name(name: object) -> bool:
    """Whether an index's shard entry names a file of the model's own directory (no path, no '..')."""
    return isinstance(name, str) and "/" not in name and "\\" not in name and name not in ("", ".", "..")


def likely_weight_files(path: Path) -> list[Path]:
    """The weight files a run over ``path`` will read, found as the reader finds them but without
    opening any weight file: the file itself, or the shards a directory's index lists (else its
    ``model.safetensors`` / ``pytorch_model.bin``). Nothing the checkpoint does not reference is named:
    no globbing, no shard outside the directory. Used to start hashing early; on any doubt (an
    unreadable index) it names nothing and leaves the reader to report."""
    path = Path(path)
    if path.is_file():
        return [path] if path.suffix in WEIGHT_SUFFIXES else []
    if not path.is_dir():
        return []
    for name in WEIGHT_LAYOUTS:
        if not (path / name).is_file():
            continue
        if not name.endswith(".json"):
            return [path / name]
        try:
            weight_map = untrusted.read_json(path / name).get("weight_map")
        except DeepfuseError:
            return []
        if not isinstance(weight_map, dict) or not all(map(is_shard_name, weight_map.values())):
            return []
        return [path / shard for shard in dict.fromkeys(weight_map.values()) if (path / shard).is_file()]
    return []
