"""T5X and Orbax checkpoints on object storage (``gs://bucket/path``, ``s3://bucket/path``).

Every object is read and written through tensorstore's ``gcs`` and ``s3`` key-value drivers, with
many requests in flight. A source is copied into a temporary local directory (only the step it
reads, plus the files beside it), then read by the local reader; an output is written locally as
usual (the same bytes), then uploaded.

Object stores have no atomic rename, so an upload commits the way orbax does on GCS: every other
object first, the commit marker last. The marker of an Orbax checkpoint is ``commit_success.txt``
(orbax's ``CommitFileTemporaryPath``), in each item directory and then in the step directory --
this is what orbax checks before it restores from ``gs://``; it is written on S3 too, where orbax
0.12 also leaves one inside the directory it renames. A legacy T5X step is committed by its msgpack
``checkpoint`` file, which T5X's readers look for to find a step: it is uploaded last. A reader
refuses an Orbax prefix without the marker (as orbax does) and skips uncommitted steps.

Settings come from the usual places: credentials from tensorstore's default chains (AWS:
environment, profile files; Google: application default credentials); the endpoint of an
S3-compatible store from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, its region from
``AWS_REGION`` / ``AWS_DEFAULT_REGION``; a GCS emulator from ``STORAGE_EMULATOR_HOST`` (then, as
Google's client libraries do, without credentials). ``DEEPFUSE_OBJSTORE_CONCURRENCY`` (requests in
flight, default 32) and ``DEEPFUSE_OBJSTORE_RETRIES`` (retries of a failed request, default 4) tune
the transfers.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import InputError, UsageError

SCHEMES = {"s3": "s3", "gs": "gcs"}  # URL scheme -> tensorstore kvstore driver
COMMIT_MARKER = "commit_success.txt"  # orbax: atomicity_types.COMMIT_SUCCESS_FILE
T5X_MARKER = "checkpoint"  # the msgpack file of a legacy T5X step
ORBAX_METADATA = "_METADATA"
DEFAULT_CONCURRENCY = 32
DEFAULT_RETRIES = 4
#: bytes of object data held in memory by requests in flight (a larger object goes alone)
IN_FLIGHT_BYTES = 256 * 2**20
_STEP_NAME = re.compile(r"^(?:.*_)?(\d+)$")
_T5X_STEP = re.compile(r"^checkpoint_(\d+)$")


@dataclass(frozen=True)
class StoreURL:
    """``<scheme>://<bucket>/<prefix>``: a "directory" of an object store (prefix without slashes at
    either end; empty for the whole bucket)."""

    scheme: str
    bucket: str
    prefix: str

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.prefix}".rstrip("/")

    @property
    def driver(self) -> str:
        return SCHEMES[self.scheme]

    def child(self, rel: str) -> StoreURL:
        rel = rel.strip("/")
        if rel in ("", "."):
            return self
        return StoreURL(self.scheme, self.bucket, f"{self.prefix}/{rel}" if self.prefix else rel)

    def contains(self, other: StoreURL) -> bool:
        """``other`` is this prefix or inside it."""
        if (self.scheme, self.bucket) != (other.scheme, other.bucket):
            return False
        return not self.prefix or other.prefix == self.prefix or other.prefix.startswith(self.prefix + "/")


def parse_url(value: str | os.PathLike | None) -> StoreURL | None:
    """The object-store URL ``value`` names, or None for a local path. ``s3:/b/p`` (what ``Path``
    makes of ``s3://b/p``) is read as the URL it was."""
    if value is None:
        return None
    text = os.fspath(value)
    m = re.match(r"^([a-z0-9]+):/{1,2}(.*)$", text)
    if not m or m.group(1) not in SCHEMES:
        return None
    scheme, rest = m.groups()
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise UsageError(f"{scheme}://{rest}: no bucket in the URL", f"write {scheme}://BUCKET/PATH")
    parts = [p for p in prefix.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise UsageError(f"{scheme}://{rest}: '.' and '..' are not allowed in an object-store path",
                         f"write {scheme}://BUCKET/PATH")
    return StoreURL(scheme, bucket, "/".join(parts))


def is_url(value: str | os.PathLike | None) -> bool:
    return parse_url(value) is not None


# ----------------------------------------------------------------------------------------------
# tensorstore specs and context


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
        if value < 0:
            raise ValueError
    except ValueError:
        raise UsageError(f"{name}={raw!r} is not a non-negative integer", f"unset it or set e.g. {name}={default}") from None
    return value


def endpoint(url: StoreURL) -> str | None:
    """The endpoint requests go to when not the provider's own (from the environment)."""
    if url.scheme == "s3":
        return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if not host:
        return None
    return host if "://" in host else f"http://{host}"


_GCS_URL_SET: list[str] = []  # the TENSORSTORE_GCS_HTTP_URL this process set


def _prepare_gcs_environment() -> None:
    """tensorstore's gcs driver reads its base URL from ``TENSORSTORE_GCS_HTTP_URL`` (whenever a
    store is opened), not from ``STORAGE_EMULATOR_HOST``: map one to the other. An emulator needs no
    credentials (Google's client libraries then use none); tensorstore takes a fixed token instead of
    looking for some."""
    emulator = endpoint(StoreURL("gs", "x", ""))
    if emulator:
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = emulator.rstrip("/")
        _GCS_URL_SET[:] = [os.environ["TENSORSTORE_GCS_HTTP_URL"]]
        if not os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
            os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    elif _GCS_URL_SET and os.environ.get("TENSORSTORE_GCS_HTTP_URL") == _GCS_URL_SET[0]:
        del os.environ["TENSORSTORE_GCS_HTTP_URL"]  # the emulator this process used is gone
        _GCS_URL_SET.clear()


def _aws_credentials_type() -> str:
    """Where AWS credentials come from, in the order boto3 looks: the environment when it holds a key;
    else a profile when ``AWS_PROFILE`` or a shared credentials/config file says one; else the
    default chain (which also asks the instance metadata service). Naming the source spares the
    default chain's complaints, on stderr, about files that are not there."""
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        return "environment"
    files = [os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials",
             os.environ.get("AWS_CONFIG_FILE") or "~/.aws/config"]
    if os.environ.get("AWS_PROFILE") or any(os.path.isfile(os.path.expanduser(f)) for f in files):
        return "profile"
    return "default"


def kvstore_spec(url: StoreURL) -> dict[str, Any]:
    """The tensorstore key-value store spec of ``url`` (a directory: its path ends with '/')."""
    spec: dict[str, Any] = {"driver": url.driver, "bucket": url.bucket, "path": f"{url.prefix}/" if url.prefix else ""}
    if url.scheme == "s3":
        ep = endpoint(url)
        if ep:
            spec["endpoint"] = ep
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            spec["aws_region"] = region
        elif ep:
            spec["aws_region"] = "us-east-1"  # an S3-compatible store: the region boto3 signs for by default
        spec["aws_credentials"] = {"type": _aws_credentials_type()}
    else:
        _prepare_gcs_environment()
    return spec


def context_spec() -> dict[str, Any]:
    """Requests in flight and retries for both drivers (from the environment), no cache."""
    limit = max(1, _env_int("DEEPFUSE_OBJSTORE_CONCURRENCY", DEFAULT_CONCURRENCY))
    retries = {"max_retries": max(1, _env_int("DEEPFUSE_OBJSTORE_RETRIES", DEFAULT_RETRIES)),
               "initial_delay": "100ms", "max_delay": "2s"}
    return {"s3_request_concurrency": {"limit": limit}, "gcs_request_concurrency": {"limit": limit},
            "s3_request_retries": retries, "gcs_request_retries": retries,
            "data_copy_concurrency": {"limit": max(1, os.cpu_count() or 1)},
            "cache_pool": {"total_bytes_limit": 0}}


def _fix(url: StoreURL) -> str:
    if url.scheme == "s3":
        where = endpoint(url) or "AWS S3"
        return (f"check the bucket name, the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE), "
                f"the region and the endpoint ({where}; AWS_ENDPOINT_URL_S3 for an S3-compatible store)")
    where = endpoint(url) or "Google Cloud Storage"
    return (f"check the bucket name, the credentials (GOOGLE_APPLICATION_CREDENTIALS or gcloud application-default "
            f"login) and the endpoint ({where}; STORAGE_EMULATOR_HOST for an emulator)")


def _reason(exc: BaseException, what: str = "") -> str:
    text = " ".join(str(exc).split())
    text = re.sub(r"\s*\[(http_response_body|x-amz[^=]*|x-guploader[^=]*)=.*?\](?= \[|$)", "", text)
    low = text.lower()
    if "nosuchbucket" in low or "bucket does not exist" in low:
        return "no such bucket"
    if "http_response_code='404'" in low and what in ("list the objects", "write the object"):
        return "no such bucket"  # GCS: a listing or an upload is 404 only without the bucket
    if any(s in low for s in ("accessdenied", "permission_denied", "invalidaccesskeyid", "signaturedoesnotmatch",
                              "unauthenticated", "http_response_code='403'", "http_response_code='401'")):
        return "permission denied: " + text[:160]
    if "could not connect" in low or "curl error" in low or "couldn't resolve" in low or "timeout" in low:
        return "cannot reach the server: " + text[:200]
    return text[:240] + ("..." if len(text) > 240 else "")


def store_error(url: StoreURL, what: str, exc: BaseException) -> UsageError:
    return UsageError(f"{url}: cannot {what} ({_reason(exc, what)})", _fix(url))


class Store:
    """One prefix of a bucket, opened once: list, read, write and delete its objects (keys relative)."""

    def __init__(self, url: StoreURL, context=None):
        import tensorstore as ts

        self.url = url
        self.ts = ts
        self.context = context or ts.Context(context_spec())
        try:
            self.kv = ts.KvStore.open(kvstore_spec(url), context=self.context).result()
        except Exception as exc:  # noqa: BLE001 - tensorstore raises ValueError and friends
            raise store_error(url, "open the object store", exc) from None

    def list_keys(self) -> list[str]:
        """Every key under the prefix, sorted."""
        try:
            found = self.kv.list().result()
        except Exception as exc:  # noqa: BLE001
            raise store_error(self.url, "list the objects", exc) from None
        return sorted(k.decode("utf-8", "surrogateescape") if isinstance(k, bytes) else str(k) for k in found)

    def read(self, key: str) -> bytes | None:
        try:
            r = self.kv.read(key).result()
        except Exception as exc:  # noqa: BLE001
            raise store_error(self.url.child(key), "read the object", exc) from None
        return bytes(r.value) if r.state == "value" else None

    def download(self, keys: Iterable[str], dest: Path) -> None:
        """Copy ``keys`` into ``dest`` (same relative paths), many reads in flight."""
        limit = max(1, _env_int("DEEPFUSE_OBJSTORE_CONCURRENCY", DEFAULT_CONCURRENCY))
        pending: deque = deque()
        try:
            for key in keys:
                target = _local_target(dest, key, self.url)
                if len(pending) >= limit:
                    self._land(pending.popleft())
                pending.append((key, target, self.kv.read(key)))
            while pending:
                self._land(pending.popleft())
        finally:
            for _key, _target, future in pending:  # after a failure: nothing keeps reading
                with contextlib.suppress(Exception):  # the first error is being raised
                    future.result()

    def _land(self, job) -> None:
        key, target, future = job
        try:
            r = future.result()
        except Exception as exc:  # noqa: BLE001
            raise store_error(self.url.child(key), "read the object", exc) from None
        if r.state != "value":
            raise InputError(f"{self.url.child(key)}: the object disappeared while it was being read",
                             "another job is changing this checkpoint; read it once that job is done")
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as fh:
            fh.write(r.value)

    def upload(self, files: list[tuple[str, Path | bytes]]) -> list[str]:
        """Write each ``(key, local file or bytes)``, many writes in flight (at most
        ``IN_FLIGHT_BYTES`` of data held, unless one object is larger); all done when it returns.
        Returns the keys written."""
        limit = max(1, _env_int("DEEPFUSE_OBJSTORE_CONCURRENCY", DEFAULT_CONCURRENCY))
        pending: deque = deque()
        held = 0
        done: list[str] = []
        try:
            for key, what in files:
                data = what if isinstance(what, bytes) else Path(what).read_bytes()
                while pending and (len(pending) >= limit or held + len(data) > IN_FLIGHT_BYTES):
                    k, n, fut = pending.popleft()
                    self._wait_write(k, fut)
                    held -= n
                    done.append(k)
                pending.append((key, len(data), self.kv.write(key, data)))
                held += len(data)
            while pending:
                k, n, fut = pending.popleft()
                self._wait_write(k, fut)
                done.append(k)
        finally:
            for _k, _n, fut in pending:  # after a failure: nothing keeps writing behind our back
                with contextlib.suppress(Exception):  # the first error is being raised
                    fut.result()
        return done

    def _wait_write(self, key: str, future) -> None:
        try:
            future.result()
        except Exception as exc:  # noqa: BLE001
            raise store_error(self.url.child(key), "write the object", exc) from None

    def delete(self, keys: Iterable[str]) -> None:
        """Delete ``keys``, many requests in flight."""
        limit = max(1, _env_int("DEEPFUSE_OBJSTORE_CONCURRENCY", DEFAULT_CONCURRENCY))
        pending: deque = deque()
        for key in keys:
            if len(pending) >= limit:
                self._wait_delete(*pending.popleft())
            pending.append((key, self.kv.write(key, None)))
        while pending:
            self._wait_delete(*pending.popleft())

    def _wait_delete(self, key: str, future) -> None:
        try:
            future.result()
        except Exception as exc:  # noqa: BLE001
            raise store_error(self.url.child(key), "delete the object", exc) from None


def _local_target(dest: Path, key: str, url: StoreURL) -> Path:
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") or "\x00" in p for p in parts):
        raise InputError(f"{url}: object name {key!r} cannot be a file name",
                         "a checkpoint's object names are relative file paths; re-save the checkpoint")
    return dest.joinpath(*parts)


# ----------------------------------------------------------------------------------------------
# sources


_TEMP_DIRS: list[Path] = []


def _remove_temp_dirs() -> None:
    for d in _TEMP_DIRS:
        shutil.rmtree(d, ignore_errors=True)


def temp_dir(prefix: str) -> Path:
    """A private local directory, removed when the process ends."""
    if not _TEMP_DIRS:
        atexit.register(_remove_temp_dirs)
    d = Path(tempfile.mkdtemp(prefix=prefix))
    _TEMP_DIRS.append(d)
    return d


def _parent(key: str) -> str:
    parent = PurePosixPath(key).parent.as_posix()
    return "" if parent == "." else parent


def _orbax_committed(keys: set[str], directory: str) -> bool:
    return (f"{directory}/{COMMIT_MARKER}" if directory else COMMIT_MARKER) in keys


def select_checkpoint(url: StoreURL, keys: list[str], step: int | None) -> list[str]:
    """The keys to copy to read the checkpoint at ``url``: its step (the latest committed one unless
    ``step``) and the files at its top level. Refuses what is not a committed T5X/Orbax checkpoint."""
    if not keys:
        raise InputError(f"{url}: no objects under this prefix", "check the URL: it must name a T5X or Orbax "
                         "checkpoint directory (a checkpoint_<step>, Orbax item, step or CheckpointManager root)")
    keyset = set(keys)
    top = [k for k in keys if "/" not in k]
    incomplete = ("the checkpoint is incomplete (still being written, or its save was interrupted): "
                  "wait for the save to finish, or save it again")
    # legacy T5X: a step directory, or a root of checkpoint_<step>/ directories
    if T5X_MARKER in keyset and ORBAX_METADATA not in keyset:
        return keys
    t5x_steps = {int(m.group(1)): k.split("/")[0] for k in keys
                 if k.count("/") == 1 and k.endswith("/" + T5X_MARKER) and (m := _T5X_STEP.match(k.split("/")[0]))}
    if t5x_steps:
        chosen = _choose_step(url, t5x_steps, step, "T5X")
        return top + [k for k in keys if k.startswith(t5x_steps[chosen] + "/")]
    # Orbax: an item directory, a step directory holding items, or a CheckpointManager root
    if ORBAX_METADATA in keyset:
        if not _orbax_committed(keyset, ""):
            raise InputError(f"{url}: Orbax checkpoint without {COMMIT_MARKER}", incomplete)
        return keys
    items = {k.split("/")[0] for k in keys if k.count("/") == 1 and k.endswith("/" + ORBAX_METADATA)}
    if items:
        if not _orbax_committed(keyset, ""):
            raise InputError(f"{url}: Orbax checkpoint without {COMMIT_MARKER}", incomplete)
        return keys
    steps: dict[int, str] = {}
    uncommitted: list[str] = []
    for k in keys:
        parts = k.split("/")
        if len(parts) == 3 and parts[2] == ORBAX_METADATA and (m := _STEP_NAME.match(parts[0])):
            if _orbax_committed(keyset, parts[0]):
                steps[int(m.group(1))] = parts[0]
            else:
                uncommitted.append(parts[0])
    if steps or uncommitted:
        if not steps:
            raise InputError(f"{url}: no committed Orbax step (no {COMMIT_MARKER} in "
                             f"{', '.join(sorted(set(uncommitted)))})", incomplete)
        chosen = _choose_step(url, steps, step, "Orbax")
        return top + [k for k in keys if k.startswith(steps[chosen] + "/")]
    raise InputError(f"{url}: not a T5X or Orbax checkpoint (no 'checkpoint' or {ORBAX_METADATA} object)",
                     "only T5X and Orbax checkpoints are read from object storage; copy other checkpoints to a "
                     "local directory first")


def _choose_step(url: StoreURL, steps: dict[int, str], step: int | None, what: str) -> int:
    if step is None:
        return max(steps)
    if step not in steps:
        found = ", ".join(str(s) for s in sorted(steps))
        raise InputError(f"{url}: no committed step {step} in this {what} checkpoint (steps found: {found})",
                         "choose one of the steps found with --step")
    return step


def fetch_checkpoint(url: StoreURL, step: int | None = None) -> Path:
    """Copy the checkpoint at ``url`` (its chosen step) into a temporary local directory; return it."""
    store = Store(url)
    keys = select_checkpoint(url, store.list_keys(), step)
    dest = temp_dir("deepfuse-source-") / "checkpoint"
    dest.mkdir()
    store.download(keys, dest)
    return dest


# ----------------------------------------------------------------------------------------------
# outputs


def commit_order(files: list[str]) -> tuple[list[str], list[str], dict[str, str], str]:
    """Split an output's files (relative keys) into (body, files uploaded last, marker objects to
    add after them (key -> the directory it commits), marker name) for its format: Orbax gets
    ``commit_success.txt`` in every item directory, then in the step directory (as orbax's
    CheckpointManager leaves them); a T5X step's msgpack ``checkpoint`` goes last."""
    items = sorted({_parent(f) for f in files if PurePosixPath(f).name == ORBAX_METADATA})
    if items:
        dirs = [*items]
        for item in items:  # an item below the top is in a step directory, which commits last
            if item and _parent(item) not in dirs:
                dirs.append(_parent(item))
        markers = {(f"{d}/{COMMIT_MARKER}" if d else COMMIT_MARKER): d for d in dirs}
        return [f for f in files if f not in markers], [], markers, COMMIT_MARKER
    last = sorted(f for f in files if PurePosixPath(f).name == T5X_MARKER)
    return [f for f in files if f not in last], last, {}, T5X_MARKER


def marker_keys(keys: Iterable[str]) -> list[str]:
    """Keys that commit a checkpoint (deleted first when an output is replaced)."""
    return [k for k in keys if PurePosixPath(k).name in (COMMIT_MARKER, T5X_MARKER)]


def upload_checkpoint(local: Path, url: StoreURL, files: list[str], replace: list[str],
                      sent: dict[str, str] | None = None, digests: dict[str, str] | None = None,
                      store: Store | None = None) -> None:
    """Upload the finished local output ``local`` (its ``files``, relative) to ``url``; first remove
    the objects of the output it replaces (``replace``: its commit markers first, so that it no
    longer restores). ``sent``: objects an :class:`EarlyUploader` already wrote (key -> sha256 of
    their bytes); those whose bytes are the file's (``digests``: key -> sha256) are not sent again,
    the others are, and early objects that are not files of the output are removed before the commit.
    On failure the objects written are removed again: nothing restores."""
    body, last, markers, _name = commit_order(files)
    sent, digests = sent or {}, digests or {}
    body = [k for k in body if not (k in sent and digests.get(k) == sent[k])]
    store = store or Store(url)
    if replace:
        olds = marker_keys(replace)
        store.delete(olds)
        store.delete([k for k in replace if k not in set(olds)])
    try:
        store.upload([(k, local / k) for k in body])
        store.delete([k for k in sent if k not in set(files)])  # early copies of files that are gone
        store.upload([(k, local / k) for k in last])
        for key, directory in markers.items():  # item directories first, the step directory last
            store.upload([(key, f"Checkpoint commit was successful to {url.child(directory)}".encode())])
    except BaseException:
        # the prefix held nothing else (or its old objects were removed above): remove what is there
        with contextlib.suppress(Exception):  # best effort: without its marker nothing restores anyway
            discard(store, store.list_keys())
        raise


def discard(store: Store, keys: Iterable[str]) -> None:
    """Delete ``keys``, commit markers first, best effort (after a failure, errors are not news)."""
    keys = list(dict.fromkeys(keys))
    markers = marker_keys(keys)
    with contextlib.suppress(Exception):  # without its marker nothing restores anyway
        store.delete(markers)
        store.delete([k for k in keys if k not in set(markers)])


class EarlyUploader:
    """Uploads an output's finished data files while the rest is still being written: OCDBT data files
    (``d/<name>``, renamed into place when complete) and the chunk files of zarr array directories,
    each once its size and time have not changed between two looks. Whatever it sends is checked
    against the finished output (``upload_checkpoint``): a file that changed afterwards is sent again,
    an object that is no file of the output is removed, so the bytes are the same either way."""

    def __init__(self, store: Store, directory: Path, interval: float = 0.25):
        self.store = store
        self.directory = Path(directory)
        self.interval = interval
        self.sent: dict[str, str] = {}
        self.error: BaseException | None = None
        self._seen: dict[str, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="deepfuse-upload-early", daemon=True)
        self._thread.start()

    def _ready(self) -> list[Path]:
        found = []
        try:
            paths = list(self.directory.rglob("*"))
        except OSError:
            return found
        for p in paths:
            rel = p.relative_to(self.directory)
            if any(part.startswith(".") for part in rel.parts) or rel.as_posix() in self.sent:
                continue
            try:
                if not p.is_file() or not (p.parent.name == "d" or (p.parent / ".zarray").is_file()
                                           or (p.parent / "zarr.json").is_file()):
                    continue
                st = p.stat()
            except OSError:
                continue
            key, stamp = rel.as_posix(), (st.st_size, st.st_mtime_ns)
            if self._seen.get(key) == stamp:
                found.append(p)
            self._seen[key] = stamp
        return found

    def _items(self, paths: list[Path]):
        for p in paths:
            try:
                data = p.read_bytes()
            except OSError:
                continue
            key = p.relative_to(self.directory).as_posix()
            self.sent[key] = hashlib.sha256(data).hexdigest()
            yield key, data

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                ready = self._ready()
                if ready:
                    self.store.upload(self._items(ready))
            except BaseException as exc:  # noqa: BLE001 - reported by stop()
                self.error = exc
                return

    def stop(self) -> dict[str, str]:
        """Stop (after the upload under way); return what was sent: key -> sha256 of its bytes."""
        self._stop.set()
        self._thread.join()
        if self.error is not None:
            raise self.error
        return dict(self.sent)
