"""Benchmark: self-fuse x2 of a synthetic Llama-shaped bf16 checkpoint vs `dd` and a naive script.

Generates the checkpoint (no downloads), then in one invocation measures, each as a separate process
(wall time and peak RSS via /usr/bin/time -v, or psutil polling when that is missing):

  1. `dd if=/dev/zero of=... bs=16M count=N conv=fdatasync`: writing the output's bytes durably,
  2. `deepfuse self-fuse --times 2` (zero noise), output fsynced before its rename,
  3. the same with `--noise-scale 0.01`,
  4. the naive approach: load every tensor, torch.block_diag / torch.cat, safetensors save_file,

and two floors: Python start-up with deepfuse's imports (torch), and the sha256 of as many bytes as the
output holds on one core (the manifest records every output file's sha256, and one file's digest cannot
be split across cores). Their sum bounds any run from below, whatever the disk.

    python benchmarks/bench_fuse.py --quick          # ~40 MB model, under a minute
    python benchmarks/bench_fuse.py --size-gb 1      # the issue's target (~1 GB in, ~4 GB out)

Prints one table with time ratios to dd (``x dd``: to the bs=16M row), CPU seconds (user + system,
less sensitive than wall time to other work on a shared machine) and peak RSS against the bound
1.25 x largest fused tensor + 400 MiB. ``--repeat N`` reports the fastest of N runs of each row.

T5X / Orbax outputs (gzip / zstd compressed): ``benchmarks/bench_t5x.py`` (shares this file's helpers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NAIVE = r'''
import json, sys, torch
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
src, out = Path(sys.argv[1]), Path(sys.argv[2])
state = {}
with safe_open(str(src / "model.safetensors"), "pt") as f:
    for k in f.keys():
        t = f.get_tensor(k)
        if t.dim() == 2 and "embed" not in k and "lm_head" not in k:
            state[k] = torch.block_diag(t, t)
        elif "lm_head" in k:
            state[k] = torch.cat([t, t], dim=1) * 0.5
        else:
            state[k] = torch.cat([t, t], dim=-1)
out.mkdir()
save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
'''


SHA256_ONLY = r'''
import hashlib, sys
n, block = int(sys.argv[1]), bytes(16 * 2**20)
h = hashlib.sha256()
while n > 0:
    h.update(memoryview(block)[:min(n, len(block))])
    n -= len(block)
'''


def make_checkpoint(path: Path, size_gb: float) -> dict:
    """A Llama-shaped bf16 model of about ``size_gb`` GB, saved as one safetensors file with config."""
    import torch
    from safetensors.torch import save_file

    d, vocab = 2048, 32000
    inter = 5632
    per_layer = 4 * d * d + 3 * d * inter + 2 * d
    fixed = 2 * vocab * d + d
    layers = max(1, round((size_gb * 1e9 / 2 - fixed) / per_layer))
    if size_gb < 0.1:  # quick mode: a narrower model
        d, vocab, inter = 512, 8000, 1408
        per_layer = 4 * d * d + 3 * d * inter + 2 * d
        fixed = 2 * vocab * d + d
        layers = max(1, round((size_gb * 1e9 / 2 - fixed) / per_layer))
    g = torch.Generator().manual_seed(0)
    state = {"model.embed_tokens.weight": (vocab, d), "lm_head.weight": (vocab, d), "model.norm.weight": (d,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        state.update({p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (d, d),
                      p + "self_attn.v_proj.weight": (d, d), p + "self_attn.o_proj.weight": (d, d),
                      p + "mlp.gate_proj.weight": (inter, d), p + "mlp.up_proj.weight": (inter, d),
                      p + "mlp.down_proj.weight": (d, inter), p + "input_layernorm.weight": (d,),
                      p + "post_attention_layernorm.weight": (d,)})
    tensors = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in state.items()}
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d,
              "intermediate_size": inter, "num_attention_heads": d // 128, "num_key_value_heads": d // 128,
              "head_dim": 128, "num_hidden_layers": layers, "vocab_size": vocab, "rms_norm_eps": 1e-6,
              "hidden_act": "silu", "max_position_embeddings": 4096, "tie_word_embeddings": False,
              "dtype": "bfloat16"}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    def fused_bytes(name: str, s: tuple[int, ...]) -> int:  # bf16, x2: kernels block-diagonal, the rest concat
        if len(s) == 1 or "embed" in name or "lm_head" in name:
            return 2 * 2 * (s[0] if len(s) == 1 else s[0] * s[1])
        return 2 * (2 * s[0]) * (2 * s[1])

    largest = max(fused_bytes(k, s) for k, s in state.items())
    return {"layers": layers, "hidden": d, "bytes": (path / "model.safetensors").stat().st_size, "largest_fused": largest}


def make_wide(path: Path, hidden: int = 4096) -> None:
    """A one-hidden-layer MLP (bf16) whose hidden kernel, self-fused x8, is one 2 GiB tensor."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    shapes = {"input.weight": (hidden, 64), "input.bias": (hidden,), "hidden.0.weight": (hidden, hidden),
              "hidden.0.bias": (hidden,), "output.weight": (10, hidden), "output.bias": (10,)}
    path.mkdir(parents=True)
    save_file({k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"model_type": "deepfuse-mlp", "hidden_size": hidden, "in_features": 64,
                                                  "out_features": 10, "num_layers": 2, "activation": "relu"}))


