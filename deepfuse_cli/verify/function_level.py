"""Function-level verification: seeded probes through the sources and the fused model.

Hugging Face families run in transformers (the runtime users train with; ``deepfuse[verify]``),
the MLP family in its built-in forward. One model is in memory at a time: each source's logits and
hidden states are kept, the model dropped, then the fused model runs.
"""

from __future__ import annotations

import gc
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..architectures import Family
from ..formats.registry import for_checkpoint
from ..ir import Checkpoint
from ..rules.schema import RuntimeSpec
from .report import Check, Report

if TYPE_CHECKING:
    from ..plan import Plan

HALF = (torch.float16, torch.bfloat16)


def default_tol(dtype: torch.dtype) -> float:
    return {torch.bfloat16: 3e-2, torch.float16: 5e-3}.get(dtype, 1e-5)


Outputs = tuple[torch.Tensor, list[torch.Tensor]]


def _probe_inputs(config: dict, probes: int, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    vocab = config.get("vocab_size", 2)
    limit = config.get("n_positions") or config.get("max_position_embeddings") or seq_len
    seq = max(2, min(seq_len, limit))
    low = min(2, vocab - 1)
    return {"input_ids": torch.randint(low, vocab, (probes, seq), generator=g),
            "decoder_input_ids": torch.randint(low, vocab, (probes, max(1, seq // 2)), generator=g),
            "features": torch.randn(probes, config.get("in_features", 1), generator=g)}


def _hf_forward(path: Path, runtime: RuntimeSpec, inputs: dict[str, torch.Tensor], groups: list[int] | None) -> Outputs:
    import transformers

    from ..grouped_norm import apply_grouped_norms

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    cls = getattr(transformers, runtime.model_class)
    model, info = cls.from_pretrained(str(path), output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise RuntimeError(f"{path}: transformers reports {bad}")
    model.eval()
    if groups:
        apply_grouped_norms(model, groups)
    with torch.no_grad():
        if runtime.inputs == "seq2seq":
            out = model(input_ids=inputs["input_ids"], decoder_input_ids=inputs["decoder_input_ids"],
                        output_hidden_states=True)
            hidden = list(out.encoder_hidden_states) + list(out.decoder_hidden_states)
        else:
            out = model(input_ids=inputs["input_ids"], output_hidden_states=True)
            hidden = list(out.hidden_states)
    result = out.logits.float(), [h.float() for h in hidden]
    del model, out
    gc.collect()
    return result


def _builtin_forward(family: Family, path: Path, config: dict, inputs: dict[str, torch.Tensor]) -> Outputs:
    from ..sources import open_source

    ck = open_source(path)
    tensors = {n: r.load().float() for n, r in ck.tensors.items()}
    logits, hidden = family.hooks.forward(tensors, config, inputs["features"])
    return logits, hidden


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


#: ``view(checkpoint, workdir) -> directory``: a Hugging Face directory computing what the checkpoint
#: computes (itself, or a T5X/Orbax checkpoint converted); given by the command that runs the checks.
HFView = Callable[[Checkpoint, Path], Path]


def verify_function(plan: Plan, fused: Checkpoint, report: Report, *, hf_view: HFView, probes: int, seq_len: int,
                    seed: int, tol: float | None, strict: bool) -> list[Check]:
    with tempfile.TemporaryDirectory(prefix="deepfuse-verify-") as work:
        return _verify_function(plan, fused, report, Path(work), hf_view, probes=probes, seq_len=seq_len, seed=seed,
                                tol=tol, strict=strict)


def _verify_function(plan: Plan, fused: Checkpoint, report: Report, work: Path, hf_view: HFView, *, probes: int,
                     seq_len: int, seed: int, tol: float | None, strict: bool) -> list[Check]:
    family = plan.family
    runtime = family.preset.runtime
    config = plan.config or {}
    builtin = runtime is not None and runtime.model_class == "builtin"
    first = plan.sources[0]
    if not for_checkpoint(first).runtime_loadable(first):
        return [Check("function", "skip", f"{first.path} ({first.format}) is not a directory a runtime loads; "
                      "tensor level only")]
    if runtime is None:
        return [Check("function", "skip", f"rules {plan.preset.name!r} name no runtime to run the model in; "
                      "tensor level only")]
    if not config:
        return [Check("function", "skip", f"{plan.preset.name} sources without config.json; tensor level only")]
    if not builtin:
        try:
            import transformers  # noqa: F401
        except ImportError:
            return [Check("function", "skip", "transformers is not installed: pip install 'deepfuse[verify]'")]
    dtype = plan.entries[0].dtype if plan.entries else torch.float32
    tol = tol if tol is not None else default_tol(dtype)
    inputs = _probe_inputs(config, probes, seq_len, seed)
    report.meta.update({"probes": probes, "seq_len": int(inputs["input_ids"].shape[1]), "probe_seed": seed, "tol": tol})

    def run(path: Path, cfg: dict, groups: list[int] | None = None) -> Outputs:
        if builtin:
            return _builtin_forward(family, path, cfg, inputs)
        return _hf_forward(path, runtime, inputs, groups)

    n = plan.n
    unique: dict[str, Outputs] = {}
    outs: list[Outputs] = []
    for ck in plan.sources:
        key = f"{ck.path}@{ck.metadata.get('step')}"
        if key not in unique:
            unique[key] = run(hf_view(ck, work), ck.config or {})
        outs.append(unique[key])
    fused_path = hf_view(fused, work)
    w = plan.options.weights
    expected = sum(w[m] * outs[m][0] for m in range(n))

    opts = plan.options
    same = plan.options.self_fusion or len(unique) == 1
    noise_exact = not opts.noisy or (opts.noise_mode == "preserving" and same)
    norms_exact = opts.norm == "prop" or same
    checks: list[Check] = []

    groups = plan.norm_groups if opts.norm == "prop" else None
    logits, hidden = run(fused_path, config, groups)
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
    elif noise_exact and norms_exact:
        where = f"; fusion property first breaks at hidden state {broken['layer']} (relative error {broken['relative']:.3g})" if broken else ""
        checks.append(Check(label, "fail", f"relative max error {figs['relative_max_error']:.3g} > tolerance {tol:g}{where}", figs))
    else:
        why = []
        if not norms_exact:
            why.append("norm mode 'rule' with different sources (norms over the concatenation)")
        if not noise_exact:
            why.append(f"off-diagonal noise ({opts.describe_noise()})")
        where = f"; first deviating hidden state: {broken['layer']}" if broken else ""
        checks.append(Check(label, "fail" if strict else "expected",
                            f"deviation expected from {' and '.join(why)}: relative max error "
                            f"{figs['relative_max_error']:.3g}, KL {figs['kl_divergence']:.3g}, top-1 agreement "
                            f"{figs['top1_agreement']:.0%}{where}" + (" (--strict demands exactness)" if strict else ""), figs))
        if not norms_exact and noise_exact and not builtin:
            # The deviation must come from the norms alone: with grouped norms the same weights are exact.
            g_logits, g_hidden = run(fused_path, config, plan.norm_groups)
            g = metrics(g_logits, expected)
            g_layers = _layers(g_hidden, outs)
            g_broken = next((r for r in g_layers if r["relative"] > tol), None)
            g["first_broken_layer"] = g_broken["layer"] if g_broken else None
            good = g["relative_max_error"] <= tol and g_broken is None
            checks.append(Check("function: same weights with grouped norms", "pass" if good else "fail",
                                ("exact: the rule-mode deviation is due to the norms alone" if good else
                                 f"not exact even with grouped norms: relative max error {g['relative_max_error']:.3g}"
                                 + (f", first broken hidden state {g_broken['layer']}" if g_broken else "")), g))
    return checks
