"""PyTorch pickles (``pytorch_model.bin``, ``.pt``): read with ``weights_only=True`` only.

There is no fallback: a file that needs more than the restricted unpickler can run
arbitrary code, so it is refused with the advice to convert it to safetensors.
Files in the zip format (torch >= 1.6) are memory-mapped, so opening one does not read
its tensors; legacy (non-zip) pickles are loaded whole, once.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from ..errors import InputError
from ..ir import TensorRef


def _flatten(obj, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise InputError(
            f"{path}: holds a {type(obj).__name__}, not a state dict of tensors",
            "save the model's state_dict() (or convert it to safetensors)",
        )
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise InputError(f"{path}: state dict key {k!r} is not a string")
        if isinstance(v, torch.Tensor):
            out[k] = v
        else:
            raise InputError(
                f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor",
                "save only the model's state_dict() (or convert it to safetensors)",
            )
    return out


def _check_plain(t: torch.Tensor, name: str, path: Path) -> None:
    """Refuse tensors that are not plain dense arrays of numbers in memory: the rest of the program reads
    every tensor as a strided block of its dtype."""
    hint = "save the plain dense weights (e.g. convert the checkpoint to safetensors)"
    why = None
    if t.device.type == "meta":
        why, hint = "is on the meta device: it has a shape but no data", "save the model after loading its weights"
    elif t.is_nested:
        why = "is a nested tensor"
    elif t.layout != torch.strided:
        why, hint = f"is a sparse tensor ({str(t.layout).removeprefix('torch.')})", "save it dense (tensor.to_dense())"
    elif t.is_quantized:
        why, hint = f"is a quantized tensor ({str(t.dtype).removeprefix('torch.')})", "dequantize it before saving"
    elif t.device.type != "cpu":
        why = f"is on device {t.device.type}, not in memory"
    if why:
        raise InputError(f"{path}: tensor {name!r} {why}", hint)


def read_torch_file(path: Path) -> dict[str, TensorRef]:
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputError(f"{path}: cannot read file ({exc.strerror})") from None
    if size == 0:
        raise InputError(f"{path}: empty file, not a PyTorch checkpoint", "re-save or re-download it")
    try:
        mmap = zipfile.is_zipfile(path)
    except (OSError, zipfile.BadZipFile) as exc:  # e.g. a corrupt end-of-central-directory record
        raise InputError(f"{path}: not a readable PyTorch checkpoint ({exc})", "re-save or re-download it") from None
    try:
        with warnings.catch_warnings():  # torch warns (multi-line) about odd pickle protocols; we refuse or load
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        why = next((line for line in lines if "Unsupported" in line or "GLOBAL" in line), lines[0] if lines else "")
        # torch's advice ("add_safe_globals", "weights_only=False") is exactly what not to do with untrusted files
        why = re.sub(r"\x1b\[[0-9;]*m", "", why.split("WeightsUnpickler error:")[-1]).split(". Please")[0].strip()
        raise InputError(
            f"{path}: refused: this pickle needs more than weights_only=True to load ({why.strip()[:200]})",
            "only plain tensor state dicts are loaded; convert the checkpoint to safetensors in a trusted environment",
        ) from None
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"{path}: not a readable PyTorch checkpoint ({msg[:200]})", "check the path, or re-save the file"
        ) from None
    tensors = _flatten(obj, path)
    refs: dict[str, TensorRef] = {}
    for name, t in tensors.items():
        _check_plain(t, name, path)
        refs[name] = TensorRef(
            name=name, shape=tuple(t.shape), dtype=t.dtype, loader=(lambda t=t: t), source=str(path)
        )
    return refs
