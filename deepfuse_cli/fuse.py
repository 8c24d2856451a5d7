"""Executing a plan: stream tensors from the sources through the ops into the writer.

Writers that take pieces (safetensors) get each fused tensor as ~1 MiB row blocks computed on a
worker thread ahead of the writer: memory holds the sources of at most two consecutive tensors and
a ring of block buffers, never a whole fused tensor. Other writers (T5X, Orbax, transposing
conversions) get one tensor at a time. The output is written into a temporary sibling directory,
fsynced, and renamed into place only when complete; on any error or signal the temporary
directory is removed. Inputs are only ever read.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__, ops
from .errors import InputError, UsageError
from .formats.base import OutputTensor, gather
from .formats.files import fsync_path, sha256_file, write_file
from .formats.hf import MANIFEST_NAME, HFWriter
from .ir import Checkpoint
from .memory import TRIM_AFTER_BYTES, release_free_memory
from .convert import writer_metadata
from .plan import Plan, PlanEntry
from .rules.engine import preset_digest

Progress = Callable[[PlanEntry], None]


def compute_tensor(plan: Plan, entry: PlanEntry, loaded: list[torch.Tensor] | None = None, *,
                   ring: ops.BufferRing | None = None, pool: Executor | None = None):
    """The fused value of one planned tensor: its rule's op, looked up in the op registry.

    With ``ring``: an iterator over the value's consecutive row blocks (slabs along axis 0, which
    may live in ``ring``'s buffers), never the whole tensor at once; noise of later block rows may be
    drawn ahead on ``pool``. Without: those row blocks gathered into one tensor. The sources are
    loaded and checked (and the noise scale measured) before this returns.
    """
    opts = plan.options
    n = plan.n
    if loaded is None:
        if opts.self_fusion:
            loaded = [plan.tensors[0][entry.name].load()] * n
        else:
            loaded = [plan.tensors[m][entry.name].load() for m in range(n)]
        for m in range(1 if opts.self_fusion else n):
            _check_finite(plan, entry.name, m, loaded[m])
    noise = None
    if entry.noise:
        std = opts.noise_std if opts.noise_std > 0 else opts.noise_scale * ops.rms(loaded)
        if std > 0:
            noise = ops.OffDiagonalNoise(opts.seed, entry.name, std, preserving=opts.noise_mode == "preserving")
    ctx = ops.FuseContext(dtype=entry.dtype, weights=opts.weights, scales=entry.scales, noise=noise, ring=ring,
                          pool=pool)
    try:
        blocks = entry.rule.fusion_op.rows(loaded, entry.rule, ctx)
    except ops.FusionMismatch as exc:
        raise InputError(f"tensor {entry.name!r}: {exc}", exc.hint) from None
    return blocks if ring is not None else gather(blocks, entry.name, entry.shape, entry.dtype)


def _check_finite(plan: Plan, name: str, m: int, tensor: torch.Tensor) -> None:
    """Refuse a source tensor holding NaN/Inf, or with ``allow_nonfinite`` record it in ``plan.nonfinite``."""
    if not tensor.is_floating_point():
        return
    t = tensor if tensor.dtype != torch.float8_e4m3fn else tensor.to(torch.float16)  # no isfinite kernel for it
    if ops.all_finite(t):  # one pass, no temporaries the size of the tensor
        return
    count = int(t.numel() - int(torch.isfinite(t).sum()))
    where = plan.tensors[m][name].source or str(plan.sources[m].path)
    if not plan.options.allow_nonfinite:
        raise InputError(f"{where}: tensor {name!r} has {count} non-finite value(s) (NaN or Inf)",
                         "the source is corrupt or diverged; pass --allow-nonfinite to fuse it anyway")
    plan.nonfinite.append({"source": m + 1, "file": where, "tensor": name, "count": count})


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class _RowBlocks:
    """The row blocks of ``entries`` (in order), computed on a worker thread ``ops.BLOCKS_AHEAD``
    blocks ahead of the consumer, so that fusing (loading, noise) overlaps writing and hashing.

    Blocks live in a ring of ``BLOCKS_AHEAD + 3`` buffers: one being filled, ``BLOCKS_AHEAD``
    queued, and the two the consumer may still hold (the writer contract: done with block k before
    asking for block k + 2). Errors on the worker are raised in the consumer.
    """

    _END = object()

    def __init__(self, plan: Plan, entries: list[PlanEntry]):
        self.ring = ops.BufferRing(ops.BLOCKS_AHEAD + 3, noise_ahead=plan.noise_ahead_bytes)
        self._queue: queue.Queue = queue.Queue(ops.BLOCKS_AHEAD)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(plan, entries), name="deepfuse-fuse", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, plan: Plan, entries: list[PlanEntry]) -> None:
        # A second thread loads (and checks) the next tensor's sources while this one's blocks are
        # computed (at most two tensors' sources are in memory), and draws noise ahead.
        loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deepfuse-load")
        try:
            upcoming = loader.submit(compute_tensor, plan, entries[0], ring=self.ring, pool=loader) if entries else None
            for k, entry in enumerate(entries):
                blocks = upcoming.result()
                upcoming = (loader.submit(compute_tensor, plan, entries[k + 1], ring=self.ring, pool=loader)
                            if k + 1 < len(entries) else None)
                for block in blocks:
                    if not self._put(block):
                        return
                del blocks
                if not self._put(self._END):
                    return
        except BaseException as exc:  # handed to the consumer
            self._put(_Failure(exc))
        finally:
            loader.shutdown(wait=True, cancel_futures=True)

    def next_tensor(self):
        """The next tensor's row blocks."""
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()


