"""Llama, Mistral, Qwen2 (transformers naming)."""

from __future__ import annotations


def derived(config: dict) -> dict:
    heads = config.get("num_attention_heads")
    kv = config.get("num_key_value_heads") or heads
    hidden = config.get("hidden_size")
    head_dim = config.get("head_dim") or (hidden // heads if heads and hidden else None)
    return {"head_dim": head_dim, "num_key_value_heads": kv, "kv_ratio": (heads / kv) if heads and kv else None}


def output_scale(config: dict) -> float:
    return 1.0
