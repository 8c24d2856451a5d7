"""GPT-2 (transformers naming)."""

from __future__ import annotations


def derived(config: dict) -> dict:
    d, heads = config.get("n_embd"), config.get("n_head")
    return {"n_inner": config.get("n_inner") or (4 * d if d else None), "head_dim": d // heads if d and heads else None}


def output_scale(config: dict) -> float:
    return 1.0
