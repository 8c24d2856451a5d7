"""Orchestration of ``deepfuse verify``: resolve sources and options, run the checks, judge."""

from __future__ import annotations

import functools
import json
import platform
import threading
from pathlib import Path

import torch
from pydantic import Field, ValidationError, field_validator, model_validator

from .. import __version__
from ..errors import DeepfuseError, InputError, UsageError
from ..formats.files import sha256_file
from ..formats.hf import MANIFEST_NAME
from ..formats.registry import HUGGING_FACE, for_checkpoint
from ..compute import compute_tensor
from ..ir import Checkpoint, TensorRef
from ..manifest import Manifest
from ..options import FuseOptions, OptionError, Options
from ..plan import MAX_COPIES, Plan, build_plan, conversion_preset
from ..rules import load_rules
from ..rules.engine import builtin_preset_with_digest, rules_digest
from ..rules.schema import Preset
from ..formats.objstore import fetch_checkpoint, is_url, parse_url
from ..sources import open_source
from ..untrusted import resolve, resolves_inside
from .function_level import ModelView, TextTokens, tokenize_text, verify_function
from .report import Check, Report
from .streamed import Weights, prepare_runtime
from .tensor_level import verify_tensors


#: probes x seq-len: the function check holds logits and hidden states of this many tokens per model
MAX_PROBE_TOKENS = 2**14


class VerifyOptions(Options):
    """What ``deepfuse verify`` checks, and how hard."""

    sources: tuple[str, ...] | None = None  # default: the manifest's (paths, or Hugging Face Hub ids)
    times: int | None = Field(default=None, ge=2, le=MAX_COPIES)  # self-fusion: the one source copied K times
    rules: str | None = None
    probes: int = Field(default=4, ge=1)
    seq_len: int = Field(default=16, ge=2)
    seed: int = 0
    tol: float | None = Field(default=None, gt=0, allow_inf_nan=False)  # default: by dtype
    strict: bool = False
    integrity_only: bool = False
    function: bool = True
    text: Path | None = None  # probe with this text's tokens (the source's tokenizer), not seeded random ids

    @field_validator("sources", mode="before")
    @classmethod
    def _as_given(cls, value):
        """Sources as text, as given: a Hub id is not a path (``Path`` would rewrite ``./org/name``)."""
        if isinstance(value, (list, tuple)):
            return tuple(str(v) if isinstance(v, Path) else v for v in value)
        return value

    @model_validator(mode="after")
    def _one_source_for_times(self) -> VerifyOptions:
        if self.times is not None and self.sources and len(self.sources) != 1:
            raise OptionError(f"needs exactly one source, not {len(self.sources)}", field="times")
        return self

    @model_validator(mode="after")
    def _bounded(self) -> VerifyOptions:
        """Refuse absurd numbers before any work: they would fail late, or exhaust memory."""
        if self.probes * self.seq_len > MAX_PROBE_TOKENS:
            raise OptionError(f"{self.probes} x --seq-len {self.seq_len}: at most {MAX_PROBE_TOKENS} probe tokens in all",
                              field="probes", hint="a few short probes are enough to compare functions, e.g. --probes 4")
        if not 0 <= self.seed < 2**64:
            raise OptionError("must be between 0 and 2**64 - 1", field="seed")
        if self.text is not None and (self.integrity_only or not self.function):
            flag = "--integrity-only" if self.integrity_only else "--no-function"
            raise OptionError(f"probes the function check, which {flag} does not run", field="text",
                              hint=f"drop --text or {flag}")
        return self



def read_manifest(fused: Path) -> Manifest | None:
    path = fused / MANIFEST_NAME if fused.is_dir() else None
    if path is None or not path.is_file():
        return None
    return Manifest.read(path)


def check_integrity(fused: Path, manifest: Manifest) -> Check:
    files = manifest.files
    bad = []
    root = resolve(fused)
    for name, digest in sorted(files.items()):
        p = fused / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not resolves_inside(p, root):
            bad.append(f"{name} is not a file of {fused}")
        elif not p.is_file():
            bad.append(f"{name} is missing")
        elif sha256_file(p) != digest:
            bad.append(f"{name} was modified after the manifest was written (sha256 differs)")
    if bad:
        return Check("integrity", "fail", bad[0], {"problems": bad, "files": len(files)})
    return Check("integrity", "pass", f"{len(files)} files match the sha256 recorded in {MANIFEST_NAME}",
                 {"files": len(files)})