def source_digests(sources: list[Checkpoint]) -> list[dict]:
    out = []
    seen: dict[Path, str] = {}
    for ck in sources:
        files = {}
        for f in ck.weight_files:
            f = Path(f)
            if f not in seen:
                seen[f] = sha256_file(f) if f.is_file() else ""
            files[f.relative_to(ck.path).as_posix() if ck.path.is_dir() else str(f.resolve())] = seen[f]
        out.append({"path": str(ck.path.resolve()), "format": ck.format, "step": ck.metadata.get("step"),
                    "files": files})
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


class Interrupted(KeyboardInterrupt):
    """SIGTERM/SIGINT while writing: the CLI reports it as an interruption (exit 128 + signal), not a crash."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def _signals_raise():
    """SIGTERM (and SIGINT) raise, so the cleanup in ``write_plan`` runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        for s in (signal.SIGTERM, signal.SIGINT):  # a second signal must not interrupt the cleanup
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


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
        "kind": "conversion" if o.convert_only else ("self-fusion" if o.self_fusion else "fusion"),
        "output_format": plan.output_format,
        "conversion": plan.conversion.to_json(),
        "optimizer_state": o.optimizer_state if plan.sources_have_optimizer_state else None,
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
        "nonfinite": plan.nonfinite,
        "files": files,
    }


def make_writer(plan: Plan, directory: Path, outputs: list[OutputTensor]):
    """The streaming writer for the plan's output format (Hugging Face directory by default)."""
    fmt = plan.output_format
    if fmt == "t5x":
        from .formats.t5x import T5XWriter

        return T5XWriter(directory, outputs, writer_metadata(fmt, plan.sources[0]))
    if fmt == "orbax":
        from .formats.orbax import OrbaxWriter

        return OrbaxWriter(directory, outputs, writer_metadata(fmt, plan.sources[0]))
    return HFWriter(directory, outputs, {"max_shard_size": plan.options.max_shard_size,
                                         "safetensors_metadata": {"format": "pt"}})


