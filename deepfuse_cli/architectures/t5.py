"""T5 (transformers naming).

T5 v1.0 ties the output projection to the embedding and rescales the decoder output by
``d_model ** -0.5`` before it; v1.1 does neither. transformers 5 stores that choice as
``scale_decoder_outputs`` (re-saving ``tie_word_embeddings: true`` always); transformers 4
read it from ``tie_word_embeddings`` (default true). The fused model is untied and
unscaled, so each source's factor is folded into its block of the fused ``lm_head``.
"""

from __future__ import annotations


def derived(config: dict) -> dict:
    return {"num_decoder_layers": config.get("num_decoder_layers") or config.get("num_layers")}


def scales_decoder_outputs(config: dict) -> bool:
    if "scale_decoder_outputs" in config:
        return bool(config["scale_decoder_outputs"])
    return config.get("tie_word_embeddings", True) is not False


def output_scale(config: dict) -> float:
    return config["d_model"] ** -0.5 if scales_decoder_outputs(config) else 1.0
