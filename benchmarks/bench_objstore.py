"""Benchmark: T5X and Orbax self-fuse x2 to the local disk vs to a local S3 server (moto), and back.

Makes the synthetic T5 1.1 sources of ``bench_t5x.py`` (a legacy T5X root and an Orbax
CheckpointManager root, ``--size-gb`` of float32 parameters), starts moto's S3 server on loopback in
a process of its own, and times, each in a fresh process:

  1. ``deepfuse self-fuse SRC --times 2 -o DIR`` (local disk),
  2. the same with ``-o s3://bucket/...`` at ``DEEPFUSE_OBJSTORE_CONCURRENCY`` 32 (the default) and 1,
  3. ``deepfuse self-fuse s3://bucket/SRC --times 2 -o DIR``: the source read from the bucket.

An object-store output is written locally, then uploaded with many requests in flight (tensorstore's
``s3_request_concurrency``); an object-store source is downloaded the same way before it is read.
moto is a Python server holding objects in memory: it is slower than a real store per request, so
the figures show the cost of the extra copy and the effect of concurrency, not S3's bandwidth.

    python benchmarks/bench_objstore.py --quick       # a ~40 MB source, about a minute
    python benchmarks/bench_objstore.py               # ~0.5 GB float32 source

Columns: on-disk MB of the output, wall seconds, MB/s of on-disk bytes, ratio to the local row.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_fuse import best_of, common_args, work_dir
from bench_t5x import disk_bytes, make_sources

BUCKET = "deepfuse-bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server in its own process on a free loopback port, with one bucket."""
    port = free_port()
    code = ("import logging, time; logging.getLogger('werkzeug').setLevel(logging.ERROR);"
            "from moto.server import ThreadedMotoServer;"
            f"s = ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False); s.start();"
            "time.sleep(10**6)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    import boto3

    deadline = time.time() + 30
    while True:
        try:
            boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
            return proc, url
        except Exception:  # noqa: BLE001 - not listening yet
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise SystemExit("moto's S3 server did not start")
            time.sleep(0.2)


def clear_bucket(url: str) -> None:
    import boto3

    s3 = boto3.resource("s3", endpoint_url=url, region_name="us-east-1")
    s3.Bucket(BUCKET).objects.all().delete()


def upload_tree(url: str, local: Path, prefix: str) -> None:
    """A source put into the bucket as orbax would leave it (commit marker included)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
    for p in sorted(local.rglob("*")):
        if p.is_file():
            s3.upload_file(str(p), BUCKET, f"{prefix}/{p.relative_to(local).as_posix()}")
    for step in (d for d in local.iterdir() if d.is_dir() and d.name.isdecimal()):
        s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{step.name}/commit_success.txt", Body=b"ok")


def main() -> None:
    ap = common_args(__doc__, 0.5, "a ~40 MB source of narrower layers")
    args = ap.parse_args()
    size = 0.04 if args.quick else args.size_gb
    work = work_dir(args.dir, "deepfuse-bench-objstore-")
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    moto, url = start_moto()
    os.environ["AWS_ENDPOINT_URL_S3"] = url
    try:
        info = make_sources(work, size, args.quick)
        exe = [sys.executable, "-m", "deepfuse_cli"]
        out = work / "out"
        rows = []
        transfers = []
        for fmt in ("t5x", "orbax"):
            src = work / f"src-{fmt}"
            upload_tree(url, src, f"src-{fmt}")
            fuse = [*exe, "self-fuse", str(src), "--times", "2", "-q"]
            subprocess.run([*fuse, "-o", str(out)], check=True, capture_output=True)  # warm-up; the output's size
            on_disk = disk_bytes(out)
            shutil.rmtree(out)
            t_local = best_of([*fuse, "-o", str(out)], args.repeat, out)[0]
            rows.append((f"{fmt}: local source -> local disk", on_disk, t_local, t_local))
            for conc in (32, 1):
                os.environ["DEEPFUSE_OBJSTORE_CONCURRENCY"] = str(conc)
                times = []
                for _ in range(args.repeat):
                    start = time.perf_counter()
                    subprocess.run([*fuse, "-o", f"s3://{BUCKET}/out-{fmt}"], check=True, capture_output=True)
                    times.append(time.perf_counter() - start)
                    clear_out(url, f"out-{fmt}")
                rows.append((f"{fmt}: local source -> s3 (concurrency {conc})", on_disk, min(times), t_local))
            os.environ["DEEPFUSE_OBJSTORE_CONCURRENCY"] = "32"
            transfers.extend(transfer_rows(fmt, [*fuse, "-o", str(out)], out, url, args.repeat))
            remote = [*exe, "self-fuse", f"s3://{BUCKET}/src-{fmt}", "--times", "2", "-q", "-o", str(out)]
            rows.append((f"{fmt}: s3 source -> local disk (concurrency 32)", on_disk,
                         best_of(remote, args.repeat, out)[0], t_local))
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {mem / 2**30:.0f} GiB RAM, "
              f"python {platform.python_version()}; S3: moto on loopback")
        print(f"source: T5 1.1 float32, {info['bytes'] / 1e9:.2f} GB of parameters; "
              f"T5X on disk {disk_bytes(work / 'src-t5x') / 1e6:.0f} MB, Orbax {disk_bytes(work / 'src-orbax') / 1e6:.0f} MB")
        print(f"{'run':52} {'out MB':>7} {'wall s':>7} {'MB/s':>7} {'x local':>7}")
        for name, on_disk, t, t_local in rows:
            print(f"{name:52} {on_disk / 1e6:7.0f} {t:7.2f} {on_disk / 1e6 / t:7.1f} {t / t_local:7.2f}")
        print("transfers alone (this process; the output's files):")
        print(f"{'copy':52} {'MB':>7} {'wall s':>7} {'MB/s':>7} {'files':>7}")
        for name, nbytes, files, t in transfers:
            print(f"{name:52} {nbytes / 1e6:7.0f} {t:7.2f} {nbytes / 1e6 / t:7.1f} {files:7d}")
    finally:
        moto.kill()
        moto.wait()
        shutil.rmtree(work, ignore_errors=True)


def transfer_rows(fmt: str, fuse: list[str], out: Path, url: str, repeat: int) -> list[tuple]:
    """The fused output copied to the local disk (copy + fsync), uploaded to the bucket at several
    concurrencies, and downloaded from it: the object-store part of a run, without the fusing."""
    from deepfuse_cli.formats import objstore
    from deepfuse_cli.formats.files import fsync_path

    subprocess.run(fuse, check=True, capture_output=True)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    nbytes = disk_bytes(out)
    rows = []

    def best(fn) -> float:
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    def local_copy() -> None:
        dest = out.parent / "copy"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(out, dest)
        for p in dest.rglob("*"):
            fsync_path(p)
        shutil.rmtree(dest)

    rows.append((f"{fmt}: local disk -> local disk (copy, fsync)", nbytes, len(files), best(local_copy)))
    target = objstore.parse_url(f"s3://{BUCKET}/transfer-{fmt}")
    for conc in (1, 8, 32, 64):
        os.environ["DEEPFUSE_OBJSTORE_CONCURRENCY"] = str(conc)

        def upload() -> None:
            objstore.upload_checkpoint(out, target, files, [])
            clear_out(url, f"transfer-{fmt}")

        rows.append((f"{fmt}: local disk -> s3, {conc} in flight", nbytes, len(files), best(upload)))
    objstore.upload_checkpoint(out, target, files, [])
    for conc in (1, 32):
        os.environ["DEEPFUSE_OBJSTORE_CONCURRENCY"] = str(conc)
        rows.append((f"{fmt}: s3 -> local disk, {conc} in flight", nbytes, len(files),
                     best(lambda: objstore.fetch_checkpoint(target))))
    os.environ["DEEPFUSE_OBJSTORE_CONCURRENCY"] = "32"
    clear_out(url, f"transfer-{fmt}")
    shutil.rmtree(out)
    return rows


def clear_out(url: str, prefix: str) -> None:
    import boto3

    s3 = boto3.resource("s3", endpoint_url=url, region_name="us-east-1")
    s3.Bucket(BUCKET).objects.filter(Prefix=prefix + "/").delete()


if __name__ == "__main__":
    main()
