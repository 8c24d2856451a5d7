"""Hugging Face Hub ids as sources: ``org/name`` or ``org/name@revision`` resolved to a local snapshot.

Resolution goes through ``huggingface_hub`` itself: its cache (``HF_HUB_CACHE`` / ``HF_HOME``), its
offline mode (``HF_HUB_OFFLINE``), its token (``HF_TOKEN`` or the stored login). Only the files a
checkpoint needs come down: the weights (the shards an index names; safetensors preferred over
pickles when a repository has both, as transformers prefers them), the index, ``config.json`` and the
tokenizer and generation files. An existing local path always wins over a Hub id (the CLI says so).

Every failure (offline and not cached, no such repository or revision, a gated or private model, no
network) is one :class:`~deepfuse_cli.errors.InputError` naming the repository.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .formats.hf_layout import (BIN_INDEX, BIN_SINGLE, CONFIG, SAFE_INDEX, SAFE_SINGLE, WEIGHT_LAYOUTS, WEIGHT_SUFFIXES,
                                is_shard_name)
from .untrusted import read_json

#: top-level files carried with the weights: config, tokenizer and generation files
SIDE_FILES = (CONFIG, "generation_config.json", "*tokenizer*", "special_tokens_map.json", "added_tokens.json",
              "vocab.*", "merges.txt", "*.model", "*.tiktoken", "chat_template.*")

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class HubSource:
    """A Hub id resolved to its snapshot directory in the local cache."""

    repo_id: str
    revision: str | None  # as asked (None: the default branch)
    commit: str  # the commit hash the snapshot is
    path: Path  # the snapshot directory
    files: tuple[str, ...]  # the repository files used (weights, index, side files), relative

    @property
    def spec(self) -> str:
        return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"


def split_spec(spec: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` if ``spec`` reads as a Hub model id (``org/name`` or ``org/name@rev``,
    the id valid for huggingface_hub), else None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id, at, revision = spec.partition("@")
    if not _REPO_ID.fullmatch(repo_id) or (at and not revision.strip()):
        return None
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return repo_id, (revision if at else None)


def is_hub_id(spec: str) -> bool:
    return split_spec(spec) is not None


def is_hub_source(spec: str | Path) -> bool:
    """Whether the source ``spec`` (as the user gave it) is read from the Hub: text that reads as a
    Hub id and names no local file or directory (a local path of that name wins)."""
    return isinstance(spec, str) and not os.path.lexists(spec) and is_hub_id(spec)


def shadows_hub_id(spec: str | Path) -> bool:
    """Whether ``spec`` is a local path that also reads as a Hub id (the local path is used)."""
    return isinstance(spec, str) and os.path.lexists(spec) and is_hub_id(spec)


def _true(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def offline() -> bool:
    """huggingface_hub's offline mode, read when asked (the variable may be set after import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    return _true(value) if value is not None else bool(constants.HF_HUB_OFFLINE)


