"""Executing a plan: stream tensors from the sources through the ops into the writer.

One output tensor is in memory at a time (plus its sources). The output is written into a
temporary sibling directory, fsynced, and renamed into place only when complete; on any
error or signal the temporary directory is removed. Inputs are only ever read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__, ops
from .errors import InputError, UsageError
from .formats.base import OutputTensor
from .formats.hf import MANIFEST_NAME, HFWriter, write_file
from .ir import Checkpoint
from .plan import Plan, PlanEntry
from .rules.engine import preset_digest

Progress = Callable[[PlanEntry], None]


def compute_tensor(plan: Plan, entry: PlanEntry, loaded: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The fused value of one planned tensor."""
    opts = plan.options
    rule = entry.rule
    n = plan.n
    if loaded is None:
        if opts.self_fusion:
            loaded = [plan.tensors[0][entry.name].load()] * n
        else:
            loaded = [plan.tensors[m][entry.name].load() for m in range(n)]
    widened = rule.widened_axes
    dtype = entry.dtype

    std = 0.0
    if entry.noise:
        std = opts.noise_std if opts.noise_std > 0 else opts.noise_scale * ops.rms(loaded)
    preserving = opts.noise_mode == "preserving"

    def block_diag(tensors: list[torch.Tensor], part: int | None) -> torch.Tensor:
        offdiag = None
        if entry.noise and std > 0:
            def offdiag(i: int, j: int, shape: tuple[int, ...]) -> torch.Tensor:
                key = (i, j) if part is None else (part, i, j)
                return ops.gaussian(opts.seed, entry.name, key, shape, std)
        return ops.block_diagonal(tensors, (widened[0], widened[1]), offdiag=offdiag,
                                  preserving_input_axis=rule.input_axis if (preserving and offdiag) else None,
                                  dtype=dtype)

    if rule.op == "block_diagonal":
        return block_diag(list(loaded), None)
    if rule.op == "concat":
        return ops.concat(loaded, widened[0], dtype=dtype)
    if rule.op == "split_fuse_concat":
        split_axis = rule.axes.index("qkv")
        if len(widened) == 2:
            inner = block_diag
        else:
            def inner(pieces: list[torch.Tensor], part: int) -> torch.Tensor:
                return ops.concat(pieces, split_axis, dtype=dtype)
        return ops.split_fuse_concat(loaded, split_axis, rule.parts, inner)
    if rule.op == "output_average":
        return ops.output_average(loaded, widened[0], entry.scales, dtype=dtype)
    if rule.op == "bias_average":
        return ops.bias_average(loaded, plan.options.weights, dtype=dtype)
    if rule.op == "passthrough_identical":
        try:
            return ops.passthrough_identical(loaded, dtype=dtype)
        except ops.FusionMismatch as exc:
            raise InputError(f"tensor {entry.name!r}: {exc}", "this tensor must be identical in every source") from None
    raise AssertionError(f"unknown op {rule.op}")  # unreachable: the schema validates ops


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(16 * 2**20):
            h.update(chunk)
    return h.hexdigest()


def source_digests(sources: list[Checkpoint]) -> list[dict]:
    out = []
    seen: dict[Path, str] = {}
    for ck in sources:
        files = {}
        for f in ck.weight_files:
            f = Path(f)
            if f not in seen:
                seen[f] = sha256_file(f) if f.is_file() else ""
            files[f.name if ck.path.is_dir() else str(f.resolve())] = seen[f]
        out.append({"path": str(ck.path.resolve()), "format": ck.format, "files": files})
    return out


def check_output_path(output: Path, sources: list[Checkpoint], force: bool) -> None:
    out = output.resolve()
    for ck in sources:
        src = ck.path.resolve()
        if out == src or (src.is_dir() and src in out.parents) or (out in src.parents):
            raise UsageError(f"output {output} overlaps input {ck.path}",
                             "write the fused checkpoint somewhere outside its inputs")
    if output.exists() and not force:
        raise UsageError(f"output {output} already exists", "pass --force to replace it, or choose another path")
    parent = out.parent
    while not parent.exists():  # missing parents are created at write time (and removed on failure)
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"cannot create {output}: {parent} is not a directory", "choose another output path")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write to {parent} (permission denied or read-only)", "choose a writable location")


