"""Executing a plan: stream tensors from the sources through the ops into the writer.

Writers that take pieces (safetensors) get each fused tensor as ~1 MiB row blocks computed on a
worker thread ahead of the writer: memory holds the sources of at most two consecutive tensors and
a ring of block buffers, never a whole fused tensor. Other writers (T5X, Orbax, transposing
conversions) get one tensor at a time. The output is written into a temporary sibling directory,
fsynced, and renamed into place only when complete; on any error or signal the temporary
directory is removed. Inputs are only ever read.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import queue
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
from .errors import UsageError
from .formats.adapter import OutputInfo
from .formats.base import OutputTensor, gather
from .formats.files import fsync_path, sha256_file, write_file
from .formats.hf import MANIFEST_NAME
from .formats.objstore import parse_url
from .ir import Checkpoint
from .manifest import Manifest
from .memory import TRIM_AFTER_BYTES, release_free_memory
from .model_card import write_card
from .compute import compute_tensor, head_norm_tensors
from .grouped_norm import HEAD_NORMS_FILE
from .plan import Plan, PlanEntry
from .rules.engine import preset_digest
from .untrusted import resolve

Progress = Callable[[PlanEntry], None]


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
        for name, f in ck.weight_file_names().items():
            if f not in seen:
                seen[f] = sha256_file(f) if f.is_file() else ""
            files[name] = seen[f]
        record = {"path": ck.metadata.get("source_url") or str(resolve(ck.path)), "format": ck.format,
                  "step": ck.metadata.get("step"), "files": files}
        hub = ck.metadata.get("hub")
        if hub is not None:
            record["hub"] = {"repo_id": hub.repo_id, "revision": hub.revision, "commit": hub.commit}
        out.append(record)
    return out


def _location(output: Path) -> Path:
    """Where the output directory will be: the real path of its parent, plus its name. A symlink at
    ``-o`` is itself replaced (with --force), never followed."""
    return resolve(output.parent, error=UsageError) / output.name


def _temp_path(output: Path) -> Path:
    return output.parent / f".{output.name}.deepfuse-tmp-{os.getpid()}"


def check_output_path(output: Path, sources: list[Checkpoint], force: bool) -> None:
    out = _location(output)
    for ck in sources:
        src = resolve(ck.path)
        if out == src or (src.is_dir() and src in out.parents) or (out in src.parents):
            raise UsageError(f"output {output} overlaps input {ck.path}",
                             "write the fused checkpoint somewhere outside its inputs")
    if os.path.lexists(output) and not force:
        what = f" (a symlink to {os.readlink(output)})" if output.is_symlink() else ""
        raise UsageError(f"output {output} already exists{what}", "pass --force to replace it, or choose another path")
    parent = _existing_ancestor(out.parent)
    if not parent.is_dir():
        raise UsageError(f"cannot create {output}: {parent} is not a directory", "choose another output path")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write to {parent} (permission denied or read-only)", "choose a writable location")
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    # the temporary directory's name is the longest this run creates there, beside any missing parent
    longest = max(len(os.fsencode(name)) for name in [*out.relative_to(parent).parts[:-1], _temp_path(out).name])
    if longest > name_max:
        raise UsageError(f"output {output}: name too long for the filesystem at {parent} ({longest} bytes with the "
                         f"temporary suffix, at most {name_max})", "choose a shorter output name")


def _existing_ancestor(path: Path) -> Path:
    path = resolve(path, error=UsageError)
    while not os.path.exists(path):  # False for a name too long, too
        path = path.parent
    return path


def _make_parents(output: Path) -> list[Path]:
    """Create the output's missing parent directories; return them, deepest first."""
    created = []
    p = _location(output).parent
    while not os.path.exists(p):
        created.append(p)
        p = p.parent
    for d in reversed(created):
        d.mkdir()
    return created


def _flock(fd: int, wait: bool = True) -> bool | None:
    """An exclusive ``flock`` on ``fd``: True when taken, False when another process holds it (only
    without ``wait``), None where the filesystem has no such locks. It dies with the process."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise


@contextmanager
def _locked(directory: Path, *, wait: bool = True, follow: bool = True):
    """``_flock`` on ``directory`` while the block runs (yields what it returned)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | (0 if follow else os.O_NOFOLLOW))
    try:
        yield _flock(fd, wait)
    finally:
        os.close(fd)


