"""Function-level verification: probes through the sources and the fused model.

Hugging Face families run in transformers (the runtime users train with; ``deepfuse[verify]``),
streamed (:mod:`.streamed`): the model built without weights, each layer's weights read from the
checkpoint in fp32 just before it runs and dropped after, so memory is a layer's, whatever the depth,
and half-precision checkpoints are computed in fp32 (held to the fp32 tolerance when their storage is
exact, :func:`function_tol`). T5X/Orbax checkpoints are read through their conversion, tensor by
tensor, with no files written. The MLP family runs in its built-in forward. Each source's logits and
hidden states are kept (probes x seq x width, small), then the fused model runs. Probes are seeded
random token ids, or a text file's tokens (``--text``, the source's own tokenizer). A fused model the
runtime refuses or cannot run (a config it rejects, missing keys, shapes that do not match) is a failed
check with one line saying why, never a traceback; a model no runtime can build is a skipped check
that keeps the verification from passing.
"""

from __future__ import annotations

import codecs
import gc
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..architectures import Family
from ..errors import DeepfuseError, InputError
from ..formats.hf import HEAD_NORMS_FILE
from ..formats.registry import for_checkpoint
from ..ir import Checkpoint
from ..rules.expr import evaluate
from .report import Check, Report
from .streamed import ModelClass, NeedsConversion, NoRuntime, RuntimeRefused, Weights, model_class, run_streamed

if TYPE_CHECKING:
    from ..plan import Plan

HALF = (torch.float16, torch.bfloat16)


#: the function check's tolerance, relative to the logit scale, in exact modes (the forward runs in fp32)
FP32_TOL = 1e-5


def default_tol(dtype: torch.dtype) -> float:
    """The tolerance for fused weights rounded to ``dtype`` (see :func:`function_tol`)."""
    return {torch.bfloat16: 3e-2, torch.float16: 5e-3}.get(dtype, FP32_TOL)


Outputs = tuple[torch.Tensor, list[torch.Tensor]]

#: files of a Hugging Face tokenizer; a directory holding one of them has a tokenizer for ``--text``
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt")
#: the most of a ``--text`` file read: far more text than the most probe tokens verify runs
MAX_TEXT_BYTES = 1 << 20


@dataclass(frozen=True)
class TextTokens:
    """The token ids of a ``--text`` file, and where they come from (for the report)."""

    ids: tuple[int, ...]
    file: str  # the text file's name
    tokenizer: Path  # the directory whose tokenizer made them
    truncated: bool  # the file was longer than MAX_TEXT_BYTES: its start was read


def has_tokenizer(directory: Path) -> bool:
    return directory.is_dir() and any((directory / name).is_file() for name in TOKENIZER_FILES)


def _read_text(path: Path) -> tuple[str, bool]:
    """The file's text (UTF-8; at most its first MAX_TEXT_BYTES, cut at a character boundary)."""
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "is not a file" if path.exists() else "does not exist"
        raise InputError(f"--text {path} {what}", "name a plain text file")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TEXT_BYTES + 1)
    except OSError as exc:
        raise InputError(f"--text {path}: cannot read it ({exc.strerror or exc})") from None
    truncated = len(data) > MAX_TEXT_BYTES
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(data[:MAX_TEXT_BYTES], final=not truncated)
    except UnicodeDecodeError as exc:
        raise InputError(f"--text {path}: not UTF-8 text (byte {exc.start})", "pass a plain UTF-8 text file") from None
    return text, truncated