def _existing_ancestor(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def _make_parents(output: Path) -> list[Path]:
    """Create the output's missing parent directories; return them, deepest first."""
    created = []
    p = output.resolve().parent
    while not p.exists():
        created.append(p)
        p = p.parent
    for d in reversed(created):
        d.mkdir()
    return created


def check_free_space(plan: Plan, output: Path) -> None:
    free = shutil.disk_usage(_existing_ancestor(output.parent)).free
    need = plan.disk_needed
    if need > free:
        raise UsageError(f"not enough free space at {_existing_ancestor(output.parent)}: the output needs "
                         f"{need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB are free", "free space or choose another location")


class Interrupted(Exception):
    pass


@contextmanager
def _signals_raise():
    """SIGTERM (and SIGINT) raise, so the cleanup in ``write_plan`` runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class FuseResult:
    output: Path
    files: dict[str, str]  # relative name -> sha256
    total_bytes: int
    manifest: dict


def build_manifest(plan: Plan, files: dict[str, str], sources_info: list[dict]) -> dict:
    o = plan.options
    return {
        "deepfuse_version": __version__,
        "kind": "self-fusion" if o.self_fusion else "fusion",
        "n": plan.n,
        "sources": sources_info,
        "preset": plan.preset.name,
        "preset_digest": preset_digest(plan.preset),
        "rules": plan.preset.model_dump(mode="json"),
        "weights": list(o.weights),
        "output_scales": plan.output_scales,
        "tied_sources": plan.tied,
        "norm": {"mode": o.norm, "groups": plan.norm_groups},
        "noise": o.describe_noise(),
        "seed": o.seed,
        "dtype": None if o.dtype is None else str(o.dtype).removeprefix("torch."),
        "plan_digest": plan.digest(),
        "files": files,
    }


def make_writer(plan: Plan, directory: Path, outputs: list[OutputTensor]):
    """The streaming writer for the plan's output format (Hugging Face directory by default)."""
    return HFWriter(directory, outputs, {"max_shard_size": plan.options.max_shard_size,
                                         "safetensors_metadata": {"format": "pt"}})


def write_plan(plan: Plan, output: Path, *, force: bool = False, progress: Progress | None = None) -> FuseResult:
    """Execute ``plan`` into ``output`` atomically."""
    output = Path(output)
    check_output_path(output, plan.sources, force)
    check_free_space(plan, output)
    created = _make_parents(output)
    tmp = output.parent / f".{output.name}.deepfuse-tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    outputs = [OutputTensor(e.name, e.shape, e.dtype) for e in plan.entries]
    with _signals_raise(), ThreadPoolExecutor(max_workers=1) as pool:
        digest_job = pool.submit(source_digests, plan.sources)
        try:
            tmp.mkdir()
            writer = make_writer(plan, tmp, outputs)
            try:
                for entry in plan.entries:
                    writer.write(entry.name, compute_tensor(plan, entry))
                    if progress:
                        progress(entry)
                writer.finish()
            except BaseException:
                writer.abort()
                raise
            files = dict(writer.digests)
            if plan.config is not None:
                data = (json.dumps(plan.config, indent=2, sort_keys=True) + "\n").encode()
                write_file(tmp / "config.json", data)
                files["config.json"] = hashlib.sha256(data).hexdigest()
            for extra in plan.sources[0].extra_files:
                shutil.copyfile(extra, tmp / extra.name)
                files[extra.name] = sha256_file(tmp / extra.name)
            manifest = build_manifest(plan, dict(sorted(files.items())), digest_job.result())
            write_file(tmp / MANIFEST_NAME, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
            _fsync_dir(tmp)
            _replace(tmp, output)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            for d in created:
                try:
                    d.rmdir()
                except OSError:
                    break
            raise
    return FuseResult(output=output, files=manifest["files"], total_bytes=plan.total_bytes, manifest=manifest)


def _replace(tmp: Path, output: Path) -> None:
    """Rename ``tmp`` to ``output``; an existing output is moved aside first and removed after."""
    if output.exists() or output.is_symlink():
        old = output.parent / f".{output.name}.deepfuse-old-{os.getpid()}"
        os.rename(output, old)
        try:
            os.rename(tmp, output)
        except BaseException:
            os.rename(old, output)
            raise
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.rename(tmp, output)
    _fsync_dir(output.parent)