def measure(cmd: list[str]) -> tuple[float, int, float]:
    """Wall seconds, peak RSS bytes and CPU seconds (user + system; nan without /usr/bin/time) of a
    command (a fresh process), after flushing dirty pages so that earlier writes do not compete."""
    os.sync()
    timer = shutil.which("time") and Path("/usr/bin/time").exists()
    full = ["/usr/bin/time", "-v", *cmd] if timer else cmd
    start = time.perf_counter()
    if timer:
        res = subprocess.run(full, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if res.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
        rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1)) * 1024
        cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", res.stderr).group(1)) for k in ("User", "System"))
        return wall, rss, cpu
    import psutil

    proc = psutil.Popen(full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.01)
    return time.perf_counter() - start, peak, float("nan")


def dd_command(target: Path, nbytes: int, bs: int = 16 * 2**20) -> tuple[list[str], float]:
    """A ``dd`` writing about ``nbytes`` zeros durably to ``target`` (whole blocks of ``bs``), and the factor
    that scales its time to exactly ``nbytes``."""
    count = max(1, nbytes // bs)
    cmd = ["dd", "if=/dev/zero", f"of={target}", f"bs={bs}", f"count={count}", "conv=fdatasync", "status=none"]
    return cmd, nbytes / (count * bs)


def drop(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def work_dir(parent: Path | None, prefix: str) -> Path:
    """A fresh temporary working directory, inside ``parent`` (created when missing) when given."""
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def best_of(cmd: list[str], repeat: int, *leftovers: Path) -> tuple[float, int, float]:
    """The fastest of ``repeat`` runs (wall s, with its CPU s) and the highest peak RSS of them all;
    ``leftovers`` (the run's outputs) are removed after each run."""
    runs = []
    for _ in range(repeat):
        runs.append(measure(cmd))
        for p in leftovers:
            drop(p)
    fastest = min(runs)
    return fastest[0], max(r[1] for r in runs), fastest[2]


def common_args(description: str, size_gb: float, quick: str) -> argparse.ArgumentParser:
    """The options every benchmark takes: source size, --quick, working directory, repeats."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=size_gb, help="size of the synthetic source (GB)")
    ap.add_argument("--quick", action="store_true", help=quick)
    ap.add_argument("--dir", type=Path, default=None, help="working directory (default: a temp dir)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every row this many times and report the fastest (the machine may be shared)")
    return ap


def main() -> None:
    ap = common_args(__doc__, 1.0, "a ~40 MB source: finishes in under a minute")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive script (it holds everything in RAM)")
    ap.add_argument("--wide", action="store_true",
                    help="also fuse one 2 GiB tensor (x8 of a 4096x4096 kernel): peak RSS stays far below it")
    args = ap.parse_args()
    size = 0.04 if args.quick else args.size_gb
    work = work_dir(args.dir, "deepfuse-bench-")
    try:
        src = work / "src"
        info = make_checkpoint(src, size)
        exe = [sys.executable, "-m", "deepfuse_cli"]
        rows = []
        out = work / "out"
        load_before = os.getloadavg()[0]

        def best(cmd: list[str]) -> tuple[float, int, float]:
            return best_of(cmd, args.repeat, out, work / "dd.bin")

        fuse = [*exe, "self-fuse", str(src), "--times", "2", "-o", str(out), "-q"]
        measure(fuse)
        out_bytes = sum(p.stat().st_size for p in out.iterdir())
        drop(out)

        def dd(bs: int) -> tuple[float, int, float]:
            cmd, scale = dd_command(work / "dd.bin", out_bytes, bs)
            t, rss, cpu = best(cmd)
            return t * scale, rss, cpu

        dd_t, dd_rss, dd_cpu = dd(16 * 2**20)
        rows.append(("dd conv=fdatasync (same bytes)", dd_t, dd_rss, dd_cpu))
        rows.append(("dd bs=1M conv=fdatasync (same bytes)", *dd(2**20)))
        rows.append(("deepfuse self-fuse x2", *best(fuse)))
        rows.append(("deepfuse self-fuse x2 --noise-scale 0.01", *best([*fuse, "--noise-scale", "0.01"])))
        start_t = best([sys.executable, "-c", "import deepfuse_cli.fuse"])
        rows.append(("(startup: python + imports, no work)", *start_t))
        sha_t = best([sys.executable, "-c", SHA256_ONLY, str(out_bytes)])
        rows.append(("(sha256 of the output's bytes, one core)", *sha_t))
        if not args.no_naive:
            rows.append(("naive: block_diag + save_file", *best([sys.executable, "-c", NAIVE, str(src), str(out)])))
        wide = None
        if args.wide:  # memory does not grow with the fused tensor: one 2 GiB tensor, x8 of a 32 MiB kernel
            make_wide(work / "wide")
            w = best([*exe, "self-fuse", str(work / "wide"), "--times", "8", "-o", str(out), "-q", "--noise-std", "0.001"])
            wide = ("self-fuse x8 --noise-std, one 2048 MiB tensor", *w)
        largest = info["largest_fused"]
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {mem / 2**30:.0f} GiB RAM, "
              f"python {platform.python_version()}")
        print(f"source: {info['bytes'] / 1e9:.2f} GB bf16, {info['layers']} layers, hidden {info['hidden']}; "
              f"output {out_bytes / 1e9:.2f} GB; largest fused tensor {largest / 2**20:.0f} MiB")
        print(f"load average (1 min) {load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
              "(the machine's other work competes for the cores and the disk)")
        print(f"{'run':44} {'wall s':>8} {'x dd':>6} {'GB/s':>6} {'cpu s':>6} {'peak RSS MiB':>13} {'RSS bound':>10}")
        bound = 1.25 * largest + 400 * 2**20
        for name, t, rss, cpu in rows:
            print(f"{name:44} {t:8.2f} {t / dd_t:6.2f} {out_bytes / 1e9 / t:6.2f} {cpu:6.2f} {rss / 2**20:13.0f} "
                  f"{'ok' if rss <= bound else 'over':>10}")
        print(f"RSS bound = 1.25 x largest fused tensor + 400 MiB = {bound / 2**20:.0f} MiB")
        floor = start_t[0] + sha_t[0]
        print(f"floor of any run that records the sha256 of its output: startup + sha256 = {floor:.2f} s "
              f"= {floor / dd_t:.2f} x dd")
        if wide is not None:
            name, t, rss, cpu = wide
            print(f"{name:44} {t:8.2f} {'':6} {2**31 / 1e9 / t:6.2f} {cpu:6.2f} {rss / 2**20:13.0f} "
                  f"{'< tensor' if rss < 2**31 else 'over':>10}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
