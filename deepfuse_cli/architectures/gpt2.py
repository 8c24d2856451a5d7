"""GPT-2 (transformers naming)."""

from __future__ import annotations


def derived(config: dict) -> dict:
    d = config["n_embd"]
    return {"n_inner": config.get("n_inner") or 4 * d, "head_dim": d // config["n_head"]}


def output_scale(config: dict) -> float:
    return 1.0
