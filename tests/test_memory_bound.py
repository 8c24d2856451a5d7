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


def test_fused_tensor_larger_than_the_bound_streams_within_it(tmp_path):
    src = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(4096, 4096)}, str(src))  # 64 MiB; x4 -> one 1 GiB fused tensor
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(RULES))
    out = tmp_path / "out"
    limit = 640
    code = (
        "import sys\n"
        "from deepfuse_cli.cli import run\n"
        f"sys.argv = ['deepfuse', 'self-fuse', {str(src)!r}, '--rules', {str(rules)!r}, '--times', '4',\n"
        f"            '--noise-std', '0.01', '--max-memory', '{limit}MiB', '-o', {str(out)!r}, '-q']\n"
        "try:\n    run()\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
        # VmHWM: this process image's peak RSS (ru_maxrss would include the forking pytest process)
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))\n"
        "sys.exit(code)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    peak_mib = int(proc.stdout.strip().splitlines()[-1]) / 1024
    fused_mib = (out / "model.safetensors").stat().st_size / 2**20
    assert fused_mib > 1000
    assert peak_mib < limit, f"peak RSS {peak_mib:.0f} MiB over --max-memory {limit} MiB"


def test_plan_that_cannot_fit_is_refused_before_writing(hf_fixtures, tmp_path):
    msg = cli("self-fuse", hf_fixtures / "llama-a", "--max-memory", "64MiB", "-o", tmp_path / "o", expect=2)
    assert "--max-memory 64 MiB" in msg and not (tmp_path / "o").exists()
    msg = cli("plan", hf_fixtures / "llama-a", "--times", "2", "--max-memory", "lots", expect=2)
    assert "--max-memory 'lots' is not a size" in msg
