"""Per-family knowledge that rules cannot say: derived dimensions, output scale, reference forward.

Each family module defines ``derived(config) -> dict`` (dimensions implied by defaults, e.g.
``head_dim = hidden_size // num_attention_heads``, compared across sources and optionally
written explicitly) and ``output_scale(config) -> float`` (a source-side factor applied to the
hidden state before the output projection, folded into the fused projection).
"""

from __future__ import annotations

from types import ModuleType

from . import gpt2, llama, mlp, t5, t5x

FAMILIES: dict[str, ModuleType] = {"llama": llama, "gpt2": gpt2, "t5": t5, "t5x": t5x, "mlp": mlp}


def get_family(name: str | None) -> ModuleType | None:
    return FAMILIES.get(name) if name else None


def derived(family: str | None, config: dict | None) -> dict:
    mod = get_family(family)
    if mod is None or config is None:
        return {}
    return mod.derived(config)


def output_scale(family: str | None, config: dict | None) -> float:
    mod = get_family(family)
    if mod is None or config is None:
        return 1.0
    return mod.output_scale(config)
