"""--max-memory: the run refuses up front when the plan cannot fit, and a streamed run stays under the
bound even when one fused tensor is larger than the whole bound (measured peak RSS of the process)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import save_file

from .helpers import cli

RULES = {
    "name": "one-kernel",
    "rules": [{"pattern": "w", "op": "block_diagonal", "axes": ["hidden", "hidden"], "input_axis": 1}],
}


def _peak_mib(args: list[str]) -> float:
    """Peak RSS (MiB) of a deepfuse run in a fresh process, which must succeed."""
    code = (
        "import sys\n"
        "from deepfuse_cli.cli import run\n"
        f"sys.argv = ['deepfuse', *{args!r}]\n"
        "try:\n    run()\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
        # VmHWM: this process image's peak RSS (ru_maxrss would include the forking pytest process)
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))\n"
        "sys.exit(code)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip().splitlines()[-1]) / 1024


def test_fused_tensor_larger_than_the_bound_streams_within_it(tmp_path):
    src = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(4096, 4096)}, str(src))  # 64 MiB; x4 -> one 1 GiB fused tensor
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(RULES))
    out = tmp_path / "out"
    limit = 640
    peak_mib = _peak_mib(["self-fuse", str(src), "--rules", str(rules), "--times", "4", "--noise-std", "0.01",
                          "--max-memory", f"{limit}MiB", "-o", str(out), "-q"])
    fused_mib = (out / "model.safetensors").stat().st_size / 2**20
    assert fused_mib > 1000
    assert peak_mib < limit, f"peak RSS {peak_mib:.0f} MiB over --max-memory {limit} MiB"


def test_plan_that_cannot_fit_is_refused_before_writing(hf_fixtures, tmp_path):
    msg = cli("self-fuse", hf_fixtures / "llama-a", "--max-memory", "64MiB", "-o", tmp_path / "o", expect=2)
    assert "--max-memory 64 MiB" in msg and not (tmp_path / "o").exists()
    msg = cli("plan", hf_fixtures / "llama-a", "--times", "2", "--max-memory", "lots", expect=2)
    assert "--max-memory 'lots' is not a size" in msg


# ---------------------------------------------------------------------------------------------
# T5X / Orbax outputs and transposing conversions: the plan's peak-memory estimate holds


def _big_t5(tmp_path_factory):
    """A T5 1.1 (one layer each side) whose vocabulary dominates: a 128 MiB fp32 embedding and
    logits kernel, so that a fused tensor (256 MiB) is well above the estimate's slack."""
    import numpy as np

    from deepfuse_cli.formats.base import OutputTensor
    from deepfuse_cli.formats.orbax import OrbaxWriter
    from deepfuse_cli.formats.t5x import T5XWriter

    from .conftest import FIXTURES

    sys.path.insert(0, str(FIXTURES))
    import t5x_trees

    work = tmp_path_factory.mktemp("big-t5")
    dims = {"vocab": 32768, "emb": 1024, "heads": 4, "head_dim": 16, "mlp": 64, "layers": 1, "buckets": 32}
    params = t5x_trees.flatten({"target": t5x_trees.t5_params(0, dims)})
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in params.items()}
    outs = [OutputTensor(k, tuple(t.shape), t.dtype) for k, t in tensors.items()]
    for fmt, writer in (("t5x", T5XWriter(work / "t5x", outs, {"step": 1, "layout": "root"})),
                        ("orbax", OrbaxWriter(work / "orbax", outs, {"step": 1, "layout": "root", "zarr_format": 2,
                                                                     "extra_leaves": {"state/step": np.int32(1)}}))):
        for k, t in tensors.items():
            writer.write(k, t)
        writer.finish()
    return work


def test_t5x_orbax_and_transposing_runs_stay_within_the_plan_estimate(tmp_path_factory, tmp_path):
    big = _big_t5(tmp_path_factory)
    for source, to in (("t5x", "t5x"), ("orbax", "orbax"), ("t5x", "safetensors"), ("orbax", "t5x")):
        args = ["self-fuse", str(big / source), "--times", "2", "--to", to]
        estimate = json.loads(cli("plan", *args[1:], "--json"))["peak_memory_bytes"] / 2**20
        out = tmp_path / f"{source}-{to}"
        peak = _peak_mib([*args, "-o", str(out), "-q", "--max-memory", f"{int(estimate) + 1}MiB"])
        assert out.is_dir()
        assert 256 < peak <= estimate, f"{source} -> {to}: peak RSS {peak:.0f} MiB, plan estimate {estimate:.0f} MiB"
