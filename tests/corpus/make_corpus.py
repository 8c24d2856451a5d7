"""Generate the bad-input corpus: tiny checkpoints that are broken (or mismatched) in one way each.

    python tests/corpus/make_corpus.py            # (re)write the corpus next to this script
    python tests/corpus/make_corpus.py --out DIR  # write it elsewhere (the tests check it is reproducible)

Everything is written byte-for-byte deterministically with the standard library and numpy only
(safetensors headers and the pickle zip are built by hand, tensor values are exact fp16
numbers from integer arithmetic), so the committed files can always be regenerated and
compared. Each case is a directory named after its defect (``CASES`` below says what each
one is); ``good/`` is the positive control that every mismatch is fused against.

Nothing here is ever loaded with a full unpickler by deepfuse: ``evil-pickle`` holds a pickle
whose ``__reduce__`` would create the file ``PAYLOAD_MARKER`` in the current directory, and the
tests assert it never appears.
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PAYLOAD_MARKER = "deepfuse-corpus-payload-ran"

# A tiny Llama (one layer, GQA ratio 2): the shapes everything else varies.
BASE_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 4,
    "vocab_size": 16,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "max_position_embeddings": 32,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
}

CASES = {
    "good": "a valid tiny Llama (positive control)",
    "truncated": "model.safetensors cut short: the header promises more data than the file holds",
    "garbage-header": "the 8-byte length is sane but the header bytes are not JSON",
    "header-too-long": "the header length field is larger than the whole file",
    "invalid-json": "the header is JSON cut off in the middle",
    "non-utf8-name": "a tensor name that is not valid UTF-8",
    "offsets-overlap": "two tensors' data_offsets overlap",
    "offsets-out-of-bounds": "data_offsets point past the end of the data",
    "size-mismatch": "data_offsets span fewer bytes than shape x dtype",
    "unknown-dtype": "a dtype safetensors does not define",
    "duplicate-across-shards": "the same tensor stored in two shards",
    "index-missing-shard": "the index names a shard file that does not exist",
    "index-missing-tensor": "the index lists a tensor its shard does not contain",
    "index-path-traversal": "the index names a shard outside the model directory",
    "zero-length": "model.safetensors is an empty file",
    "no-weights": "a model directory with config.json but no weights",
    "config-bad-field": "config.json whose num_attention_heads is a string",
    "evil-pickle": "pytorch_model.bin whose pickle runs code on load (__reduce__)",
    "garbage-pickle": "pytorch_model.bin that is not a pickle at all",
    "vocab-mismatch": "valid, but vocab_size 17 (good: 16)",
    "depth-mismatch": "valid, but 2 layers (good: 1)",
    "head-dim-mismatch": "valid, but head_dim 2 with 4 query heads (good: 4 with 2)",
    "gqa-mismatch": "valid, but no grouping: 2 KV heads for 2 query heads (good: ratio 2)",
    "family-mismatch": "a GPT-2 config (good: Llama)",
    "unclaimed-tensor": "valid Llama plus a tensor no llama rule claims",
    "markup-name": "valid Llama plus an unclaimed tensor whose name looks like console markup",
    "nonfinite": "valid Llama with NaN and Inf in one MLP weight",
    "rules-unknown-field.json": "a rules file with a field the schema does not know",
    "rules-invalid-regex.json": "a rules file whose pattern is not a regular expression",
}


# ---- tensors and safetensors bytes ------------------------------------------------------------
def values(shape: tuple[int, ...], salt: int) -> np.ndarray:
    """Deterministic small fp16 values (exact: integers / 512), different per tensor."""
    n = int(np.prod(shape)) if shape else 1
    i = np.arange(n, dtype=np.int64)
    return (((i * 37 + salt * 11) % 101 - 50) / 512).astype(np.float16).reshape(shape)


def llama_tensors(cfg: dict) -> dict[str, np.ndarray]:
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd, heads, kv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,), "lm_head.weight": (vocab, h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "self_attn.q_proj.weight": (heads * hd, h),
            p + "self_attn.k_proj.weight": (kv * hd, h),
            p + "self_attn.v_proj.weight": (kv * hd, h),
            p + "self_attn.o_proj.weight": (h, heads * hd),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        })
    return {name: values(shape, salt) for salt, (name, shape) in enumerate(sorted(shapes.items()))}


def header_entries(tensors: dict[str, np.ndarray]) -> tuple[dict, bytes]:
    """The header entries (name -> dtype/shape/offsets) and the data buffer, in name order."""
    entries, data, pos = {}, b"", 0
    for name in sorted(tensors):
        raw = tensors[name].astype("<f2").tobytes()
        entries[name] = {"dtype": "F16", "shape": list(tensors[name].shape), "data_offsets": [pos, pos + len(raw)]}
        data += raw
        pos += len(raw)
    return entries, data


def st_file(header: dict | bytes, data: bytes, length: int | None = None) -> bytes:
    """A safetensors file: 8-byte little-endian header length, header (space-padded to 8), data."""
    raw = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    entries, data = header_entries(tensors)
    return st_file({"__metadata__": {"format": "pt"}, **entries}, data)


# ---- writers ----------------------------------------------------------------------------------
def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def model_dir(out: Path, name: str, cfg: dict, weights: bytes | None = None, fname: str = "model.safetensors") -> Path:
    d = out / name
    d.mkdir(parents=True)
    write_json(d / "config.json", cfg)
    if weights is not None:
        (d / fname).write_bytes(weights)
    return d


def sharded(out: Path, name: str, shards: dict[str, dict[str, np.ndarray]], weight_map: dict[str, str]) -> None:
    d = model_dir(out, name, BASE_CONFIG)
    for fname, tensors in shards.items():
        (d / fname).write_bytes(safetensors_bytes(tensors))
    write_json(d / "model.safetensors.index.json", {"metadata": {"total_size": 0}, "weight_map": weight_map})


class _Payload:
    """Pickles as a call to exec: loading it with a full unpickler creates PAYLOAD_MARKER."""

    def __reduce__(self):
        return (exec, (f"open({PAYLOAD_MARKER!r}, 'w').close()",))


def torch_zip(records: dict[str, bytes], prefix: str = "archive") -> bytes:
    """A zip laid out like torch.save's (data.pkl, byteorder, version), without timestamps."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, content in records.items():
            info = zipfile.ZipInfo(f"{prefix}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            z.writestr(info, content)
    return buf.getvalue()


# ---- the corpus -------------------------------------------------------------------------------
def generate(out: Path) -> None:
    good = llama_tensors(BASE_CONFIG)
    good_bytes = safetensors_bytes(good)
    entries, data = header_entries(good)
    names = sorted(good)

    model_dir(out, "good", BASE_CONFIG, good_bytes)
    model_dir(out, "truncated", BASE_CONFIG, good_bytes[: len(good_bytes) - 100])
    model_dir(out, "garbage-header", BASE_CONFIG, st_file(bytes(range(200, 256)) + b"\x00" * 8, data))
    model_dir(out, "header-too-long", BASE_CONFIG, st_file({"a": 1}, b"", length=10**9))
    model_dir(out, "invalid-json", BASE_CONFIG, st_file(json.dumps(entries).encode()[:150], data))

    bad_name = json.dumps({"model.norm.weight": entries["model.norm.weight"]}).encode()
    bad_name = bad_name.replace(b"model.norm.weight", b"model.\xff\xfe.weight")
    model_dir(out, "non-utf8-name", BASE_CONFIG, st_file(bad_name, data[:16]))

    lie = json.loads(json.dumps(entries))
    second = names[1]
    lie[second]["data_offsets"] = [o - 8 for o in lie[second]["data_offsets"]]  # overlaps the first tensor
    model_dir(out, "offsets-overlap", BASE_CONFIG, st_file(lie, data))
    lie = json.loads(json.dumps(entries))
    lie[names[-1]]["data_offsets"][1] += 64
    model_dir(out, "offsets-out-of-bounds", BASE_CONFIG, st_file(lie, data))
    norm = {"model.norm.weight": {"dtype": "F16", "shape": [8], "data_offsets": [0, 8]}}  # 8 x F16 = 16 bytes
    model_dir(out, "size-mismatch", BASE_CONFIG, st_file(norm, data[:8]))
    norm = {"model.norm.weight": {"dtype": "F7", "shape": [8], "data_offsets": [0, 16]}}
    model_dir(out, "unknown-dtype", BASE_CONFIG, st_file(norm, data[:16]))

    half = len(names) // 2
    first = {n: good[n] for n in names[:half]}
    rest = {n: good[n] for n in names[half:]}
    dup = names[0]
    two = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    wmap = {n: two[0] for n in first} | {n: two[1] for n in rest}
    sharded(out, "duplicate-across-shards", {two[0]: first, two[1]: {**rest, dup: good[dup]}}, wmap)
    sharded(out, "index-missing-shard", {two[0]: first}, wmap)
    sharded(out, "index-missing-tensor", {two[0]: first, two[1]: {n: good[n] for n in names[half + 1:]}}, wmap)
    sharded(out, "index-path-traversal", {two[0]: first, two[1]: rest},
            wmap | {names[-1]: "../good/model.safetensors"})

    model_dir(out, "zero-length", BASE_CONFIG, b"")
    model_dir(out, "no-weights", BASE_CONFIG)
    model_dir(out, "config-bad-field", {**BASE_CONFIG, "num_attention_heads": "two"}, good_bytes)

    evil = pickle.dumps({"model.norm.weight": _Payload()}, protocol=2)
    model_dir(out, "evil-pickle", BASE_CONFIG,
              torch_zip({"data.pkl": evil, "byteorder": b"little", "version": b"3\n"}), "pytorch_model.bin")
    model_dir(out, "garbage-pickle", BASE_CONFIG, bytes(range(256)) * 4, "pytorch_model.bin")

    for name, change in (("vocab-mismatch", {"vocab_size": 17}), ("depth-mismatch", {"num_hidden_layers": 2}),
                         ("head-dim-mismatch", {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 2}),
                         ("gqa-mismatch", {"num_key_value_heads": 2})):
        cfg = {**BASE_CONFIG, **change}
        model_dir(out, name, cfg, safetensors_bytes(llama_tensors(cfg)))
    gpt2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 8, "n_head": 2, "n_layer": 1,
            "n_positions": 32, "vocab_size": 16, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-05,
            "tie_word_embeddings": True}
    model_dir(out, "family-mismatch", gpt2, safetensors_bytes({"transformer.wte.weight": values((16, 8), 0)}))

    model_dir(out, "unclaimed-tensor", BASE_CONFIG,
              safetensors_bytes({**good, "model.layers.0.self_attn.mystery.weight": values((8,), 99)}))
    model_dir(out, "markup-name", BASE_CONFIG, safetensors_bytes({**good, "[/red]model.extra[bold]": values((8,), 98)}))

    nonfinite = dict(good)
    up = nonfinite["model.layers.0.mlp.up_proj.weight"].copy()
    up.reshape(-1)[[3, 50, 77]] = [np.nan, np.inf, -np.inf]
    nonfinite["model.layers.0.mlp.up_proj.weight"] = up
    model_dir(out, "nonfinite", BASE_CONFIG, safetensors_bytes(nonfinite))

    rule = {"pattern": "model\\.norm\\.weight", "op": "concat", "axes": ["hidden"], "norm": True}
    base_rules = {"name": "corpus", "description": "corpus rules", "model_types": ["llama"], "rules": [rule]}
    write_json(out / "rules-unknown-field.json", {**base_rules, "rules": [{**rule, "colour": "blue"}]})
    write_json(out / "rules-invalid-regex.json", {**base_rules, "rules": [{**rule, "pattern": "model\\.(norm"}]})

    lines = ["# Bad-input corpus", "", "Generated by `python tests/corpus/make_corpus.py`; do not edit by hand.", ""]
    lines += [f"* `{name}`: {what}" for name, what in CASES.items()]
    (out / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE, help="where to write the corpus (default: beside this script)")
    args = ap.parse_args()
    out = args.out
    for name in CASES:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    generate(out)
    print(f"wrote {len(CASES)} cases to {out}")


if __name__ == "__main__":
    main()
