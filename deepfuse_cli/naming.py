"""Tensor namings: the ecosystem whose names (and layouts) a checkpoint's files use.

One vocabulary for formats (which naming an adapter's files use) and families (a rule names its
tensor in every naming the family has). Light: no imports beyond the standard library.
"""

from __future__ import annotations

from enum import Enum


class Naming(str, Enum):
    """The tensor naming a format's files use (and so the runtime that loads them)."""

    HF = "hf"  # transformers names (``model.layers.0.self_attn.q_proj.weight``), torch layouts, config.json
    T5X = "t5x"  # T5X parameter paths (``target/encoder/layers_0/attention/query/kernel``), kernels [in, out], gin


DESCRIPTIONS = {
    Naming.HF: "transformers names, torch layouts (nn.Linear weights [out, in])",
    Naming.T5X: "T5X/flax names ('target/...'), kernels [in, out]",
}