#: config.json fields that record how the fusion ran (its --norm): only known from a manifest
RECORDED_OPTIONS = ("deepfuse_norm_mode", "deepfuse_norm_groups")


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_config(plan: Plan, fused: Checkpoint, options_known: bool) -> Check:
    """The fused ``config.json`` is the one the fusion writes for these sources and options (field by
    field; without a manifest the fields recording the fusion's options are not compared)."""
    if fused.format != "hf":  # a bare weights file, or a train state whose widths follow from its shapes
        return Check("config", "skip", f"a {fused.format} checkpoint carries no config.json")
    want = plan.output_config
    if want is None:
        return Check("config", "skip", "the sources have no config.json: none to compare")
    got = fused.config
    if got is None:
        return Check("config", "fail", "config.json is missing; the fusion writes one", {"differing": []})
    want = json.loads(json.dumps(want))  # as written: lists for tuples
    if not options_known:
        want = {k: v for k, v in want.items() if k not in RECORDED_OPTIONS}
        got = {k: v for k, v in got.items() if k not in RECORDED_OPTIONS}
    differing = sorted(k for k in set(want) | set(got) if k not in want or k not in got or want[k] != got[k])
    if differing:
        k = differing[0]
        if k not in got:
            what = f"config.json has no field {k!r} (the fusion writes {_short(want[k])})"
        elif k not in want:
            what = f"config.json field {k!r} is not one the fusion writes"
        else:
            what = f"config.json field {k!r} is {_short(got[k])}, the fusion writes {_short(want[k])}"
        more = f" ({len(differing) - 1} more fields differ)" if len(differing) > 1 else ""
        return Check("config", "fail", what + more, {"differing": differing})
    return Check("config", "pass", f"config.json is the one the fusion writes ({len(want)} fields)",
                 {"fields": len(want)})


def _open_fused(fused: Path, report: Report) -> Checkpoint | None:
    """The fused checkpoint, opened by its format's reader; None (a failed "checkpoint" check) when it
    cannot be read: it is what is being verified, so that is a failed verification, not bad input."""
    try:
        return open_source(fused)
    except DeepfuseError as exc:
        report.add(Check("checkpoint", "fail", f"cannot be read: {exc.message}"))
        return None


def _text_tokens(opts: VerifyOptions, plan: Plan, fused: Path) -> TextTokens:
    """The ``--text`` file's tokens, by the tokenizer copied into the fused directory or a source's."""
    runtime = plan.family.preset.runtime
    if runtime is not None and runtime.inputs == "features":
        raise UsageError(f"--text: the {plan.preset.name} family is probed with feature vectors, not tokens",
                         "drop --text")
    dirs = [fused, *dict.fromkeys(Path(ck.path) for ck in plan.sources)]
    vocab = (plan.config or {}).get("vocab_size")
    return tokenize_text(opts.text, dirs, vocab if isinstance(vocab, int) else None)


def _options_from_manifest(manifest: Manifest | None, n: int, self_fusion: bool, where: Path) -> FuseOptions:
    """The options the fusion ran with, as its manifest records them (none: equal weights, no noise)."""
    if manifest is None:
        return FuseOptions.parse({"sources": n}, self_fusion=self_fusion)
    noise = manifest.noise
    values = dict(
        weights=list(manifest.weights), norm=manifest.norm.mode,
        noise_std=noise.std, noise_scale=noise.scale, noise_mode="offdiag" if noise.mode == "none" else noise.mode,
        seed=manifest.seed, dtype=manifest.dtype, self_fusion=self_fusion,
        output_format=manifest.output_format, convert_only=manifest.kind == "conversion",
        optimizer_state=manifest.optimizer_state or "drop", allow_nonfinite=bool(manifest.nonfinite),
    )
    try:
        return FuseOptions.model_validate(values)
    except ValidationError as exc:
        message, _ = FuseOptions.explain(exc, values)
        raise InputError(f"{where}: the recorded options are invalid ({message})",
                         "pass --sources to verify without the manifest's options") from None


