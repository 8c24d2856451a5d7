"""An independent numpy forward pass of T5X's T5 example network (``t5x/examples/t5/network.py``, ``layers.py``).

Written from the network's semantics, not from the converter's name table, so it can check that table: it reads a
T5X parameter tree directly (the flat ``target/...`` names of ``open_checkpoint(path).tensors``) and computes the
logits T5X would, with dropout off (``enable_dropout=False``, non-incremental decoding):

* token embedding: a row lookup of ``token_embedder/embedding`` [vocab, emb] (T5X's one-hot matmul is the same);
* T5 layer norm: ``x / sqrt(mean(x^2) + 1e-6) * scale`` — no mean subtraction, no bias;
* attention: ``DenseGeneral`` kernels [emb, heads * head_dim] reshaped row-major to [emb, heads, head_dim] (heads
  outer), logits ``q . k`` with *no* ``1/sqrt(head_dim)`` (T5X folds it into the query initialiser), plus the
  relative position bias and the mask bias (``-1e10`` where masked), softmax over keys, output kernel
  [heads * head_dim, emb];
* relative position biases: ``relpos_bias/rel_embedding`` [heads, 32 buckets], max distance 128, one table per
  stack shared by all its layers, bidirectional in the encoder, causal (only past distances) in the decoder;
  cross-attention has no position bias;
* MLP: ``wi`` + relu (T5 1.0, ``mlp_activations=('relu',)``), or ``gelu(x @ wi_0) * (x @ wi_1)`` (T5 1.1,
  ``('gelu', 'linear')``; flax's ``nn.gelu`` is ``jax.nn.gelu``, whose default is the tanh approximation), then
  ``wo``;
* pre-norm residual blocks, ``encoder_norm`` / ``decoder_norm`` at the end of each stack;
* logits: ``y @ logits_dense/kernel``, or ``y @ embedding.T / sqrt(emb)`` when there is no ``logits_dense``
  (``logits_via_embedding``).

Masks follow ``Transformer.encode`` / ``decode``: token id 0 is padding (encoder pairwise padding mask, decoder
padding from ``decoder_target_tokens``), the decoder self-attention is causal.

``groups`` replaces every layer norm by a grouped one (each slice of the hidden state normalised on its own, the
scale shared), the norm a model fused with ``--norm prop`` needs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

PREFIX = "target/"
NUM_BUCKETS = 32
MAX_DISTANCE = 128
EPSILON = 1e-6
MASKED = -1e10


def load_params(path: str | Path) -> dict[str, np.ndarray]:
    """The ``target/...`` parameters of a T5X / Orbax checkpoint as numpy arrays."""
    from deepfuse_cli.formats import open_checkpoint

    ck = open_checkpoint(Path(path))
    return {name: ref.load().numpy() for name, ref in ck.tensors.items() if name.startswith(PREFIX)}


def relative_position_bucket(relative_position: np.ndarray, bidirectional: bool, num_buckets: int = NUM_BUCKETS,
                             max_distance: int = MAX_DISTANCE) -> np.ndarray:
    """Bucket of ``memory_position - query_position``.

    Bidirectional: half the buckets for keys at or before the query, half for keys after it. Causal: keys after the
    query all fall in bucket 0 (they are masked anyway). Within a half, distances below ``max_exact`` (a quarter of
    all buckets bidirectionally, half of them causally) get their own bucket; larger ones share log-spaced buckets up
    to ``max_distance``, beyond which they all land in the last one. T5X computes the log in float32 with
    ``float32 eps`` added to the ratio.
    """
    distance = -np.asarray(relative_position, dtype=np.int64)  # query - memory: > 0 for past keys
    bucket = np.zeros(distance.shape, dtype=np.int64)
    if bidirectional:
        num_buckets //= 2
        bucket += np.where(distance < 0, num_buckets, 0)
        distance = np.abs(distance)
    else:
        distance = np.maximum(distance, 0)
    max_exact = num_buckets // 2
    ratio = distance.astype(np.float32) / np.float32(max_exact) + np.finfo(np.float32).eps
    log_bucket = (np.log(ratio) / np.float32(math.log(max_distance / max_exact))
                  * np.float32(num_buckets - max_exact)).astype(np.int64)
    large = np.minimum(max_exact + log_bucket, num_buckets - 1)
    return bucket + np.where(distance < max_exact, distance, large)


def position_bias(table: np.ndarray, qlen: int, klen: int, bidirectional: bool) -> np.ndarray:
    """[1, heads, qlen, klen] bias from a [heads, buckets] ``rel_embedding``."""
    rel = np.arange(klen)[None, :] - np.arange(qlen)[:, None]
    buckets = relative_position_bucket(rel, bidirectional, num_buckets=table.shape[1])
    return table[:, buckets][None]


def rms_norm(x: np.ndarray, scale: np.ndarray, groups: Sequence[int] | None = None) -> np.ndarray:
    widths = list(groups) if groups else [x.shape[-1]]
    assert sum(widths) == x.shape[-1], f"norm groups {widths} do not cover width {x.shape[-1]}"
    parts = np.split(x, np.cumsum(widths)[:-1], axis=-1)
    normed = [p / np.sqrt(np.mean(np.square(p), axis=-1, keepdims=True) + EPSILON) for p in parts]
    return np.concatenate(normed, axis=-1) * scale


def gelu(x: np.ndarray) -> np.ndarray:
    """The tanh approximation (``jax.nn.gelu(x, approximate=True)``, flax's ``nn.gelu``)."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def mask_bias(mask: np.ndarray, dtype) -> np.ndarray:
    return np.where(mask, 0.0, MASKED).astype(dtype)


class Reference:
    """T5X's T5 ``Transformer`` on a flat parameter dict; ``dtype`` is the activation dtype."""

    def __init__(self, params: Mapping[str, np.ndarray], groups: Sequence[int] | None = None, dtype=np.float32):
        self.dtype = np.dtype(dtype)
        self.p = {k.removeprefix(PREFIX): np.asarray(v, self.dtype) for k, v in params.items()}
        self.groups = list(groups) if groups else None
        self.vocab, self.emb = self.p["token_embedder/embedding"].shape
        self.heads = self.p["encoder/relpos_bias/rel_embedding"].shape[0]

    def _layers(self, stack: str) -> int:
        n = 0
        while f"{stack}/layers_{n}/pre_mlp_layer_norm/scale" in self.p:
            n += 1
        return n

    def norm(self, name: str, x: np.ndarray) -> np.ndarray:
        return rms_norm(x, self.p[f"{name}/scale"], self.groups)

    def attention(self, name: str, xq: np.ndarray, xkv: np.ndarray, bias: np.ndarray) -> np.ndarray:
        def project(which, x):
            k = self.p[f"{name}/{which}/kernel"]
            return np.einsum("bld,dhk->blhk", x, k.reshape(k.shape[0], self.heads, -1))

        q, k, v = project("query", xq), project("key", xkv), project("value", xkv)
        weights = softmax(np.einsum("bqhd,bkhd->bhqk", q, k) + bias)  # no 1/sqrt(head_dim)
        out = np.einsum("bhqk,bkhd->bqhd", weights, v)
        wo = self.p[f"{name}/out/kernel"]
        return np.einsum("bqhd,hde->bqe", out, wo.reshape(self.heads, -1, wo.shape[1]))

    def mlp(self, name: str, x: np.ndarray) -> np.ndarray:
        if f"{name}/wi/kernel" in self.p:
            h = np.maximum(x @ self.p[f"{name}/wi/kernel"], 0.0)
        else:
            h = gelu(x @ self.p[f"{name}/wi_0/kernel"]) * (x @ self.p[f"{name}/wi_1/kernel"])
        return h @ self.p[f"{name}/wo/kernel"]

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        return self.p["token_embedder/embedding"][np.asarray(tokens)]

    def encode(self, tokens: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        tokens = np.asarray(tokens)
        valid = tokens > 0
        bias = (position_bias(self.p["encoder/relpos_bias/rel_embedding"], tokens.shape[1], tokens.shape[1], True)
                + mask_bias(valid[:, None, :, None] & valid[:, None, None, :], self.dtype))
        x = self.embed(tokens)
        hidden = [x]
        for i in range(self._layers("encoder")):
            name = f"encoder/layers_{i}"
            x = x + self.attention(f"{name}/attention", self.norm(f"{name}/pre_attention_layer_norm", x),
                                   self.norm(f"{name}/pre_attention_layer_norm", x), bias)
            x = x + self.mlp(f"{name}/mlp", self.norm(f"{name}/pre_mlp_layer_norm", x))
            hidden.append(x)
        return self.norm("encoder/encoder_norm", x), hidden

    def decode(self, encoded: np.ndarray, encoder_tokens: np.ndarray, decoder_tokens: np.ndarray,
               decoder_target_tokens: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        decoder_tokens = np.asarray(decoder_tokens)
        target = np.ones_like(decoder_tokens) if decoder_target_tokens is None else np.asarray(decoder_target_tokens)
        length = decoder_tokens.shape[1]
        causal = np.arange(length)[:, None] >= np.arange(length)[None, :]
        live = target > 0
        self_bias = (position_bias(self.p["decoder/relpos_bias/rel_embedding"], length, length, False)
                     + mask_bias(causal[None, None] & live[:, None, :, None] & live[:, None, None, :], self.dtype))
        cross_bias = mask_bias(live[:, None, :, None] & (np.asarray(encoder_tokens) > 0)[:, None, None, :], self.dtype)
        y = self.embed(decoder_tokens)
        hidden = [y]
        for i in range(self._layers("decoder")):
            name = f"decoder/layers_{i}"
            h = self.norm(f"{name}/pre_self_attention_layer_norm", y)
            y = y + self.attention(f"{name}/self_attention", h, h, self_bias)
            y = y + self.attention(f"{name}/encoder_decoder_attention",
                                   self.norm(f"{name}/pre_cross_attention_layer_norm", y), encoded, cross_bias)
            y = y + self.mlp(f"{name}/mlp", self.norm(f"{name}/pre_mlp_layer_norm", y))
            hidden.append(y)
        y = self.norm("decoder/decoder_norm", y)
        if "decoder/logits_dense/kernel" in self.p:
            logits = y @ self.p["decoder/logits_dense/kernel"]
        else:  # logits_via_embedding
            logits = (y @ self.p["token_embedder/embedding"].T) / np.sqrt(np.asarray(y.shape[-1], self.dtype))
        return logits, hidden

    def __call__(self, encoder_tokens, decoder_tokens, decoder_target_tokens=None):
        """(logits [batch, dec_len, vocab], residual stream after the embedding and each layer: encoder then decoder)."""
        encoded, enc_hidden = self.encode(encoder_tokens)
        logits, dec_hidden = self.decode(encoded, encoder_tokens, decoder_tokens, decoder_target_tokens)
        return logits, enc_hidden + dec_hidden


def logits(params: Mapping[str, np.ndarray], encoder_tokens, decoder_tokens, groups=None, dtype=np.float32):
    return Reference(params, groups, dtype)(encoder_tokens, decoder_tokens)[0]