def tokenize_text(path: Path, directories: list[Path], vocab: int | None) -> TextTokens:
    """The ids of ``path``'s text by the tokenizer of the first of ``directories`` that has one (the fused
    checkpoint's copy, then the sources'), each below ``vocab``; refused (exit 2) when none has one."""
    where = next((d for d in directories if has_tokenizer(d)), None)
    if where is None:
        names = ", ".join(dict.fromkeys(str(d) for d in directories))
        raise InputError(f"--text: no tokenizer in {names} (none of {', '.join(TOKENIZER_FILES)})",
                         f"copy the source model's tokenizer files into {directories[0]}, or drop --text to probe "
                         "with seeded random ids")
    text, truncated = _read_text(path)
    try:
        import transformers
    except ImportError:
        raise InputError("--text needs transformers to tokenise", "pip install 'deepfuse[verify]'") from None
    transformers.utils.logging.set_verbosity_error()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(where), local_files_only=True)
        ids = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    except Exception as exc:  # noqa: BLE001 - whatever the tokenizer files make the library raise: one line
        raise InputError(f"{where}: its tokenizer cannot be loaded or run ({_describe(exc)})",
                         "fix its tokenizer files, or drop --text to probe with seeded random ids") from None
    if len(ids) < 2:
        raise InputError(f"--text {path}: {len(ids)} token(s) with the tokenizer of {where}; probes need at least 2",
                         "pass a longer text")
    if vocab is not None and max(ids) >= vocab:
        raise InputError(f"--text: the tokenizer of {where} gives token id {max(ids)}, but the model's vocabulary "
                         f"has {vocab} entries", "use the tokenizer that belongs to the model")
    return TextTokens(ids=tuple(ids), file=path.name, tokenizer=where, truncated=truncated)