def _preset_from_manifest(manifest: Manifest, fused: Path) -> Preset:
    """The rules a manifest records, used only when they are a built-in preset (same digest): patterns
    taken from a file are never compiled, as a crafted one could make matching take forever."""
    variant = conversion_preset if manifest.kind == "conversion" else None  # what build_plan derives again
    preset = builtin_preset_with_digest(rules_digest(manifest.rules), variant)
    if preset is None:
        raise UsageError(f"{fused / MANIFEST_NAME}: the fusion used rules that are not a built-in preset "
                         f"({manifest.preset!r}); they are not taken from the manifest",
                         "pass the rules file used for the fusion with --rules")
    return preset


def _check_source_digests(manifest: Manifest, sources) -> None:
    """Each source's own weight files (as its reader found them) against the digests the manifest
    recorded for them. Only those files are opened: a manifest naming other files (``..``, an
    absolute path) cannot make verify read them."""
    for rec, ck in zip(manifest.sources, sources):
        for name, path in ck.weight_file_names().items():
            digest = rec.files.get(name)
            if digest and path.is_file() and sha256_file(path) != digest:
                raise InputError(f"source {ck.path}: {path.name} changed since the fusion (sha256 differs from the manifest)",
                                 "pass the original sources with --sources")


def model_view(ck: Checkpoint, config: dict | None = None) -> ModelView:
    """What the runtime runs for ``ck``: its tensors by Hugging Face names, read one at a time; a
    T5X/Orbax checkpoint's through its conversion (each tensor converted as it is read, no files
    written). ``config`` stands in for a checkpoint without config.json (a bare fused weights file)."""
    if for_checkpoint(ck) is HUGGING_FACE:
        whole = ck.path if ck.path.is_dir() and ck.config else None
        return ModelView(Weights(ck.config or config or {}, ck.tensors), whole)
    plan = build_plan([ck], FuseOptions(weights=(1.0,), convert_only=True, output_format=HUGGING_FACE.name))
    conversion = plan.conversion
    refs = {}
    for entry in plan.entries:
        if entry.name in conversion.drop:
            continue
        name = conversion.out_name(entry.name)
        refs[name] = TensorRef(name, conversion.out_shape(entry.name, entry.shape), entry.dtype,
                               loader=functools.partial(_converted, plan, entry), source=str(ck.path))
    return ModelView(Weights(plan.output_config or {}, refs))


def _converted(plan: Plan, entry) -> torch.Tensor:
    return plan.conversion.apply(entry.name, compute_tensor(plan, entry))[1]


def run_verify(fused: Path, opts: VerifyOptions) -> Report:
    url = parse_url(fused)
    if url is not None:  # a T5X/Orbax checkpoint on object storage: its committed step, copied here
        fused = fetch_checkpoint(url)
    fused = Path(fused)
    if not fused.exists():
        raise InputError(f"{fused}: no such file or directory")
    manifest = read_manifest(fused)
    report = Report(fused=str(url or fused), sources=[])
    if manifest is not None and opts.integrity_only:
        report.add(check_integrity(fused, manifest))
        _versions(report)
        return report
    if manifest is None and opts.integrity_only:
        raise InputError(f"{fused}: no {MANIFEST_NAME} manifest, so there are no recorded digests to check",
                         "verify against the sources with --sources")
    # The digests are computed on a thread of their own, from the start, while everything else runs
    # (hashing releases the interpreter; the machine's second core would otherwise idle), and reported
    # first. A daemon thread: bad input found meanwhile is reported at once, not after hashing every file.
    done: list = []

    def integrity() -> None:
        try:
            done.append(check_integrity(fused, manifest))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            done.append(exc)

    thread = None
    if manifest is not None:
        thread = threading.Thread(target=integrity, name="deepfuse-integrity", daemon=True)
        thread.start()
        report.add(Check("integrity", "skip", "not finished"))
    else:
        report.add(Check("integrity", "skip", f"no {MANIFEST_NAME} in {fused}: written by another tool"))
    _versions(report)
    _against_sources(fused, opts, manifest, report)
    if thread is not None:
        thread.join()
        if isinstance(done[0], BaseException):
            raise done[0]
        report.checks[0] = done[0]
    return report