def _make_temp(output: Path) -> tuple[Path, int]:
    """Create this run's temporary directory beside ``output`` and lock it for the run's lifetime (the
    returned descriptor holds the lock); first remove temporary directories of earlier runs to the
    same output that died (SIGKILL, power loss): a directory whose lock can be taken has no live owner.
    Both happen under a lock on the parent, so a live run's directory is never seen unlocked."""
    tmp = _temp_path(output)
    prefix = tmp.name[:-len(str(os.getpid()))]
    with _locked(output.parent):
        for p in output.parent.iterdir():
            if p.name.startswith(prefix) and p.name[len(prefix):].isdecimal() and p.is_dir() and not p.is_symlink():
                try:
                    with _locked(p, wait=False, follow=False) as mine:
                        if mine is True:
                            shutil.rmtree(p, ignore_errors=True)
                except OSError:  # gone meanwhile, or not ours to open: left alone
                    pass
        tmp.mkdir()
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        _flock(fd)
    return tmp, fd


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
    manifest: Manifest


def build_manifest(plan: Plan, files: dict[str, str], sources_info: list[dict]) -> Manifest:
    o = plan.options
    return Manifest.model_validate({
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
    })


def make_writer(plan: Plan, directory: Path, outputs: list[OutputTensor]):
    """The streaming writer of the plan's output format."""
    adapter = plan.output_adapter
    return adapter.writer(directory, outputs, adapter.writer_metadata(plan.sources[0], plan.options.max_shard_size))


def _write_output_config(plan: Plan, tmp: Path, files: dict[str, str]) -> None:
    """The files the output format keeps beside the tensors (config.json and copied extras for a
    Hugging Face directory, fused.gin beside a T5X/Orbax checkpoint)."""
    what = ("converted by deepfuse" if plan.options.convert_only else
            f"Deep Fusion of {plan.n} models by deepfuse {__version__}")
    carried = plan.state is not None
    text = plan.family.config_text(plan.output_config, plan.output_adapter.naming.value, note=what,
                                   optimizer_state=carried)
    info = OutputInfo(config=plan.output_config, first=plan.sources[0], provenance=what, optimizer_state=carried,
                      config_text=text)
    files.update(plan.output_adapter.write_sidecars(tmp, info))


def _write_head_norms(plan: Plan, tmp: Path) -> dict[str, str]:
    """Each head's own norm scale, beside the weights (the stock tensor holds one for every head)."""
    from safetensors.torch import save

    path = tmp / HEAD_NORMS_FILE
    write_file(path, save(head_norm_tensors(plan)))
    return {HEAD_NORMS_FILE: sha256_file(path)}


def write_plan(plan: Plan, output: Path, *, force: bool = False, progress: Progress | None = None,
               command: str | None = None) -> FuseResult:
    """Execute ``plan`` into ``output`` atomically (an object-store URL: see ``_write_to_store``).
    ``command``: the command line, as the model card of a Hugging Face output shows it."""
    url = parse_url(output)
    if url is not None:
        return _write_to_store(plan, url, force=force, progress=progress, command=command)
    output = Path(output)
    check_output_path(output, plan.sources, force)
    check_free_space(plan, output)
    created = _make_parents(output)
    tmp, tmp_lock = None, None
    conversion = plan.conversion
    outputs = conversion.outputs(plan.entries)
    if plan.state is not None:
        outputs += [OutputTensor(e.name, e.shape, e.dtype) for e in plan.state.entries]
    with _signals_raise(), ThreadPoolExecutor(max_workers=1) as pool:
        digest_job = pool.submit(source_digests, plan.sources)
        try:
            tmp, tmp_lock = _make_temp(output)
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
            if plan.writes_head_norms:
                files.update(_write_head_norms(plan, tmp))
            _write_output_config(plan, tmp, files)
            manifest = build_manifest(plan, dict(sorted(files.items())), digest_job.result())
            write_file(tmp / MANIFEST_NAME, manifest.dumps().encode())
            if plan.output_adapter.model_card:
                write_card(tmp, manifest, command=command)
            fsync_path(tmp)
            _replace(tmp, output, force)
        except BaseException as exc:
            if tmp is not None:
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
        finally:
            if tmp_lock is not None:
                os.close(tmp_lock)
    return FuseResult(output=output, files=manifest.files, total_bytes=plan.total_bytes, manifest=manifest)


