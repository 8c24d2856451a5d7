"""numpy <-> torch without surprises: bfloat16 (ml_dtypes) and the dtype names JAX formats use.

torch cannot wrap an ``ml_dtypes.bfloat16`` array directly, so bfloat16 goes through a
uint16 view (no copy). Names are numpy's (``float32``, ``bfloat16``, ...), as T5X msgpack
headers, zarr ``.zarray`` files and Orbax metadata write them.
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import torch

from ..errors import InputError

NUMPY_TO_TORCH: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
TORCH_TO_NUMPY: dict[torch.dtype, str] = {v: k for k, v in NUMPY_TO_TORCH.items()}


def numpy_dtype(name: str) -> np.dtype:
    """A numpy dtype from its name, bfloat16 included."""
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def torch_dtype(dtype: np.dtype | str, origin: str = "") -> torch.dtype:
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    try:
        return NUMPY_TO_TORCH[name]
    except KeyError:
        raise InputError(f"{origin}: unsupported dtype {name}" if origin else f"unsupported dtype {name}") from None


def to_torch(array: np.ndarray) -> torch.Tensor:
    """A torch tensor sharing memory with ``array`` where possible (bfloat16 via a uint16 view)."""
    a = np.require(array, requirements="C")  # unlike ascontiguousarray, keeps 0-d arrays 0-d
    if a.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    if not a.flags.writeable:  # torch warns on read-only buffers; callers treat loads as read-only anyway
        a = a.copy()
    return torch.from_numpy(a)


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A numpy array sharing memory with a contiguous CPU tensor (bfloat16 as ml_dtypes.bfloat16)."""
    t = tensor.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


# Checks made before any array is handed to tensorstore: it aborts the whole process (std::bad_alloc)
# when an allocation fails, so sizes read from a checkpoint must be plausible before it sees them.
def check_chunk_shape(shape: tuple[int, ...], chunks: tuple[int, ...], where: str, hint: str) -> None:
    """zarr ``chunks`` that fit their array (one chunk is what tensorstore allocates at once: a chunk
    larger than the array only comes from a damaged or crafted file)."""
    if len(chunks) != len(shape) or not all(1 <= c <= max(s, 1) for s, c in zip(shape, chunks)):
        raise InputError(f"{where}: zarr chunk shape {list(chunks)} does not fit the array shape {list(shape)}", hint)


def check_fits_memory(shape: tuple[int, ...], itemsize: int, where: str) -> None:
    """An array about to be read whole must fit this machine's memory."""
    nbytes = itemsize
    for s in shape:
        nbytes *= s
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return
    if nbytes > ram:
        raise InputError(f"{where}: the array claims shape {list(shape)} ({nbytes} bytes), more than this machine's "
                         f"memory ({ram} bytes)", "the checkpoint's metadata is damaged, or read it on a larger machine")