def _write_output_config(plan: Plan, tmp: Path, files: dict[str, str]) -> None:
    """config.json for a Hugging Face output, fused.gin beside a T5X/Orbax one."""
    cfg = plan.output_config
    if cfg is None:
        return
    if plan.output_format == "hf":
        data = (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()
        write_file(tmp / "config.json", data)
        files["config.json"] = hashlib.sha256(data).hexdigest()
        return
    if cfg.get("model_type") == "t5x":
        from .architectures.t5x import gin_overrides

        what = ("converted by deepfuse" if plan.options.convert_only else
                f"Deep Fusion of {plan.n} models by deepfuse {__version__}")
        carried = plan.state is not None
        data = gin_overrides(cfg, note=f"Model widths of this checkpoint ({what})",
                             optimizer_state=None if carried else "drop").encode()
        write_file(tmp / "fused.gin", data)
        files["fused.gin"] = hashlib.sha256(data).hexdigest()


def write_plan(plan: Plan, output: Path, *, force: bool = False, progress: Progress | None = None) -> FuseResult:
    """Execute ``plan`` into ``output`` atomically."""
    output = Path(output)
    check_output_path(output, plan.sources, force)
    check_free_space(plan, output)
    created = _make_parents(output)
    tmp = output.parent / f".{output.name}.deepfuse-tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    conversion = plan.conversion
    outputs = conversion.outputs(plan.entries)
    if plan.state is not None:
        outputs += [OutputTensor(e.name, e.shape, e.dtype) for e in plan.state.entries]
    with _signals_raise(), ThreadPoolExecutor(max_workers=1) as pool:
        digest_job = pool.submit(source_digests, plan.sources)
        try:
            tmp.mkdir()
            writer = make_writer(plan, tmp, outputs)
            # Every tensor comes as row blocks, computed on a worker thread ahead of the writer (which
            # hashes on a thread of its own): writers that stream write the blocks as they come, the others
            # gather them into the one tensor they encode; a transposing conversion gathers, then transposes.
            # Either way the ops make no temporaries of the tensor's size.
            entries = [e for e in plan.entries if e.name not in conversion.drop]
            threads, pipeline = torch.get_num_threads(), None
            try:
                if entries:  # parallel by pipeline (fuse | write | hash): torch's own threads would only contend
                    torch.set_num_threads(1)
                    pipeline = _RowBlocks(plan, entries)
                for entry in entries:
                    if entry.name in conversion.transpose:
                        tensor = gather(pipeline.next_tensor(), entry.name, entry.shape, entry.dtype)
                        writer.write(*conversion.apply(entry.name, tensor))
                        del tensor
                    else:
                        writer.write_chunks(conversion.out_name(entry.name), pipeline.next_tensor())
                    if entry.nbytes >= TRIM_AFTER_BYTES:  # codecs leave their many small buffers behind
                        release_free_memory()
                    if progress:
                        progress(entry)
                if pipeline is not None:
                    pipeline.close()
                for state_entry in (plan.state.entries if plan.state is not None else []):
                    writer.write(state_entry.name, plan.state.compute(state_entry))
                writer.finish()
            except BaseException:
                if pipeline is not None:
                    pipeline.close()
                writer.abort()
                raise
            finally:
                torch.set_num_threads(threads)
            files = dict(writer.digests)
            _write_output_config(plan, tmp, files)
            for extra in (plan.sources[0].extra_files if plan.output_format == "hf" else []):
                shutil.copyfile(extra, tmp / extra.name)
                files[extra.name] = sha256_file(tmp / extra.name)
            manifest = build_manifest(plan, dict(sorted(files.items())), digest_job.result())
            write_file(tmp / MANIFEST_NAME, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
            fsync_path(tmp)
            _replace(tmp, output)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            for d in created:
                try:
                    d.rmdir()
                except OSError:
                    break
            if isinstance(exc, OSError):  # disk full, file too large, I/O error: a message, not a traceback
                where = f" ({exc.filename})" if exc.filename else ""
                raise UsageError(f"writing {output} failed: {exc.strerror or exc}{where}; nothing was written",
                                 "free space (or fix permissions) at the destination and retry") from None
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
    fsync_path(output.parent)
