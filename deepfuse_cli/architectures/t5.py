"""T5's code hooks (the rules, names in both namings and config fields are in ``t5.json``).

transformers' T5 config is the family's vocabulary. A T5X/Orbax checkpoint carries no config: its
dimensions are inferred from the parameter shapes (``t5x.infer_config``, the T5X vocabulary), turned
into a transformers ``T5Config`` to plan with, and the fused config is turned back into T5X
dimensions for ``fused.gin``.

T5 v1.0 ties the output projection to the embedding and rescales the decoder output by
``d_model ** -0.5`` before it; v1.1 does neither. transformers 5 stores that choice as
``scale_decoder_outputs`` (re-saving ``tie_word_embeddings: true`` always); transformers 4 read it
from ``tie_word_embeddings`` (default true). The preset's ``derived`` and ``output.scale`` say so.
"""

from __future__ import annotations

from . import t5x


#: transformers T5 config fields -> the T5X dimensions they come from (for messages about T5X sources)
T5X_FIELDS = {"d_model": "d_model (emb_dim)", "num_heads": "num_heads", "d_kv": "head_dim", "d_ff": "mlp_dim",
              "num_layers": "num_encoder_layers", "num_decoder_layers": "num_decoder_layers",
              "relative_attention_num_buckets": "num_buckets", "feed_forward_proj": "gated", "vocab_size": "vocab_size"}


def field_label(key: str, naming: str) -> str:
    return T5X_FIELDS.get(key, key) if naming == "t5x" else key


def canonical_config(config: dict, naming: str) -> dict:
    if naming == "t5x" and config.get("model_type") == "t5x":
        return t5x.hf_config(config)
    return config


def naming_config(config: dict, view: dict, naming: str, origin: str, source_naming: str) -> dict:
    """config.json for transformers; the T5X dimensions for T5X (a transformers T5 must use what T5X's
    network hard-codes to become one)."""
    if naming == "t5x":
        return t5x.config_from_hf(view, origin, check_network=source_naming != "t5x")
    return config


def infer_config(shapes, naming: str, origin: str) -> dict | None:
    return t5x.infer_config(shapes, origin) if naming == "t5x" else None


def config_text(config: dict, naming: str, *, note: str, optimizer_state: bool) -> str | None:
    """gin overrides for T5X's T5 network with the fused widths."""
    if naming != "t5x":
        return None
    return t5x.gin_overrides(config, note=f"Model widths of this checkpoint ({note})",
                             optimizer_state=None if optimizer_state else "drop")
