"""Hugging Face Hub ids as sources (``org/name``, ``org/name@revision``), without network.

A cache laid out as huggingface_hub documents it (``tests/hub_cache.py``) is resolved through
huggingface_hub itself with ``HF_HUB_OFFLINE=1``; the online path (which files are asked for) runs
against a stand-in for the Hub's listing and download calls.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from deepfuse_cli import hub
from tests.conftest import HF
from tests.hub_cache import A, B, add_repo, hub_cache, invoke  # noqa: F401  (fixture)


@pytest.fixture
def repos(hub_cache):  # noqa: F811
    add_repo(hub_cache, "org/llama", HF / "llama-a", A, refs=("main", "v1"))
    add_repo(hub_cache, "org/llama-sharded", HF / "llama-b-sharded", B)
    return hub_cache


def files_except_provenance(out: Path) -> dict[str, bytes]:
    """Every output file but the manifest and the card (which name the sources), by relative name."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in ("deepfuse.json", "README.md")}


def sources_of(out: Path) -> list[dict]:
    return json.loads((out / "deepfuse.json").read_text())["sources"]


# ---- telling a Hub id from a path ------------------------------------------------------------------
@pytest.mark.parametrize("spec, parsed", [
    ("Qwen/Qwen2.5-0.5B", ("Qwen/Qwen2.5-0.5B", None)),
    ("org/name@v1.0", ("org/name", "v1.0")),
    ("org/name@refs/pr/3", ("org/name", "refs/pr/3")),
    ("org/name@" + A, ("org/name", A)),
    ("name", None), ("./org/name", None), ("/abs/org/name", None), ("a/b/c", None), ("org/na me", None),
    ("org/name@", None), ("org/name/", None), ("org/--name", None), ("../name", None), ("~/models", None),
])
def test_hub_ids_read_as_huggingface_hub_validates_them(spec, parsed):
    assert hub.split_spec(spec) == parsed


# ---- offline, through the cache ---------------------------------------------------------------------
def test_self_fuse_a_hub_id_writes_what_the_local_directory_writes(repos, tmp_path):
    invoke("self-fuse", "org/llama", "--times", "2", "-o", tmp_path / "hub", "-q")
    invoke("self-fuse", HF / "llama-a", "--times", "2", "-o", tmp_path / "local", "-q")
    assert files_except_provenance(tmp_path / "hub") == files_except_provenance(tmp_path / "local")
    src, copy = sources_of(tmp_path / "hub")  # one record per copy
    assert src == copy and src["hub"] == {"repo_id": "org/llama", "revision": None, "commit": A}
    assert Path(src["path"]) == repos / "models--org--llama" / "snapshots" / A
    assert src["files"] == sources_of(tmp_path / "local")[0]["files"]  # the same bytes, the same digests
    assert "hub" not in sources_of(tmp_path / "local")[0]  # a local source's record is as before


def test_fuse_hub_ids_at_revisions_and_a_sharded_index(repos, tmp_path):
    invoke("fuse", "org/llama@v1", f"org/llama-sharded@{B}", "-o", tmp_path / "hub", "--norm", "prop", "-q")
    invoke("fuse", HF / "llama-a", HF / "llama-b-sharded", "-o", tmp_path / "local", "--norm", "prop", "-q")
    assert files_except_provenance(tmp_path / "hub") == files_except_provenance(tmp_path / "local")
    a, b = sources_of(tmp_path / "hub")
    assert a["hub"] == {"repo_id": "org/llama", "revision": "v1", "commit": A}
    assert b["hub"] == {"repo_id": "org/llama-sharded", "revision": B, "commit": B}
    assert sorted(b["files"]) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                  "model.safetensors.index.json"]


def test_plan_inspect_convert_and_rules_check_take_hub_ids(repos, tmp_path):
    invoke("convert", HF.parent / "t5x" / "legacy-a", "--to", "safetensors", "-o", tmp_path / "t5-hf", "-q")
    add_repo(repos, "org/t5", tmp_path / "t5-hf", A)
    _, text = invoke("plan", "org/llama", "org/llama-sharded", "--json")
    assert json.loads(text[text.index("{"):])["n"] == 2
    result, _ = invoke("inspect", "org/llama", "--json")
    info = json.loads(result.stdout)
    assert info["family"] == "llama" and info["path"].endswith(A)
    assert info["hub"] == {"repo_id": "org/llama", "revision": None, "commit": A}
    invoke("rules", "check", "llama", "org/llama")
    invoke("convert", "org/t5", "--to", "t5x", "-o", tmp_path / "t5x", "-q")
    invoke("convert", tmp_path / "t5-hf", "--to", "t5x", "-o", tmp_path / "t5x-local", "-q")
    assert files_except_provenance(tmp_path / "t5x") == files_except_provenance(tmp_path / "t5x-local")


