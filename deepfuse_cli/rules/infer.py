"""Infer a rules file for a family no preset names, from the model transformers builds for its config.

The model is built from ``config.json`` on the meta device (no weights are read), twice: once from the
config as given (the names and the tied output) and once from a *probe* config whose widths (hidden size,
heads x head size, key/value heads x head size, MLP width) are all different numbers, so that every
Linear's in/out features name their axis roles unambiguously. Each parameter is then classified by its
module: embeddings, Linear layers (block-diagonal), their biases, norm modules (by class name) and the
output projection (averaged). Whatever cannot be classified is reported, never guessed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, UsageError
from .schema import Preset

#: config.json fields naming the model width, the MLP width, and the vocabulary, first found wins.
HIDDEN_FIELDS = ("hidden_size", "d_model", "n_embd")
MLP_FIELDS = ("intermediate_size", "ffn_dim", "n_inner", "d_ff")
#: config.json fields that are bookkeeping, not architecture: sources may differ in them.
FREE_FIELDS = {"architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path", "initializer_range",
               "use_cache", "output_attentions", "output_hidden_states", "return_dict", "tie_word_embeddings"}
#: Probe widths: distinct, and distinct from the small multiples a fused projection would give.
PROBE_HIDDEN, PROBE_HEADS, PROBE_KV_HEADS, PROBE_HEAD_DIM, PROBE_MLP = 36, 6, 2, 10, 44
PROBE_HIDDEN_NO_HEAD_DIM, PROBE_HEADS_NO_HEAD_DIM = 32, 4  # head_dim derived as hidden // heads
LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass
class Classified:
    """One parameter template ({layer} for layer numbers), what it is, and its rule (None: unclassified)."""

    template: str
    module: str
    shape: tuple[int, ...]
    rule: dict[str, Any] | None
    why: str


@dataclass
class Inference:
    preset: dict[str, Any]
    rows: list[Classified] = field(default_factory=list)

    @property
    def unclassified(self) -> list[Classified]:
        return [r for r in self.rows if r.rule is None]

    def validated(self) -> Preset:
        return Preset.model_validate(self.preset)


def _first(config: dict, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if isinstance(config.get(n), int) and not isinstance(config.get(n), bool)), None)


def _transformers():
    try:
        import torch
        import transformers
    except ImportError:
        raise UsageError("inferring rules builds the model with transformers, which is not installed",
                         "pip install 'deepfuse[verify]'") from None
    return torch, transformers


def _build(config: dict, src: Path):
    """The causal LM transformers builds for this config, on the meta device (no weights)."""
    torch, transformers = _transformers()
    try:
        cfg = transformers.AutoConfig.for_model(**config)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for configs it refuses
        raise InputError(f"{src}/config.json: transformers has no configuration for it ({exc})".splitlines()[0],
                         "infer needs a model_type transformers knows") from None
    with torch.device("meta"):
        try:
            model = transformers.AutoModelForCausalLM.from_config(cfg)
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{src}: transformers builds no causal LM for model_type {config.get('model_type')!r}"
                             f" ({str(exc).splitlines()[0]})",
                             "rules infer handles causal LMs; write rules by hand from `deepfuse rules show llama --json`"
                             ) from None
    return cfg, model


def _probe_config(config: dict, hidden: str, mlp: str | None) -> dict:
    """A copy of the config whose widths are all different numbers (every role named by its size)."""
    probe = dict(config)
    has_head_dim = isinstance(config.get("head_dim"), int)
    if has_head_dim:
        probe.update({hidden: PROBE_HIDDEN, "head_dim": PROBE_HEAD_DIM})
        if "num_attention_heads" in config:
            probe["num_attention_heads"] = PROBE_HEADS
    else:
        probe[hidden] = PROBE_HIDDEN_NO_HEAD_DIM
        if "num_attention_heads" in config:
            probe["num_attention_heads"] = PROBE_HEADS_NO_HEAD_DIM
    if isinstance(config.get("num_key_value_heads"), int):
        probe["num_key_value_heads"] = PROBE_KV_HEADS
    if mlp is not None:
        probe[mlp] = PROBE_MLP
    return probe


def _widths(config: dict, hidden: str, mlp: str | None) -> dict[str, str]:
    """Widened role -> its width expression over config.json."""
    widths = {"hidden": hidden}
    if "num_attention_heads" in config:
        widths["heads"] = "num_attention_heads * head_dim"
        if "num_key_value_heads" in config:
            widths["kv"] = "num_key_value_heads * head_dim"
    if mlp is not None:
        widths["mlp"] = mlp
    return widths


def _role_sizes(cfg: Any, widths: dict[str, str]) -> dict[int, str]:
    """Size -> role in the probe config (later roles do not override earlier equal sizes: hidden first)."""
    from .expr import evaluate

    view = {k: v for k, v in cfg.to_dict().items()}
    heads = view.get("num_attention_heads")
    hidden = view.get(widths["hidden"])
    view.setdefault("head_dim", None)
    if not view["head_dim"] and heads:
        view["head_dim"] = hidden // heads
    out: dict[int, str] = {}
    for role, text in widths.items():
        out.setdefault(int(evaluate(text, view)), role)
    return out


def template(name: str) -> str:
    """The name with its first index (the layer) as ``{layer}``; deeper indices (experts, ...) stay literal."""
    return LAYER_INDEX.sub(".{layer}.", name, count=1)


def _escape(template: str) -> str:
    return re.escape(template).replace(re.escape("{layer}"), "{layer}")


def _norm_kind(module: Any) -> str | None:
    name = type(module).__name__
    if name.endswith("RMSNorm"):
        return "rms"
    if name.endswith("LayerNorm"):
        return "layer"
    return None


def _classify(model: Any, sizes: dict[int, str], vocab: int, positions: int | None) -> tuple[dict, dict, dict]:
    """Template -> (module class, shape, rule or None, why), norm classes, output names."""
    from torch import nn

    out_module = model.get_output_embeddings()
    in_module = model.get_input_embeddings()
    found: dict[str, tuple[str, tuple[int, ...], dict | None, str]] = {}
    norms: dict[str, str] = {}
    names: dict[str, str] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            shape = tuple(p.shape)
            cls = type(module).__name__
            rule, why = None, ""
            role = sizes.get
            if module is out_module and p_name == "weight":
                names["output"] = full
                if shape == (vocab, _size_of(sizes, "hidden")):
                    rule, why = {"op": "output_average", "axes": ["vocab", "hidden"]}, "output projection"
                else:
                    why = f"output projection of shape {shape}, not [vocab, hidden]"
            elif type(module) is nn.Embedding:  # subclasses (e.g. a scaled embedding) compute more
                if module is in_module:
                    names["input"] = full
                first = "vocab" if shape[0] == vocab else "positions" if positions and shape[0] == positions else None
                if first and role(shape[1]) == "hidden":
                    rule, why = {"op": "concat", "axes": [first, "hidden"]}, f"{first} embedding"
                else:
                    why = f"embedding {shape} is not [vocab or positions, hidden]"
            elif type(module) is nn.Linear and len(shape) == 2:
                o, i = role(shape[0]), role(shape[1])
                if o and i:
                    rule, why = {"op": "block_diagonal", "axes": [o, i], "input_axis": 1}, f"Linear {i} -> {o}"
                else:
                    why = f"Linear {shape[1]} -> {shape[0]}: a width no config field gives (a fused projection?)"
            elif type(module) is nn.Linear and len(shape) == 1:
                if role(shape[0]):
                    rule, why = {"op": "concat", "axes": [role(shape[0])]}, f"bias of a Linear to {role(shape[0])}"
                else:
                    why = f"Linear bias of {shape[0]}: a width no config field gives"
            elif (kind := _norm_kind(module)) is not None:
                if len(shape) == 1 and role(shape[0]):
                    rule, why = {"op": "concat", "axes": [role(shape[0])], "norm": True}, f"{kind} norm over {role(shape[0])}"
                    norms[cls] = kind
                else:
                    why = f"{kind} norm of shape {shape} (per head, or a width no config field gives)"
            else:
                why = f"a parameter of {cls}, a module kind inference does not know"
            tpl = template(full)
            prev = found.get(tpl)
            if prev is not None and prev[2] != rule:
                found[tpl] = (cls, shape, None, "layers differ in how this parameter classifies")
            elif prev is None:
                found[tpl] = (cls, shape, rule, why)
    return found, norms, names


def _size_of(sizes: dict[int, str], role: str) -> int | None:
    return next((n for n, r in sizes.items() if r == role), None)


def _config_spec(cfg: Any, config: dict, widths: dict[str, str], hidden: str, mlp: str | None) -> dict[str, Any]:
    summed = [hidden] + [f for f in ("num_attention_heads", "num_key_value_heads") if f in widths.get("heads", "")
                         + widths.get("kv", "")]
    if mlp is not None:
        summed.append(mlp)
    derived: dict[str, str] = {}
    write: list[str] = []
    if "heads" in widths:
        # written explicitly in the fused config: runtimes read head_dim when present (the summed
        # widths keep hidden // heads only while every source has the same head size, which equal checks)
        derived["head_dim"] = f"head_dim or {hidden} // num_attention_heads"
        write.append("head_dim")
    if "kv" in widths:
        derived["num_key_value_heads"] = "num_key_value_heads or num_attention_heads"
        derived["kv_ratio"] = "num_attention_heads / num_key_value_heads"
        write.append("num_key_value_heads")
    equal = ["model_type"] + sorted(k for k in config if k not in FREE_FIELDS and k not in summed and k != "model_type")
    equal += [k for k in derived if k not in equal and k not in summed]
    return {"sum": summed, "equal": equal, "set": {"tie_word_embeddings": False}, "write": write,
            "derived": derived, "widths": {r: t for r, t in widths.items()},
            "sizes": [k for k in summed + ["vocab_size", "num_hidden_layers"] if k in config]}


def read_config(src: Path) -> dict:
    path = Path(src) / "config.json"
    if not path.is_file():
        raise InputError(f"{src}: no config.json", "rules infer needs a Hugging Face model directory")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise InputError(f"{path}: has no model_type", "rules infer needs a transformers config.json")
    return config


def infer_rules(src: str | Path) -> Inference:
    """Classify every parameter of the model ``src/config.json`` describes; the rules file it implies."""
    src = Path(src)
    config = read_config(src)
    hidden = _first(config, HIDDEN_FIELDS)
    if hidden is None:
        raise InputError(f"{src}/config.json: no model width ({' / '.join(HIDDEN_FIELDS)})",
                         "rules infer needs a transformers config.json with a hidden size")
    mlp = _first(config, MLP_FIELDS)
    vocab = config.get("vocab_size")
    cfg, model = _build(config, src)
    widths = _widths(config, hidden, mlp)
    try:
        probe_cfg, probe_model = _build(_probe_config(config, hidden, mlp), src)
        sizes = _role_sizes(probe_cfg, widths)
        probe_vocab = probe_cfg.vocab_size
    except InputError:  # the family refuses the probe widths: classify at the config's own (fewer roles told apart)
        probe_model, sizes, probe_vocab = model, _role_sizes(cfg, widths), vocab
    positions = config.get("max_position_embeddings") or config.get("n_positions")
    found, norms, names = _classify(probe_model, sizes, probe_vocab, positions)
    real_names = {template(n) for n, _ in model.named_parameters(remove_duplicate=False)}
    rows: list[Classified] = []
    rules: list[dict[str, Any]] = []
    for tpl, (cls, shape, rule, why) in found.items():
        if tpl not in real_names:
            continue
        rows.append(Classified(tpl, cls, shape, rule, why))
        if rule is not None:
            rules.append({"pattern": _escape(tpl), **rule})
    model_type = config["model_type"]
    preset: dict[str, Any] = {
        "name": f"{model_type}-inferred",
        "description": f"Inferred from the {type(model).__name__} transformers builds for model_type {model_type!r}; "
                       "review before use.",
        "model_types": [model_type],
        "runtime": {"model_class": "AutoModelForCausalLM", "inputs": "causal"},
        "norms": [{"module": c, "kind": k, "eps": "variance_epsilon|eps"} for c, k in sorted(norms.items())],
        "config": _config_spec(cfg, config, widths, hidden, mlp),
        "rules": rules,
    }
    if "output" in names:
        preset["output"] = {"name": names["output"], **({"tied_to": names["input"]} if "input" in names else {})}
    return Inference(preset=preset, rows=rows)