def _probe_inputs(config: dict, probes: int, seq_len: int, seed: int, tokens: TextTokens | None = None,
                  max_length: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The probe inputs (seeded random ids, or consecutive runs of the text's tokens), and how they were made."""
    g = torch.Generator().manual_seed(seed)
    vocab = config.get("vocab_size", 2)
    limit = max_length or config.get("n_positions") or config.get("max_position_embeddings") or seq_len
    seq = max(2, min(seq_len, limit))
    low = min(2, vocab - 1)
    if tokens is None:
        inputs = {"input_ids": torch.randint(low, vocab, (probes, seq), generator=g),
                  "decoder_input_ids": torch.randint(low, vocab, (probes, max(1, seq // 2)), generator=g),
                  "features": torch.randn(probes, config.get("in_features", 1), generator=g)}
        # encoder inputs: token types drawn from the model's, each probe right-padded after a random length
        types = config.get("type_vocab_size") if isinstance(config.get("type_vocab_size"), int) else 1
        inputs["token_type_ids"] = torch.randint(0, max(1, types), (probes, seq), generator=g)
        lengths = torch.randint(max(1, seq // 2), seq + 1, (probes, 1), generator=g)
        inputs["attention_mask"] = (torch.arange(seq) < lengths).long()
        return inputs, {"kind": "random", "seed": seed}
    seq = min(seq, len(tokens.ids))  # a short text: one shorter probe
    count = min(probes, len(tokens.ids) // seq)
    ids = torch.tensor(tokens.ids[:count * seq], dtype=torch.long).view(count, seq)
    return ({"input_ids": ids, "decoder_input_ids": ids[:, :max(1, seq // 2)].clone(),
             "token_type_ids": torch.zeros_like(ids), "attention_mask": torch.ones_like(ids)},
            {"kind": "text", "file": tokens.file, "tokens": len(tokens.ids), "tokens_used": count * seq,
             "truncated": tokens.truncated, "tokenizer": str(tokens.tokenizer)})


def _describe(exc: BaseException) -> str:
    """One line for an error the runtime raised (its own text cut at 300 characters)."""
    if isinstance(exc, DeepfuseError):
        return exc.message
    if isinstance(exc, RuntimeRefused):
        return str(exc)
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text if len(text) <= 300 else text[:297] + '...'}"


def _keys(names) -> str:
    names = sorted(map(str, names))
    return ", ".join(repr(n) for n in names[:3]) + (f" (and {len(names) - 3} more)" if len(names) > 3 else "")


def _loading_problems(info: dict) -> str:
    """What transformers reported about the weights it loaded, in one line ('' when all matched)."""
    parts = []
    if info.get("missing_keys"):
        parts.append(f"missing keys {_keys(info['missing_keys'])}")
    if info.get("unexpected_keys"):
        parts.append(f"unexpected keys {_keys(info['unexpected_keys'])}")
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda m: str(m[0]))
    if mismatched:
        key, *shapes = mismatched[0]
        where = (f" ({list(shapes[0])} in the checkpoint, {list(shapes[1])} in the model its config describes)"
                 if len(shapes) == 2 else "")
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        parts.append(f"mismatched shape of {key!r}{where}{more}")
    return "; ".join(parts)


def _hf_forward(view: ModelView, cls: ModelClass, inputs: dict[str, torch.Tensor], groups: list[int] | None,
                *, role_groups: dict[str, list[int]] | None = None) -> Outputs:
    """Logits and hidden states (fp32) of the model ``view`` holds, one layer's weights at a time; when
    transformers converts some tensors while loading (not a renaming), the whole model from its directory.
    ``role_groups`` (given when grouped norms need more than the hidden groups): the groups of norms over
    other widths, and the per-head norm scales read from the file beside the weights."""
    head_norms = _head_norms(view) if groups and role_groups is not None else None
    try:
        encoder = {k: inputs[k] for k in ("attention_mask", "token_type_ids")} if cls.inputs == "encoder" else None
        logits, hidden, held = run_streamed(cls, view.weights, inputs["input_ids"], inputs.get("decoder_input_ids"), groups,
                                            encoder, role_groups=role_groups, head_norms=head_norms)
        if bool(torch.isfinite(logits).all()) or view.directory is None:
            return logits, hidden, {"loading": "streamed", "weight_bytes_held": held}
        why = "the streamed forward gave non-finite logits (a weight used outside its module's forward?)"
    except NeedsConversion as exc:
        if view.directory is None:
            raise
        why = str(exc)
    logits, hidden = _whole_forward(view.directory, cls, inputs, groups, role_groups=role_groups)
    return logits, hidden, {"loading": "whole model", "why": why}


def _head_norms(view: ModelView) -> dict[str, torch.Tensor]:
    """The per-head norm scales written beside the fused weights (none when the sources agreed); a
    config.json that names the file when it is not there is an error."""
    from safetensors.torch import load_file

    from ..grouped_norm import HEAD_NORMS_KEY

    path = view.directory / HEAD_NORMS_FILE if view.directory is not None else None
    if path is not None and path.is_file():
        return load_file(str(path))
    if view.weights.config.get(HEAD_NORMS_KEY):
        raise ValueError(f"config.json names per-head norms {view.weights.config[HEAD_NORMS_KEY]!r}, but "
                         f"{path or HEAD_NORMS_FILE} is not there")
    return {}


def _whole_forward(path: Path, cls: ModelClass, inputs: dict[str, torch.Tensor], groups: list[int] | None,
                   *, role_groups: dict[str, list[int]] | None = None):
    import transformers

    from ..grouped_norm import apply_grouped_norms

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model, info = cls.cls.from_pretrained(str(path), output_loading_info=True, ignore_mismatched_sizes=True,
                                          dtype=torch.float32)
    problems = _loading_problems(info)
    if problems:
        del model
        raise RuntimeRefused(problems)
    model.eval()
    if groups:
        apply_grouped_norms(model, groups, role_groups=role_groups)
    with torch.no_grad():
        if cls.inputs == "seq2seq":
            out = model(input_ids=inputs["input_ids"], decoder_input_ids=inputs["decoder_input_ids"],
                        output_hidden_states=True)
            hidden = list(out.encoder_hidden_states) + list(out.decoder_hidden_states)
        elif cls.inputs == "encoder":
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        token_type_ids=inputs["token_type_ids"], output_hidden_states=True)
            hidden = list(out.hidden_states)
        else:
            out = model(input_ids=inputs["input_ids"], output_hidden_states=True)
            hidden = list(out.hidden_states)
    result = out.logits.float(), [h.float() for h in hidden]
    del model, out
    gc.collect()
    return result


def _builtin_forward(family: Family, view: ModelView, inputs: dict[str, torch.Tensor]) -> Outputs:
    tensors = {n: r.load().float() for n, r in view.weights.tensors.items()}
    logits, hidden = family.hooks.forward(tensors, view.weights.config, inputs["features"])
    return logits, hidden, {"loading": "whole model (built-in forward)"}


def metrics(fused: torch.Tensor, expected: torch.Tensor) -> dict[str, float]:
    diff = (fused - expected).double()
    scale = max(float(expected.abs().max()), 1e-12)
    logp = torch.log_softmax(expected.double(), -1)
    logq = torch.log_softmax(fused.double(), -1)
    kl = float((logp.exp() * (logp - logq)).sum(-1).mean())
    return {
        "max_abs_error": float(diff.abs().max()),
        "logit_scale": scale,
        "relative_max_error": float(diff.abs().max()) / scale,
        "relative_l2": float(diff.norm() / max(float(expected.double().norm()), 1e-12)),
        "kl_divergence": kl,
        "top1_agreement": float((fused.argmax(-1) == expected.argmax(-1)).double().mean()),
    }


def _layers(fused_hidden: list[torch.Tensor], sources: list[Outputs]) -> list[dict[str, Any]]:
    rows = []
    for layer, h in enumerate(fused_hidden):
        cat = torch.cat([hs[layer] for _, hs in sources], dim=-1)
        err = float((h - cat).abs().max()) if h.shape == cat.shape else math.inf
        scale = max(float(cat.abs().max()), 1e-12)
        rows.append({"layer": layer, "max_abs": err, "relative": err / scale})
    return rows


@dataclass(frozen=True)
class ModelView:
    """A checkpoint as the runtime sees it: its config.json and its tensors by Hugging Face names (a
    T5X/Orbax checkpoint's converted one at a time as they are read), and the directory transformers
    could load it from whole, if there is one."""

    weights: Weights
    directory: Path | None = None


#: ``view(checkpoint, config)``: the :class:`ModelView` of a checkpoint (``config`` for one without its
#: own config.json, e.g. a bare fused weights file); given by the command that runs the checks.
ViewOf = Callable[[Checkpoint, "dict | None"], ModelView]


def _dyadic(x: float) -> bool:
    """``x`` is 0 or a power of two: scaling by it is exact in any floating-point dtype."""
    return x == 0 or math.frexp(abs(x))[0] == 0.5


def function_tol(plan: Plan) -> tuple[float, str]:
    """The default tolerance of the function check and why. The forward runs in fp32 whatever the
    storage dtype (weights upcast as they are read), so exact modes are held to fp32's 1e-5 of the logit
    scale, unless storing the fused tensors in a half dtype rounded them: some factor the fusion scales
    by (a weight, an output scale) is not a power of two, or off-diagonal noise was added."""
    half = sorted({str(e.dtype).removeprefix("torch.") for e in plan.entries if e.dtype in HALF})
    if not half:
        return FP32_TOL, "fp32 forward"
    narrowed = next((e for e in plan.entries if e.dtype in HALF and any(d != e.dtype for d in e.source_dtypes)), None)
    factors = [*plan.options.weights, *(x for e in plan.entries if e.dtype in HALF for x in (e.scales or ()))]
    inexact = [x for x in factors if not _dyadic(x)]
    if not inexact and not plan.options.noisy and narrowed is None:
        return FP32_TOL, (f"fp32 forward; {'/'.join(half)} storage is exact (sources stored alike, every scale "
                          "factor a power of two)")
    if narrowed is not None:
        why = (f"{narrowed.name} stored as {str(narrowed.dtype).removeprefix('torch.')}, its sources as "
               f"{', '.join(sorted({str(d).removeprefix('torch.') for d in narrowed.source_dtypes}))}")
    else:
        why = f"factor {inexact[0]:g} is not a power of two" if inexact else "off-diagonal noise"
    dtype = next(e.dtype for e in plan.entries if e.dtype in HALF)
    return default_tol(dtype), f"fp32 forward of {'/'.join(half)} weights rounded by the fusion ({why})"


def verify_function(plan: Plan, fused: Checkpoint, report: Report, *, view_of: ViewOf, probes: int, seq_len: int,
                    seed: int, tol: float | None, strict: bool, tokens: TextTokens | None = None) -> list[Check]:
    """The function check: probes through each source and the fused model (fp32, streamed layer by layer)."""
    family = plan.family
    runtime = family.preset.runtime
    builtin = runtime is not None and runtime.model_class == "builtin"
    fused_config = fused.config or plan.output_config
    if builtin:
        cls = None
        runner = "the built-in forward"
        config = plan.config or {}
        if not config:
            return [unverified(f"{plan.preset.name} sources without config.json")]
    else:
        first = view_of(plan.sources[0], None).weights.config
        if not first:
            return [unverified(f"source {plan.sources[0].path} has no config.json to build its model from")]
        if not fused_config:
            return [unverified(f"{fused.path} has no config.json to build the fused model from")]
        try:
            if runtime is not None and runtime.unsupported_head(fused_config) is not None:
                return [unverified(f"config.json names {runtime.unsupported_head(fused_config)}, which has no single "
                                   f"logits output; the function check runs {', '.join(runtime.heads)}")]
            cls = model_class(first, runtime.class_for(fused_config) if runtime else None,
                              runtime.inputs if runtime else None)
        except NoRuntime as exc:
            return [unverified(str(exc))]
        except Exception as exc:  # noqa: BLE001 - a config the runtime rejects: the source is bad input
            raise InputError(f"source {plan.sources[0].path}: transformers cannot read its config: {_describe(exc)}",
                             "verify against sources the runtime loads, or with --no-function") from None
        runner = f"transformers {cls.name}"
        config = first
    dtype_tol, tol_reason = function_tol(plan)
    if tol is None:
        tol = dtype_tol
    else:
        tol_reason = "--tol"
    max_length = evaluate(runtime.max_length, family.view(config)) if runtime and runtime.max_length else None
    max_length = max_length if type(max_length) is int and max_length > 0 else None
    inputs, made = _probe_inputs(config, probes, seq_len, seed, tokens, max_length)
    report.meta.update({"probes": int(inputs["input_ids"].shape[0]), "seq_len": int(inputs["input_ids"].shape[1]),
                        "probe_seed": seed if tokens is None else None, "probe_inputs": made, "tol": tol,
                        "tol_reason": tol_reason, "function_runtime": runner, "function_dtype": "float32"})

    def run(view: ModelView, groups: list[int] | None = None) -> Outputs:
        if builtin:
            return _builtin_forward(family, view, inputs)
        if groups and (plan.writes_head_norms or any(r != "hidden" for r in plan.norm_role_groups)):
            # norms over other widths than the hidden size (OLMo 2's k_norm under GQA) take their own groups
            roles = {r: g for r, g in plan.norm_role_groups.items() if r != "hidden"}
            return _hf_forward(view, cls, inputs, groups, role_groups=roles)
        return _hf_forward(view, cls, inputs, groups)

    loading: dict[str, Any] = {}
    held = [0]

    def note(label: str, how: dict[str, Any]) -> None:
        loading.setdefault(label, how.get("loading"))
        held[0] = max(held[0], how.get("weight_bytes_held", 0))
        report.meta.update({"function_loading": loading, "function_weight_bytes_held": held[0]})

    def run_fused(groups: list[int] | None) -> Outputs | Check:
        """The fused model's outputs, or a failed check saying in one line why the runtime cannot give them."""
        try:
            logits, hidden, how = run(view_of(fused, fused_config), groups)
            note("fused", how)
            return logits, hidden
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - anything the runtime raises on the fused model fails it
            return Check("function", "fail", f"{runner} cannot load or run the fused model: {_describe(exc)}",
                         {"error": type(exc).__name__})

    n = plan.n
    unique: dict[str, Outputs] = {}
    outs: list[Outputs] = []
    for ck in plan.sources:
        key = f"{ck.path}@{ck.metadata.get('step')}"
        if key not in unique:
            try:
                logits, hidden, how = run(view_of(ck, None))
                note("sources", how)
                unique[key] = logits, hidden
            except (MemoryError, DeepfuseError):
                raise
            except Exception as exc:  # noqa: BLE001 - a source the runtime refuses is bad input, not a failure
                raise InputError(f"source {ck.path}: {runner} cannot load or run it: {_describe(exc)}",
                                 "verify against sources the runtime loads, or with --no-function") from None
        outs.append(unique[key])
    return _judge(plan, report, outs, len(unique), run_fused, builtin=builtin, tol=tol, strict=strict)


def unverified(reason: str) -> Check:
    """The function check not run for want of a runtime: reported, and the verification does not pass
    (never a silent pass without a function check; ``--no-function`` asks for that explicitly)."""
    return Check("function", "skip", f"{reason}: the function was not checked (tensor level only; pass "
                 "--no-function to accept that)", {"reason": reason}, unverified=True)


def _judge(plan: Plan, report: Report, outs: list[Outputs], n_unique: int, run_fused, *, builtin: bool, tol: float,
           strict: bool) -> list[Check]:
    n = plan.n
    w = plan.options.weights
    expected = sum(w[m] * outs[m][0] for m in range(n))

    opts = plan.options
    same = plan.options.self_fusion or n_unique == 1
    noise_exact = not opts.noisy or (opts.noise_mode == "preserving" and same)
    norms_exact = opts.norm == "prop" or same
    family_exact = same or not plan.deviations  # the family's own runtime (e.g. Gemma 2's final logit softcap)
    checks: list[Check] = []

    groups = plan.norm_groups if opts.norm == "prop" else None
    got = run_fused(groups)
    if isinstance(got, Check):
        return [got]
    logits, hidden = got
    if logits.shape != expected.shape:
        return [Check("function", "fail", f"the fused model's logits have shape {list(logits.shape)}, expected "
                      f"{list(expected.shape)}", {"shape": list(logits.shape), "expected": list(expected.shape)})]
    figs = metrics(logits, expected)
    layers = _layers(hidden, outs) if len(hidden) == len(outs[0][1]) else []
    report.layers = layers
    broken = next((r for r in layers if r["relative"] > tol), None)
    figs["first_broken_layer"] = broken["layer"] if broken else None
    ok = figs["relative_max_error"] <= tol and broken is None
    label = "function: logits vs " + ("source" if same else "weighted average of sources")
    if ok:
        checks.append(Check(label, "pass", f"max abs error {figs['max_abs_error']:.3g} "
                            f"({figs['relative_max_error']:.2g} of the logit scale), top-1 agreement "
                            f"{figs['top1_agreement']:.0%}, fusion property holds in every layer", figs))
    elif noise_exact and norms_exact and family_exact:
        where = f"; fusion property first breaks at hidden state {broken['layer']} (relative error {broken['relative']:.3g})" if broken else ""
        checks.append(Check(label, "fail", f"relative max error {figs['relative_max_error']:.3g} > tolerance {tol:g}{where}", figs))
    else:
        why = []
        if not norms_exact:
            why.append("norm mode 'rule' with different sources (norms over the concatenation)")
            if plan.preset.moe is not None:  # routers are grouped with the norms (apply_grouped_norms)
                why.append("the stock router (one top-k over every source's experts)")
        if not noise_exact:
            why.append(f"off-diagonal noise ({opts.describe_noise()})")
        if not family_exact:
            why.extend(plan.deviations)
        where = f"; first deviating hidden state: {broken['layer']}" if broken else ""
        checks.append(Check(label, "fail" if strict else "expected",
                            f"deviation expected from {' and '.join(why)}: relative max error "
                            f"{figs['relative_max_error']:.3g}, KL {figs['kl_divergence']:.3g}, top-1 agreement "
                            f"{figs['top1_agreement']:.0%}{where}" + (" (--strict demands exactness)" if strict else ""), figs))
        if not norms_exact and noise_exact and family_exact and not builtin:
            # The deviation must come from the norms alone: with grouped norms the same weights are exact.
            got = run_fused(plan.norm_groups)
            if isinstance(got, Check):
                return [*checks, got]
            g_logits, g_hidden = got
            g = metrics(g_logits, expected)
            g_layers = _layers(g_hidden, outs)
            g_broken = next((r for r in g_layers if r["relative"] > tol), None)
            g["first_broken_layer"] = g_broken["layer"] if g_broken else None
            good = g["relative_max_error"] <= tol and g_broken is None
            alone = "norms and the routing" if plan.preset.moe is not None else "norms"
            checks.append(Check("function: same weights with grouped norms", "pass" if good else "fail",
                                (f"exact: the rule-mode deviation is due to the {alone} alone" if good else
                                 f"not exact even with grouped norms: relative max error {g['relative_max_error']:.3g}"
                                 + (f", first broken hidden state {g_broken['layer']}" if g_broken else "")), g))
    return checks