def test_verify_resolves_hub_sources_again_and_checks_their_digests(repos, tmp_path):
    out = tmp_path / "out"
    invoke("fuse", "org/llama", "org/llama-sharded", "-o", out, "-q")
    invoke("verify", out, "--no-function")  # from the manifest: the recorded commits, from the cache
    invoke("verify", out, "--sources", "org/llama", "--sources", "org/llama-sharded", "--no-function")
    blob = (repos / "models--org--llama" / "snapshots" / A / "model.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    _, text = invoke("verify", out, "--no-function", expect=2)
    assert "model.safetensors changed since the fusion" in text


def test_only_what_was_asked_for_is_carried(repos, tmp_path):
    """Files the cache holds beyond the checkpoint (a source's own card, notebooks, ONNX) are not copied."""
    snapshot = repos / "models--org--llama" / "snapshots" / A
    for name in ("README.md", "notes.ipynb", "LICENSE"):
        (snapshot / name).write_text("not part of the checkpoint\n")
    out = tmp_path / "out"
    invoke("self-fuse", "org/llama", "--times", "2", "-o", out, "-q")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "deepfuse.json",
                                                     "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    assert "not part of the checkpoint" not in (out / "README.md").read_text()


def test_a_local_directory_of_the_same_name_wins_with_a_note(repos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(HF / "llama-b", tmp_path / "org" / "llama")
    _, text = invoke("self-fuse", "org/llama", "--times", "2", "-o", "out")
    assert "note: org/llama: using the local directory, not the Hugging Face Hub model of that name" in text
    src = sources_of(tmp_path / "out")[0]
    assert "hub" not in src and Path(src["path"]) == (tmp_path / "org" / "llama").resolve()
    _, quiet = invoke("self-fuse", "org/llama", "--times", "2", "-o", "out2", "-q")
    assert "note:" not in quiet


@pytest.mark.parametrize("spec, says", [
    ("org/missing", "org/missing: no local path of that name, and it is not in the Hugging Face cache"),
    ("org/llama@v9", "org/llama@v9: revision 'v9' of org/llama is not in the Hugging Face cache"),
])
def test_missing_offline_is_one_line_naming_the_repo(repos, tmp_path, spec, says):
    _, text = invoke("self-fuse", spec, "--times", "2", "-o", tmp_path / "out", expect=2)
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and says in errors[0] and "HF_HUB_OFFLINE is set" in errors[0]
    assert "hf download" in text and "Traceback" not in text
    assert not (tmp_path / "out").exists()


def test_a_cached_snapshot_missing_a_shard_is_refused(hub_cache, tmp_path):  # noqa: F811
    add_repo(hub_cache, "org/partial", HF / "llama-b-sharded", B, skip=("model-00002-of-00002.safetensors",))
    _, text = invoke("inspect", "org/partial", expect=2)
    assert "org/partial: the cached snapshot of org/partial lacks 1 shard(s)" in text


def test_paths_that_do_not_read_as_hub_ids_keep_their_error(hub_cache, tmp_path):  # noqa: F811
    _, text = invoke("inspect", tmp_path / "no" / "such" / "dir", expect=2)
    assert "no such file or directory" in text and "Hugging Face" not in text


# ---- online: which files are asked for (the Hub's calls stood in for) --------------------------------
class FakeHub:
    """``HfApi.model_info`` and ``snapshot_download`` over a repository made of a fixture directory
    plus ``extra`` files; records the patterns each download asked for."""

    def __init__(self, cache: Path, source: Path, extra: dict[str, bytes], error: Exception | None = None):
        self.cache, self.source, self.extra, self.error = cache, source, extra, error
        self.files = {p.name: p.read_bytes() for p in source.iterdir() if p.is_file()} | extra
        self.asked: list[list[str]] = []
        import huggingface_hub

        self.real = huggingface_hub.snapshot_download

    def model_info(self, repo_id, revision=None, **kwargs):
        if self.error is not None:
            raise self.error
        return SimpleNamespace(sha=A, siblings=[SimpleNamespace(rfilename=f) for f in sorted(self.files)])

    def snapshot_download(self, repo_id, *, revision=None, cache_dir=None, local_files_only=False,
                          allow_patterns=None, **kwargs):
        if local_files_only:  # the cache answers: huggingface_hub's own
            return self.real(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True,
                             allow_patterns=allow_patterns, **kwargs)
        assert revision == A
        self.asked.append(list(allow_patterns))
        folder = Path(cache_dir) / ("models--" + repo_id.replace("/", "--")) / "snapshots" / A
        for name, data in self.files.items():
            if any(fnmatch.fnmatchcase(name, p) for p in allow_patterns):
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(data)
        return str(folder)


@pytest.fixture
def online(hub_cache, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def install(source: Path, extra: dict[str, bytes] | None = None, error: Exception | None = None) -> FakeHub:
        import huggingface_hub

        fake = FakeHub(hub_cache, source, extra or {}, error)
        monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, *a, **k: fake.model_info(*a, **k))
        monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
        return fake

    return install


def test_online_fetches_only_the_files_the_checkpoint_needs(online):
    extra = {"README.md": b"card", "pytorch_model.bin": b"x", "flax_model.msgpack": b"x", "onnx/model.onnx": b"x",
             "tokenizer.model": b"spm", "special_tokens_map.json": b"{}", "notes.ipynb": b"{}"}
    fake = online(HF / "llama-a", extra)
    src = hub.resolve("org/llama")
    assert src.commit == A and src.revision is None
    [asked] = fake.asked
    assert sorted(asked) == ["config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
                             "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]


def test_online_sharded_fetches_the_shards_the_index_names(online):
    fake = online(HF / "llama-b-sharded", {"pytorch_model.bin.index.json": b"{}",
                                           "pytorch_model-00001-of-00001.bin": b"x"})
    src = hub.resolve("org/llama-sharded@main")
    assert fake.asked[0] == ["config.json", "generation_config.json", "model.safetensors.index.json"]
    assert sorted(fake.asked[1]) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert src.revision == "main" and "pytorch_model.bin.index.json" not in src.files


def test_online_pickles_when_there_are_no_safetensors(online):
    fake = online(HF / "llama-a-bin")
    hub.resolve("org/llama-bin")
    assert "pytorch_model.bin" in fake.asked[0]


def _http(cls, status: int):
    return cls(f"{status} Client Error", response=SimpleNamespace(headers={}, status_code=status, request=None))


@pytest.mark.parametrize("error, says", [
    ("RepositoryNotFoundError", "org/llama: no such local file or directory; as a Hugging Face Hub id, org/llama "
                                "is not a model on the Hub (or it is private)"),
    ("GatedRepoError", "org/llama: org/llama is a gated model and this account has no access to it"),
    ("RevisionNotFoundError", "org/llama: org/llama has no revision 'main'"),
])
def test_hub_refusals_are_one_line_exit_2(online, tmp_path, error, says):
    from huggingface_hub import errors

    online(HF / "llama-a", error=_http(getattr(errors, error), 404 if error != "GatedRepoError" else 403))
    _, text = invoke("self-fuse", "org/llama", "--times", "2", "-o", tmp_path / "out", expect=2)
    errors_ = [line for line in text.splitlines() if line.startswith("error:")]
    assert errors_ == [f"error: {says}"], text


def test_no_network_falls_back_to_the_cache(online, repos, tmp_path):
    online(HF / "llama-a", error=ConnectionError("connection refused"))
    invoke("self-fuse", "org/llama", "--times", "2", "-o", tmp_path / "out", "-q")
    assert sources_of(tmp_path / "out")[0]["hub"]["commit"] == A
    _, text = invoke("inspect", "org/other", expect=2)
    assert "org/other: no local path of that name, and it is not in the Hugging Face cache" in text
    assert "and the Hugging Face Hub cannot be reached" in text


def test_offline_mode_is_read_when_asked(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub.offline()
    monkeypatch.setenv("HF_HUB_CACHE", os.fspath(Path("/somewhere")))
    assert hub.cache_dir() == Path("/somewhere")


def test_a_refusing_hub_still_lets_the_cache_serve(online, repos, tmp_path):
    """A repository gone private or deleted since it was fetched: its cached snapshot still serves
    (as huggingface_hub's own downloads do); a revision the Hub says does not exist does not."""
    from huggingface_hub import errors

    online(HF / "llama-a", error=_http(errors.RepositoryNotFoundError, 404))
    invoke("inspect", "org/llama")
    online(HF / "llama-a", error=_http(errors.RevisionNotFoundError, 404))
    _, text = invoke("inspect", "org/llama", expect=2)
    assert "org/llama: org/llama has no revision 'main'" in text
