"""Benchmark: `deepfuse verify` against the fuse that wrote the checkpoint (issue target: verify <= 2 x fuse).

Generates the same synthetic Llama-shaped bf16 checkpoint as ``bench_fuse.py`` (its generator, no
downloads), self-fuses it x2, then measures, each as a separate process (wall time, CPU seconds and
peak RSS, as ``bench_fuse.py`` measures them):

  1. ``deepfuse self-fuse SRC --times 2`` (zero noise, or ``--noise-scale`` when given),
  2. ``deepfuse verify OUT``: integrity, tensor level and function level, as CI runs it,
  3. the tensor level alone: ``run_verify`` without the function check (integrity, plan, tensors),
     which also reports the seconds spent in the tensor-level check itself,
  4. Python start-up with deepfuse's imports (a floor under every row), and with the transformers model
     code the function check imports (a floor under the verify row: seconds of Python, whatever the size).

The function check runs each model in fp32 with one layer's weights in memory at a time (the next layer
read ahead on a second thread), so its peak RSS does not grow with depth.

    python benchmarks/bench_verify.py --quick          # ~40 MB source, about a minute
    python benchmarks/bench_verify.py --size-gb 1      # the issue's checkpoint (~0.9 GB in, ~3.2 GB out)
    python benchmarks/bench_verify.py --quick --noise-scale 0.01   # verify regenerates the noise too

Prints one table: wall seconds, ratio to the fuse, CPU seconds and peak RSS of each row.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_fuse import best_of, common_args, make_checkpoint, measure, work_dir

#: ``run_verify`` without the function check; writes the wall and CPU seconds of its tensor-level check to argv[2]
TENSORS_ONLY = r'''
import json, sys, time
from deepfuse_cli.verify import VerifyOptions, run as verify_run
check, spent = verify_run.verify_tensors, []
def timed(*args):
    start, cpu = time.perf_counter(), time.process_time()
    try:
        return check(*args)
    finally:
        spent.append((time.perf_counter() - start, time.process_time() - cpu))
verify_run.verify_tensors = timed
report = verify_run.run_verify(sys.argv[1], VerifyOptions(function=False))
open(sys.argv[2], "w").write(json.dumps({"wall": sum(s[0] for s in spent), "cpu": sum(s[1] for s in spent),
                                         "passed": report.passed}))
sys.exit(0 if report.passed else 1)
'''


#: what the function check imports before it can build a model: a floor under the verify row
RUNTIME_IMPORTS = ("import deepfuse_cli.verify.run\nfrom transformers import LlamaConfig, LlamaForCausalLM, initialization\n"
                   "from transformers.conversion_mapping import get_model_conversion_mapping")


def main() -> None:
    ap = common_args(__doc__, 1.0, "a ~40 MB source: finishes in about a minute")
    ap.add_argument("--noise-scale", type=float, default=0.0,
                    help="fuse with this relative noise (verify regenerates it)")
    ap.add_argument("--no-function", action="store_true", help="skip the whole `deepfuse verify` row (function check)")
    args = ap.parse_args()
    size = 0.04 if args.quick else args.size_gb
    work = work_dir(args.dir, "deepfuse-bench-verify-")
    try:
        src, out, timing = work / "src", work / "out", work / "tensor-level.json"
        info = make_checkpoint(src, size)
        exe = [sys.executable, "-m", "deepfuse_cli"]
        fuse = [*exe, "self-fuse", str(src), "--times", "2", "-o", str(out), "-q"]
        if args.noise_scale:
            fuse += ["--noise-scale", str(args.noise_scale)]
        rows = [("deepfuse self-fuse x2", *best_of(fuse, args.repeat, out))]
        measure(fuse)  # the output the verify rows read
        out_bytes = sum(p.stat().st_size for p in out.iterdir())
        if not args.no_function:
            rows.append(("deepfuse verify (integrity, tensors, function)",
                         *best_of([*exe, "verify", str(out)], args.repeat)))
        rows.append(("verify without the function check", *best_of([sys.executable, "-c", TENSORS_ONLY, str(out),
                                                                    str(timing)], args.repeat)))
        tensor_level = json.loads(timing.read_text())
        rows.append(("(startup: python + imports, no work)",
                     *best_of([sys.executable, "-c", "import deepfuse_cli.verify.run"], args.repeat)))
        rows.append(("(startup + transformers' Llama model code)",
                     *best_of([sys.executable, "-c", RUNTIME_IMPORTS], args.repeat)))
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {mem / 2**30:.0f} GiB RAM, "
              f"python {platform.python_version()}; load average (1 min) {os.getloadavg()[0]:.2f}")
        print(f"source: {info['bytes'] / 1e9:.2f} GB bf16, {info['layers']} layers, hidden {info['hidden']}; "
              f"output {out_bytes / 1e9:.2f} GB; largest fused tensor {info['largest_fused'] / 2**20:.0f} MiB; "
              f"noise scale {args.noise_scale}")
        fuse_t = rows[0][1]
        print(f"{'run':48} {'wall s':>8} {'x fuse':>7} {'cpu s':>7} {'peak RSS MiB':>13}")
        for name, t, rss, cpu in rows:
            print(f"{name:48} {t:8.2f} {t / fuse_t:7.2f} {cpu:7.2f} {rss / 2**20:13.0f}")
        wall, cpu = tensor_level["wall"], tensor_level["cpu"]
        print(f"{'  of which the tensor-level check':48} {wall:8.2f} {wall / fuse_t:7.2f} {cpu:7.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
