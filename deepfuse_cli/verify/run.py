"""Orchestration of ``deepfuse verify``: resolve sources and options, run the checks, judge."""

from __future__ import annotations

import json
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..errors import InputError, UsageError
from ..sources import open_source
from ..formats.files import sha256_file
from ..formats.hf import MANIFEST_NAME
from ..formats.registry import HUGGING_FACE, for_checkpoint
from ..fuse import write_plan
from ..ir import Checkpoint
from ..plan import DTYPES, FuseOptions, build_plan
from ..rules import load_rules
from ..rules.schema import Preset
from .function_level import verify_function
from .report import Check, Report
from .tensor_level import verify_tensors


@dataclass
class VerifyOptions:
    sources: list[Path] | None = None
    times: int | None = None
    rules: str | None = None
    probes: int = 4
    seq_len: int = 16
    seed: int = 0
    tol: float | None = None
    strict: bool = False
    integrity_only: bool = False
    function: bool = True


def read_manifest(fused: Path) -> dict | None:
    path = fused / MANIFEST_NAME if fused.is_dir() else None
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: unreadable manifest ({exc})", "pass --sources to verify without it") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: the manifest is not a JSON object")
    return data


def check_integrity(fused: Path, manifest: dict) -> Check:
    files = manifest.get("files") or {}
    bad = []
    for name, digest in sorted(files.items()):
        p = fused / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not p.is_file():
            bad.append(f"{name} is missing")
        elif sha256_file(p) != digest:
            bad.append(f"{name} was modified after the manifest was written (sha256 differs)")
    if bad:
        return Check("integrity", "fail", bad[0], {"problems": bad, "files": len(files)})
    return Check("integrity", "pass", f"{len(files)} files match the sha256 recorded in {MANIFEST_NAME}",
                 {"files": len(files)})


def _options_from_manifest(manifest: dict | None, n: int, self_fusion: bool) -> FuseOptions:
    if manifest is None:
        return FuseOptions(weights=tuple([1.0 / n] * n), self_fusion=self_fusion)
    noise = manifest.get("noise") or {}
    dtype = manifest.get("dtype")
    return FuseOptions(
        weights=tuple(manifest.get("weights") or [1.0 / n] * n),
        norm=(manifest.get("norm") or {}).get("mode", "rule"),
        noise_std=float(noise.get("std", 0.0)), noise_scale=float(noise.get("scale", 0.0)),
        noise_mode=noise.get("mode") if noise.get("mode") in ("offdiag", "preserving") else "offdiag",
        seed=int(manifest.get("seed", 0)), dtype=DTYPES.get(dtype) if dtype else None, self_fusion=self_fusion,
        output_format=manifest.get("output_format"), convert_only=manifest.get("kind") == "conversion",
        optimizer_state=manifest.get("optimizer_state") or "drop",
        allow_nonfinite=bool(manifest.get("nonfinite")),
    )


def _check_source_digests(manifest: dict, sources) -> None:
    for rec, ck in zip(manifest.get("sources", []), sources):
        for name, digest in (rec.get("files") or {}).items():
            path = Path(name) if Path(name).is_absolute() else ck.path / name
            if path.is_file() and digest and sha256_file(path) != digest:
                raise InputError(f"source {ck.path}: {path.name} changed since the fusion (sha256 differs from the manifest)",
                                 "pass the original sources with --sources")


def hf_view(ck: Checkpoint, workdir: Path) -> Path:
    """A Hugging Face directory computing what ``ck`` computes: itself, or a T5X/Orbax checkpoint
    converted (the runtime loads Hugging Face directories)."""
    if for_checkpoint(ck) is HUGGING_FACE:
        return ck.path
    plan = build_plan([ck], FuseOptions(weights=(1.0,), convert_only=True, output_format=HUGGING_FACE.name))
    dest = Path(tempfile.mkdtemp(prefix="hf-view-", dir=workdir)) / "model"
    write_plan(plan, dest)
    return dest


def run_verify(fused: Path, opts: VerifyOptions) -> Report:
    fused = Path(fused)
    if not fused.exists():
        raise InputError(f"{fused}: no such file or directory")
    manifest = read_manifest(fused)
    report = Report(fused=str(fused), sources=[])
    report.meta.update({"deepfuse_version": __version__, "torch": torch.__version__, "python": platform.python_version()})
    try:
        import transformers

        report.meta["transformers"] = transformers.__version__
    except ImportError:
        report.meta["transformers"] = None

    if manifest is not None:
        report.add(check_integrity(fused, manifest))
    elif opts.integrity_only:
        raise InputError(f"{fused}: no {MANIFEST_NAME} manifest, so there are no recorded digests to check",
                         "verify against the sources with --sources")
    else:
        report.add(Check("integrity", "skip", f"no {MANIFEST_NAME} in {fused}: written by another tool"))
    if opts.integrity_only:
        return report

    # sources: --sources overrides the manifest
    if opts.sources:
        paths = list(opts.sources)
        if opts.times is not None:
            if len(paths) != 1 or opts.times < 2:
                raise UsageError("--times needs exactly one source and K >= 2")
            paths = paths * opts.times
        self_fusion = opts.times is not None or (manifest is not None and manifest.get("kind") == "self-fusion")
        use_manifest_options = manifest is not None and int(manifest.get("n", 0)) == len(paths)
    elif manifest is not None:
        paths = [Path(s["path"]) for s in manifest.get("sources", [])]
        steps = [s.get("step") for s in manifest.get("sources", [])]
        self_fusion = manifest.get("kind") == "self-fusion"
        use_manifest_options = True
        for p in paths:
            if not p.exists():
                raise InputError(f"source {p} recorded in {fused / MANIFEST_NAME} is not there",
                                 "pass the sources with --sources A B ... (and --times K for self-fusion)")
    else:
        raise UsageError(f"{fused} has no manifest: name its sources", "pass --sources A B ... (or --sources A --times K)")
    conversion = manifest is not None and manifest.get("kind") == "conversion"
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
    options = _options_from_manifest(manifest if use_manifest_options else None, len(sources), self_fusion)

    preset: Preset | None = None
    if opts.rules:
        preset = load_rules(opts.rules)
    elif manifest is not None and isinstance(manifest.get("rules"), dict):
        preset = Preset.model_validate(manifest["rules"])
    plan = build_plan(sources, options, preset)
    report.meta.update({"preset": plan.preset.name, "n": plan.n, "weights": list(options.weights),
                        "norm": options.norm, "noise": options.describe_noise(), "seed": options.seed,
                        "self_fusion": self_fusion})

    fused_ck = open_source(fused)
    for check in verify_tensors(plan, fused_ck, opts.strict, None):
        report.add(check)
    if options.allow_nonfinite:
        report.add(Check("function", "skip", "sources hold NaN/Inf (fused with --allow-nonfinite, recorded in the "
                         "manifest): no function to compare; tensor level only"))
    elif opts.function and fused.is_dir() and not plan.options.convert_only:
        for check in verify_function(plan, fused_ck, report, hf_view=hf_view, probes=opts.probes, seq_len=opts.seq_len, seed=opts.seed,
                                     tol=opts.tol, strict=opts.strict):
            report.add(check)
    return report
