"""Hugging Face model directories and bare weight files.

Reading: ``config.json`` plus one of ``model.safetensors``, ``model.safetensors.index.json``
(sharded), ``pytorch_model.bin`` or ``pytorch_model.bin.index.json``; or a bare
``.safetensors`` / ``.bin`` / ``.pt`` file. Other top-level files (tokenizer, generation
config) are carried along to be copied into the output.

Writing: safetensors shards named and indexed as transformers names them
(``model.safetensors``, or ``model-00001-of-0000N.safetensors`` with
``model.safetensors.index.json``), split with huggingface_hub's sharding logic.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_state_dict_into_shards_factory

from ..errors import InputError
from ..ir import Checkpoint, TensorRef
from ..untrusted import read_json
from .base import CheckpointWriter, OutputTensor
from .files import write_file
from .hf_layout import BIN_INDEX, CONFIG, SAFE_INDEX, WEIGHT_LAYOUTS, WEIGHT_SUFFIXES, is_shard_name
from .safetensors_io import SafetensorsFileWriter, read_safetensors_header
from .torch_io import read_torch_file

MANIFEST_NAME = "deepfuse.json"
#: the Hub model card: a source's describes the source; the output gets its own
MODEL_CARD_NAME = "README.md"
#: files never copied from a source into the output (the output has its own)
NOT_COPIED = {CONFIG, SAFE_INDEX, BIN_INDEX, MANIFEST_NAME, MODEL_CARD_NAME}


def _read_file(path: Path) -> tuple[dict[str, TensorRef], dict[str, str]]:
    if path.suffix == ".safetensors":
        return read_safetensors_header(path)
    return read_torch_file(path), {}


def _read_json(path: Path) -> dict[str, Any]:
    return read_json(path, hint="re-save or re-download it")


def _check_config(path: Path) -> dict[str, Any]:
    """config.json: a JSON object (its fields are the family's to check)."""
    return _read_json(path)


def _read_index(directory: Path, index_path: Path) -> tuple[dict[str, TensorRef], list[Path]]:
    """Tensors of a sharded checkpoint, in index order; index and shards must agree exactly."""
    index = _read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{index_path}: no 'weight_map' in the index", "re-save the model with save_pretrained")
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if not is_shard_name(shard):
            raise InputError(f"{index_path}: tensor {name!r} maps to an invalid shard name {shard!r}",
                             "shards must be files in the model's own directory; re-save the model")
        shards.setdefault(shard, []).append(name)
    found: dict[str, TensorRef] = {}
    home: dict[str, str] = {}
    files = []
    for shard, names in shards.items():
        path = directory / shard
        if not path.is_file():
            raise InputError(f"{index_path}: shard {shard!r} (holding {names[0]!r}) does not exist",
                             "the download is incomplete; fetch every shard the index lists")
        files.append(path)
        shard_refs, _ = _read_file(path)
        for name, ref in shard_refs.items():
            if name in home:
                raise InputError(f"{path}: tensor {name!r} is also stored in shard {home[name]!r}",
                                 "a tensor must live in exactly one shard; re-save the model")
            if weight_map.get(name) != shard:
                raise InputError(f"{path}: tensor {name!r} is not listed for this shard in {index_path.name}",
                                 "the index and its shards disagree; re-save the model")
            home[name] = shard
            found[name] = ref
        for name in names:
            if name not in shard_refs:
                raise InputError(f"{index_path}: tensor {name!r} is listed in shard {shard!r}, which does not contain it",
                                 "the index and its shards disagree; re-save the model")
    return {name: found[name] for name in weight_map}, files


def _weights_in(directory: Path) -> tuple[dict[str, TensorRef], list[Path], dict[str, str]]:
    for name in WEIGHT_LAYOUTS:
        if not (directory / name).is_file():
            continue
        if name.endswith(".json"):
            refs, files = _read_index(directory, directory / name)
            return refs, [directory / name, *files], {}
        refs, meta = _read_file(directory / name)
        return refs, [directory / name], meta
    candidates = sorted(p.name for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    hint = (f"found {', '.join(candidates)}: pass one file directly with --rules" if candidates
            else "expected model.safetensors, a sharded model.safetensors.index.json, or pytorch_model.bin")
    raise InputError(f"{directory}: no model weights found", hint)


def read_hf(path: Path) -> Checkpoint:
    """A Hugging Face model directory or a bare weights file."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_dir():
        config = _check_config(path / CONFIG) if (path / CONFIG).is_file() else None
        refs, files, meta = _weights_in(path)
        used = {f.name for f in files}
        extra = sorted(
            p for p in path.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.name not in used and p.name not in NOT_COPIED
            and p.suffix not in WEIGHT_SUFFIXES
        )
        if not refs:
            raise InputError(f"{path}: the checkpoint holds no tensors")
        return Checkpoint(path=path, format="hf", tensors=refs, config=config, metadata={"safetensors": meta},
                          weight_files=files, extra_files=extra)
    if path.suffix not in WEIGHT_SUFFIXES:
        raise InputError(f"{path}: not a checkpoint (expected a model directory, .safetensors, .bin or .pt)")
    refs, meta = _read_file(path)
    if not refs:
        raise InputError(f"{path}: the checkpoint holds no tensors")
    fmt = "safetensors" if path.suffix == ".safetensors" else "torch"
    return Checkpoint(path=path, format=fmt, tensors=refs, config=None, metadata={"safetensors": meta},
                      weight_files=[path])


def plan_shards(tensors: list[OutputTensor], max_shard_size: int | str) -> dict[str, list[OutputTensor]]:
    """Assign tensors to shard files exactly as huggingface_hub / transformers do (in order)."""
    by_name = {t.name: t for t in tensors}
    split = split_state_dict_into_shards_factory(
        by_name,
        get_storage_size=lambda t: max(1, _nbytes(t)),
        get_storage_id=lambda t: None,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size,
    )
    return {fname: [by_name[n] for n in names] for fname, names in split.filename_to_tensors.items()}


def _nbytes(t: OutputTensor) -> int:
    n = 1
    for s in t.shape:
        n *= s
    return n * torch.empty((), dtype=t.dtype).element_size()


class HFWriter(CheckpointWriter):
    """Sharded safetensors + index in ``directory``; each file's sha256 is computed while writing.

    ``metadata``: ``max_shard_size`` (int bytes or "5GB"-style string) and ``safetensors_metadata``
    (str -> str, stored in every shard header; transformers expects ``{"format": "pt"}``).
    """

    def __init__(self, directory: Path, tensors: list[OutputTensor], metadata: dict[str, Any] | None = None):
        super().__init__(directory, tensors, metadata)
        self.max_shard_size = self.metadata.get("max_shard_size", "5GB")
        self.st_metadata = self.metadata.get("safetensors_metadata", {"format": "pt"})
        self.shards = plan_shards(self.tensors, self.max_shard_size)
        self._order = [(fname, t) for fname, ts in self.shards.items() for t in ts]
        self._pos = 0
        self._current: SafetensorsFileWriter | None = None
        self._current_name: str | None = None
        self.digests: dict[str, str] = {}

    def _open(self, fname: str) -> None:
        self._current = SafetensorsFileWriter(self.directory / fname, self.shards[fname], self.st_metadata,
                                              sha256=True)
        self._current_name = fname

    def _close_current(self) -> None:
        if self._current is not None:
            self._current.close()
            self.digests[self._current_name] = self._current.hexdigest()
            self._current = None


    def _file_for_next(self) -> SafetensorsFileWriter:
        fname, _ = self._order[self._pos]
        if self._current_name != fname:
            self._close_current()
            self._open(fname)
        return self._current

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._file_for_next().write(name, tensor)
        self._pos += 1

    def write_chunks(self, name: str, chunks) -> None:
        """The next tensor as consecutive pieces of its bytes, written and hashed as they come."""
        self._file_for_next().write_chunks(name, chunks)
        self._pos += 1

    def finish(self) -> list[Path]:
        self._close_current()
        if self._pos != len(self._order):
            raise RuntimeError(f"internal error: {len(self._order) - self._pos} planned tensors were never written")
        files = [Path(f) for f in self.shards]
        if len(self.shards) > 1:
            total = sum(_nbytes(t) for t in self.tensors)
            index = {
                "metadata": {"total_size": total},
                "weight_map": {t.name: fname for fname, ts in self.shards.items() for t in ts},
            }
            data = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
            write_file(self.directory / SAFE_INDEX, data)
            self.digests[SAFE_INDEX] = hashlib.sha256(data).hexdigest()
            files.append(Path(SAFE_INDEX))
        return files

    def abort(self) -> None:
        if self._current is not None:
            self._current.abort()
