"""T5 in T5X naming (``t5x/examples/t5/network.py``): dimensions and config vocabulary.

A T5X checkpoint carries no config: the model dimensions are inferred from the parameter
shapes (and checked for consistency across layers), giving the same kind of dict a
Hugging Face ``config.json`` gives the other families. ``logits_via_embedding`` (T5 1.0
style: no ``logits_dense``; logits from the embedding, divided by ``sqrt(emb_dim)``) is
untied exactly in the fused model, like transformers' tied T5 v1.0.

The names of every T5 tensor in both namings (and which are transposed: T5X kernels are [in, out],
torch ``nn.Linear`` weights [out, in]; T5X relative position biases [heads, buckets], transformers'
[buckets, heads]) are data, in the t5 preset.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ..errors import InputError

PREFIX = "target/"
EMBEDDING = "target/token_embedder/embedding"
LOGITS = "target/decoder/logits_dense/kernel"
#: T5X defaults for T5 1.1 (``RelativePositionBiases`` in network.py, ``T5Config``)
RELPOS_MAX_DISTANCE = 128
RELPOS_BUCKETS = 32
LAYER_NORM_EPSILON = 1e-6

def _layers(names, stack: str) -> int:
    found = {int(m.group(1)) for n in names if (m := re.match(rf"{PREFIX}{stack}/layers_(\d+)/", n))}
    if found and found != set(range(max(found) + 1)):
        missing = sorted(set(range(max(found) + 1)) - found)
        raise InputError(f"{stack} layers are not numbered 0..{max(found)}: layers_{missing[0]} is missing",
                         "the checkpoint is incomplete")
    return len(found)


def infer_config(shapes: Mapping[str, tuple[int, ...]], origin: str) -> dict | None:
    """Model dimensions of a T5X T5 checkpoint from its parameter shapes; None if it is not one."""
    if EMBEDDING not in shapes:
        return None

    def shape(name: str, rank: int) -> tuple[int, ...]:
        if name not in shapes:
            raise InputError(f"{origin}: T5X parameter {name!r} is missing", "the checkpoint is not a complete T5X T5 model")
        s = tuple(shapes[name])
        if len(s) != rank:
            raise InputError(f"{origin}: {name} has shape {list(s)}, expected {rank} axes")
        return s

    vocab, emb = shape(EMBEDDING, 2)
    heads, buckets = shape(f"{PREFIX}encoder/relpos_bias/rel_embedding", 2)
    q = shape(f"{PREFIX}encoder/layers_0/attention/query/kernel", 2)
    if heads < 1 or q[1] % heads:
        raise InputError(f"{origin}: attention width {q[1]} is not a multiple of the {heads} heads of relpos_bias")
    gated = f"{PREFIX}encoder/layers_0/mlp/wi_0/kernel" in shapes
    mlp = shape(f"{PREFIX}encoder/layers_0/mlp/{'wi_0' if gated else 'wi'}/kernel", 2)[1]
    config = {
        "model_type": "t5x",
        "vocab_size": vocab,
        "d_model": emb,
        "num_heads": heads,
        "head_dim": q[1] // heads,
        "mlp_dim": mlp,
        "num_encoder_layers": _layers(shapes, "encoder"),
        "num_decoder_layers": _layers(shapes, "decoder"),
        "num_buckets": buckets,
        "gated": gated,
        "logits_via_embedding": LOGITS not in shapes,
    }
    _check_consistent(shapes, config, origin)
    return config


def _check_consistent(shapes: Mapping[str, tuple[int, ...]], c: dict, origin: str) -> None:
    d, hd, f = c["d_model"], c["num_heads"] * c["head_dim"], c["mlp_dim"]
    expect = {
        r"(encoder|decoder)/relpos_bias/rel_embedding": (c["num_heads"], c["num_buckets"]),
        r".*/(query|key|value)/kernel": (d, hd),
        r".*/out/kernel": (hd, d),
        r".*/mlp/wi(_0|_1)?/kernel": (d, f),
        r".*/mlp/wo/kernel": (f, d),
        r".*/scale": (d,),
        r"decoder/logits_dense/kernel": (d, c["vocab_size"]),
    }
    for name, s in shapes.items():
        if not name.startswith(PREFIX):
            continue
        rel = name[len(PREFIX):]
        for pattern, want in expect.items():
            if re.fullmatch(pattern, rel) and tuple(s) != want:
                raise InputError(f"{origin}: {name} has shape {list(s)}, but the model's other parameters imply {list(want)}",
                                 "the checkpoint mixes parameters of different model sizes")


def hf_config(config: dict) -> dict:
    """A transformers ``T5Config`` (as config.json) for a T5X T5 of these dimensions."""
    tied = bool(config.get("logits_via_embedding"))
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": config["vocab_size"],
        "d_model": config["d_model"],
        "d_kv": config["head_dim"],
        "d_ff": config["mlp_dim"],
        "num_heads": config["num_heads"],
        "num_layers": config["num_encoder_layers"],
        "num_decoder_layers": config["num_decoder_layers"],
        "relative_attention_num_buckets": config["num_buckets"],
        "relative_attention_max_distance": config.get("relative_attention_max_distance", RELPOS_MAX_DISTANCE),
        "feed_forward_proj": "gated-gelu" if config["gated"] else "relu",
        "dense_act_fn": "gelu_new" if config["gated"] else "relu",
        "is_gated_act": bool(config["gated"]),
        "layer_norm_epsilon": LAYER_NORM_EPSILON,
        "dropout_rate": 0.0,
        "initializer_factor": 1.0,
        "is_encoder_decoder": True,
        "tie_word_embeddings": tied,
        "scale_decoder_outputs": tied,
        "decoder_start_token_id": 0,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "dtype": config.get("dtype", "float32"),
    }


def config_from_hf(hf: dict, origin: str, check_network: bool = True) -> dict:
    """The T5X dimensions of a transformers T5 config viewed through the t5 family (its derived
    ``num_decoder_layers`` and ``scale_decoder_outputs`` present), for --to t5x / orbax;
    ``check_network``: refuse what T5X's T5 network cannot compute (a config that came from a T5X
    checkpoint is what it is)."""
    buckets = hf.get("relative_attention_num_buckets", 32)
    distance = hf.get("relative_attention_max_distance", RELPOS_MAX_DISTANCE)
    if check_network and (buckets, distance) != (RELPOS_BUCKETS, RELPOS_MAX_DISTANCE):
        raise InputError(f"{origin}: relative attention uses {buckets} buckets and max distance {distance}, but T5X's T5 "
                         f"network fixes them at {RELPOS_BUCKETS} and {RELPOS_MAX_DISTANCE}: the T5X model would compute "
                         "a different function", "keep the Hugging Face format (omit --to)")
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in ("relu", "gated-gelu"):
        raise InputError(f"{origin}: feed_forward_proj {proj!r} has no T5X counterpart in the T5 example network",
                         "only relu (T5 1.0) and gated-gelu (T5 1.1) models convert")
    return {
        "model_type": "t5x",
        "vocab_size": hf["vocab_size"],
        "d_model": hf["d_model"],
        "num_heads": hf["num_heads"],
        "head_dim": hf["d_kv"],
        "mlp_dim": hf["d_ff"],
        "num_encoder_layers": hf["num_layers"],
        "num_decoder_layers": hf["num_decoder_layers"],
        "num_buckets": buckets,
        "gated": proj == "gated-gelu",
        "logits_via_embedding": bool(hf["scale_decoder_outputs"]),
    }


def gin_overrides(config: dict, *, note: str, optimizer_state: str | None) -> str:
    """gin lines for T5X's T5 example network with these widths (head_dim unchanged)."""
    lines = [
        f"# {note}",
        "# Include after the model's own gin file: --gin_file=<model>.gin --gin_file=fused.gin",
        f"network.T5Config.emb_dim = {config['d_model']}",
        f"network.T5Config.num_heads = {config['num_heads']}",
        f"network.T5Config.head_dim = {config['head_dim']}",
        f"network.T5Config.mlp_dim = {config['mlp_dim']}",
        f"network.T5Config.logits_via_embedding = {bool(config.get('logits_via_embedding'))}",
    ]
    if optimizer_state == "drop":
        lines += [
            "",
            "# The optimizer state was not carried over (--optimizer-state drop): restore the parameters",
            "# and start the optimizer from scratch.",
            "utils.RestoreCheckpointConfig.assignment_map = ((r'state/param_states.*', None),)",
            "utils.RestoreCheckpointConfig.fallback_to_scratch = True",
        ]
    return "\n".join(lines) + "\n"