def _write_to_store(plan: Plan, url, *, force: bool, progress: Progress | None, command: str | None) -> FuseResult:
    """Write the output locally (the same bytes as a local run), then upload it to the object store,
    committed the way orbax commits on GCS (its marker last). The prefix must hold no objects unless
    ``force``; then it holds exactly the new output, its old objects removed only once the new output
    is complete locally. When anything fails, what this run uploaded (early or not) is removed again.
    Into an empty prefix, finished data files are uploaded while the rest is still being written."""
    from .formats import objstore

    if not url.prefix:
        raise UsageError(f"output {url}: a whole bucket", f"name a prefix inside it, e.g. {url}/fused")
    if not plan.output_adapter.stepped:
        raise UsageError(f"output {url}: only T5X and Orbax checkpoints are written to object storage",
                         "pass --to t5x or --to orbax, or write to a local directory")
    for ck in plan.sources:
        src = parse_url(ck.metadata.get("source_url"))
        if src is not None and (url.contains(src) or src.contains(url)):
            raise UsageError(f"output {url} overlaps input {src}", "write the fused checkpoint somewhere outside its inputs")
    store = objstore.Store(url)
    existing = store.list_keys()  # also proves the bucket is there and ours to use, before any work
    if existing and not force:
        raise UsageError(f"output {url} already holds {len(existing)} objects",
                         "pass --force to replace them, or choose another prefix")
    staging = objstore.temp_dir("deepfuse-output-")
    local = staging / "output"
    # into an empty prefix, finished data files go up while the rest is being written
    early = objstore.EarlyUploader(store, _temp_path(local)) if not existing else None
    try:
        try:
            result = write_plan(plan, local, force=False, progress=progress, command=command)
        finally:
            sent = early.stop() if early is not None else {}
        files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
        with _signals_raise():
            current = [k for k in store.list_keys() if k not in sent]
            if current and not force:
                raise UsageError(f"output {url} received objects while this run was writing (another run?); "
                                 "nothing was replaced and nothing was written",
                                 "pass --force to replace them, or choose another prefix")
            objstore.upload_checkpoint(local, url, files, current, sent=sent, digests=result.files, store=store)
    except BaseException:
        if early is not None:  # what this run put there early (the rest is removed by upload_checkpoint)
            objstore.discard(store, early.sent)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return FuseResult(output=str(url), files=result.files, total_bytes=result.total_bytes, manifest=result.manifest)


def _replace(tmp: Path, output: Path, force: bool) -> None:
    """Rename ``tmp`` to ``output``. An existing output (``force``) is moved aside first and removed
    after. Nothing that appeared at ``output`` since the run began is ever replaced without ``force``:
    the check and the rename happen under a lock on the parent that every run takes, and the rename
    itself refuses to replace where the system can say so."""
    appeared = UsageError(f"output {output} appeared while this run was writing (another run?); nothing was "
                          "replaced and nothing was written", "pass --force to replace it, or choose another path")
    with _locked(output.parent):
        if os.path.lexists(output):
            if not force:
                raise appeared
            old = output.parent / f".{output.name}.deepfuse-old-{os.getpid()}"
            os.rename(output, old)
            try:
                _rename_noreplace(tmp, output)
            except BaseException:
                os.rename(old, output)
                raise
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        else:
            try:
                _rename_noreplace(tmp, output)
            except FileExistsError:  # not a deepfuse run: something else created it
                raise appeared from None
    fsync_path(output.parent)


_RENAME_NOREPLACE = 1  # linux/fs.h
_AT_FDCWD = -100


def _rename_noreplace(src: Path, dst: Path) -> None:
    """``rename`` that fails (FileExistsError) rather than replace ``dst``: Linux's renameat2 with
    RENAME_NOREPLACE; elsewhere (or where the filesystem lacks it) a plain rename, which the caller's
    lock protects from other runs."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), str(dst))
    os.rename(src, dst)


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