def cache_dir() -> Path:
    """huggingface_hub's cache directory, as its variables say when asked."""
    from huggingface_hub import constants

    env = os.environ
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return Path(env[key]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


@contextmanager
def progress_bars(show: bool):
    """huggingface_hub's download bars (on stderr) on or off while the block runs."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not show and not was_disabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not show and not was_disabled:
            enable_progress_bars()


def _pattern(name: str) -> str:
    """An ``allow_patterns`` entry matching exactly ``name``."""
    return re.sub(r"([*?[])", r"[\1]", name)


def _side_files(files: list[str]) -> list[str]:
    return [f for f in files if "/" not in f and not f.endswith(WEIGHT_SUFFIXES)
            and any(fnmatch.fnmatchcase(f, p) for p in SIDE_FILES)]


def _weight_layout(files: list[str], where: str) -> str:
    present = set(files)
    for name in WEIGHT_LAYOUTS:
        if name in present:
            return name
    raise InputError(f"{where}: no model weights in the repository (no {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} "
                     f"or {BIN_INDEX})", "name a repository that holds a transformers checkpoint")


def _shards(index: Path, where: str) -> list[str]:
    weight_map = read_json(index, hint="re-download it").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(map(is_shard_name, weight_map.values())):
        raise InputError(f"{where}: {index.name} has no valid 'weight_map'", "the repository's index is broken")
    return list(dict.fromkeys(weight_map.values()))


def _fix(spec: str) -> str:
    repo_id, _, revision = spec.partition("@")
    return f"run once with network access, or fetch it first: hf download {repo_id}" + (
        f" --revision {revision}" if revision else "")


#: packages whose errors say the Hub (or the way to it) failed, not this program
_NETWORK_PACKAGES = {"huggingface_hub", "requests", "urllib3", "httpx", "httpx2", "httpcore", "ssl", "socket"}


def _from_network(exc: Exception) -> bool:
    """Whether ``exc`` comes from huggingface_hub or the network layer under it (an OSError, an HTTP
    library's error), as opposed to a bug here."""
    return isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in _NETWORK_PACKAGES


def _hub_error(exc: Exception, spec: str, repo_id: str) -> InputError:
    """One line for what huggingface_hub raised about ``spec``."""
    from huggingface_hub.utils import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError, RevisionNotFoundError)

    local = f"no such local file or directory; as a Hugging Face Hub id, {repo_id}"
    if isinstance(exc, GatedRepoError):
        return InputError(f"{spec}: {repo_id} is a gated model and this account has no access to it",
                          f"accept its terms on https://huggingface.co/{repo_id} and log in "
                          "(hf auth login, or HF_TOKEN)")
    if isinstance(exc, RevisionNotFoundError):
        return InputError(f"{spec}: {repo_id} has no revision {spec.partition('@')[2] or 'main'!r}",
                          "name an existing branch, tag or commit after '@'")
    if isinstance(exc, RepositoryNotFoundError):
        return InputError(f"{spec}: {local} is not a model on the Hub (or it is private)",
                          "check the path or id; for a private model log in (hf auth login, or HF_TOKEN)")
    if isinstance(exc, LocalEntryNotFoundError):
        revision = spec.partition("@")[2]
        where = f"in the Hugging Face cache ({cache_dir()})"
        if revision and (cache_dir() / ("models--" + repo_id.replace("/", "--"))).is_dir():
            what = f"revision {revision!r} of {repo_id} is not {where}"
        else:
            what = f"no local path of that name, and it is not {where}"
        if offline():
            return InputError(f"{spec}: {what} and HF_HUB_OFFLINE is set", _fix(spec))
        return InputError(f"{spec}: {what}, and the Hugging Face Hub cannot be reached",
                          "check the network (or HF_ENDPOINT), or " + _fix(spec))
    if isinstance(exc, HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if status == 401:
            return InputError(f"{spec}: {local} is not a model on the Hub, or it is private (401 unauthorized)",
                              "check the id; for a private model log in (hf auth login, or HF_TOKEN)")
        return InputError(f"{spec}: the Hugging Face Hub refused {repo_id}: {first}", "retry later, or " + _fix(spec))
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT):
        return InputError(f"{spec}: cannot write to the Hugging Face cache ({cache_dir()}): {exc.strerror}",
                          "free space there, or point HF_HUB_CACHE (or HF_HOME) at a writable place")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return InputError(f"{spec}: the Hugging Face Hub cannot be reached ({type(exc).__name__}{': ' if first else ''}"
                      f"{first}) and it is not in the Hugging Face cache ({cache_dir()})",
                      "check the network (or HF_ENDPOINT), or " + _fix(spec))


def _listing(repo_id: str, revision: str | None) -> tuple[str, list[str]] | None:
    """The commit and file list of the repository at ``revision`` from the Hub; None where the Hub
    cannot be asked (offline mode, no network): then the cache answers."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HfHubHTTPError, OfflineModeIsEnabled

    if offline():
        return None
    try:
        info = HfApi().model_info(repo_id, revision=revision)
    except OfflineModeIsEnabled:
        return None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(status, int) and status >= 500:  # the Hub is down: the cache may answer
            return None
        raise
    except Exception as exc:
        if _from_network(exc):  # connection refused, timeout, DNS: the cache may answer
            return None
        raise
    return info.sha, [s.rfilename for s in (info.siblings or [])]


def _cached_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def resolve(spec: str) -> HubSource:
    """Download (or find in the cache) what the checkpoint ``spec`` needs; its snapshot directory."""
    parsed = split_spec(spec)
    if parsed is None:
        raise InputError(f"{spec}: not a Hugging Face Hub id", "write org/name or org/name@revision")
    repo_id, revision = parsed
    try:
        return _resolve(spec, repo_id, revision)
    except Exception as exc:
        if not _from_network(exc):
            raise
        raise _hub_error(exc, spec, repo_id) from None


def _resolve(spec: str, repo_id: str, revision: str | None) -> HubSource:
    from huggingface_hub import snapshot_download

    from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError, RevisionNotFoundError

    cache = cache_dir()
    refused: Exception | None = None
    try:
        listed = _listing(repo_id, revision)
    except RevisionNotFoundError:
        raise
    except HfHubHTTPError as exc:  # no such repository, gated, private: what the cache holds still serves
        listed, refused = None, exc

    def fetch(rev: str | None, names: list[str], cached_only: bool) -> Path:
        return Path(snapshot_download(repo_id, revision=rev, cache_dir=cache, local_files_only=cached_only,
                                      allow_patterns=[_pattern(n) for n in names] or ["<none>"]))

    if listed is None:  # the cache answers: the snapshot of that revision, with what it holds
        try:
            folder = fetch(revision, [], True)
        except LocalEntryNotFoundError:
            if refused is not None:
                raise refused from None
            raise
        commit, files = folder.name, _cached_files(folder)
        layout = _weight_layout(files, f"{spec} (cached at {folder})")
        side = _side_files(files)
        weights = _shards(folder / layout, spec) if layout.endswith(".json") else []
        missing = [w for w in weights if not (folder / w).is_file()]
        if missing:
            raise InputError(f"{spec}: the cached snapshot of {repo_id} lacks {len(missing)} shard(s) its index names "
                             f"(first: {missing[0]})", _fix(repo_id))
    else:
        commit, files = listed
        layout = _weight_layout(files, spec)
        side = _side_files(files)
        folder = fetch(commit, [*side, layout], False)
        weights = _shards(folder / layout, spec) if layout.endswith(".json") else []
        absent = [w for w in weights if w not in set(files)]
        if absent:
            raise InputError(f"{spec}: {layout} names shard {absent[0]!r}, which {repo_id} does not hold",
                             "the repository's index and files disagree")
        if weights:
            folder = fetch(commit, weights, False)
    return HubSource(repo_id=repo_id, revision=revision, commit=commit, path=folder,
                     files=tuple(sorted({*side, layout, *weights})))