def _versions(report: Report) -> None:
    report.meta.update({"deepfuse_version": __version__, "torch": torch.__version__, "python": platform.python_version()})
    try:
        import transformers

        report.meta["transformers"] = transformers.__version__
    except ImportError:
        report.meta["transformers"] = None


def _against_sources(fused: Path, opts: VerifyOptions, manifest: Manifest | None, report: Report) -> Report:
    """Every check but integrity: the sources resolved, the plan made again, tensors, config, function."""
    # sources: --sources overrides the manifest
    if opts.sources:
        paths = list(opts.sources)
        if opts.times is not None:
            paths = paths * opts.times
        self_fusion = opts.times is not None or (manifest is not None and manifest.kind == "self-fusion")
        use_manifest_options = manifest is not None and manifest.n == len(paths)
    elif manifest is not None:
        # a Hub source is fetched again at the commit recorded (from the cache when it is there)
        # an object-store source (its URL) is read from there again
        paths = [(s.path if is_url(s.path) else Path(s.path)) if s.hub is None else f"{s.hub.repo_id}@{s.hub.commit}"
                 for s in manifest.sources]
        steps = [s.step for s in manifest.sources]
        self_fusion = manifest.kind == "self-fusion"
        use_manifest_options = True
        for p in paths:
            if isinstance(p, Path) and not p.exists():
                raise InputError(f"source {p} recorded in {fused / MANIFEST_NAME} is not there",
                                 "pass the sources with --sources A B ... (and --times K for self-fusion)")
    else:
        raise UsageError(f"{fused} has no manifest: name its sources", "pass --sources A B ... (or --sources A --times K)")
    conversion = manifest is not None and manifest.kind == "conversion"
    if len(paths) < 2 and not conversion:
        raise UsageError("verification needs two or more sources, or one with --times K")
    if opts.sources or manifest is None:
        steps = [None] * len(paths)

    if self_fusion:
        sources = [open_source(paths[0], step=steps[0])] * len(paths)
    else:
        sources = [open_source(p, step=st) for p, st in zip(paths, steps)]
    report.sources = [str(p) for p in paths]
    if manifest is not None and not opts.sources:
        _check_source_digests(manifest, sources)
    options = _options_from_manifest(manifest if use_manifest_options else None, len(sources), self_fusion,
                                     fused / MANIFEST_NAME)

    preset: Preset | None = None
    if opts.rules:
        preset = load_rules(opts.rules)
    elif manifest is not None:
        preset = _preset_from_manifest(manifest, fused)
    plan = build_plan(sources, options, preset)
    report.meta.update({"preset": plan.preset.name, "n": plan.n, "weights": list(options.weights),
                        "norm": options.norm, "noise": options.describe_noise(), "seed": options.seed,
                        "self_fusion": self_fusion})

    tokens = _text_tokens(opts, plan, fused) if opts.text is not None else None  # refused before any work

    skipped = _function_not_run(plan, fused, opts, options)  # for a reason of its own, whatever else failed
    if skipped is None and not plan.options.convert_only:
        prepare_runtime(plan.config or {})  # the runtime's imports, while the tensor level runs
    fused_ck = _open_fused(fused, report)
    report.run("tensors", lambda: verify_tensors(plan, fused_ck, opts.strict, None))
    report.run("config", lambda: [check_config(plan, fused_ck, use_manifest_options)])
    if skipped is not None:
        report.add(skipped)
    elif not plan.options.convert_only:  # a conversion's function is its source's: the tensor level proves it
        report.run("function", lambda: verify_function(plan, fused_ck, report, view_of=model_view, probes=opts.probes,
                                                       seq_len=opts.seq_len, seed=opts.seed, tol=opts.tol,
                                                       strict=opts.strict, tokens=tokens))
    return report


def _function_not_run(plan: Plan, fused: Path, opts: VerifyOptions, options: FuseOptions) -> Check | None:
    if options.allow_nonfinite:
        return Check("function", "skip", "sources hold NaN/Inf (fused with --allow-nonfinite, recorded in the "
                     "manifest): no function to compare; tensor level only")
    if not opts.function:
        return Check("function", "skip", "not run (--no-function): integrity and tensor level only")
    return None
