"""The sha256 of every file every fixture's fusion, conversion and mode writes.

A refactor is safe only when no output byte changes. This module runs one CLI invocation per case
(every shipped fixture, every mode: self-fusion, n-way, weights, noise of both modes, dtype casts,
sharding, T5X/Orbax layouts and conversions, optimizer state) and digests each output file. The
manifest (``deepfuse.json``) records absolute source paths and the tool version, so it is digested
with those replaced by placeholders, and without the rules it records (``rules``, ``preset``, their
digest and the plan digest, which names rule patterns): those change whenever a preset file does.
The model card (``README.md`` of a Hugging Face output) shows the command, so it is digested with
the same paths and the tool version replaced by placeholders.

    python tests/output_digests.py            # print the table (case, file, sha256)
    python tests/output_digests.py --write    # rewrite tests/golden/output_digests.json

``tests/test_output_digests.py`` compares every case with the committed table.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "fixtures"
GOLDEN = Path(__file__).resolve().parent / "golden" / "output_digests.json"

H, T, O = "hf", "t5x", "orbax"
#: case name -> CLI arguments (the output directory is appended as ``-o``)
CASES: dict[str, list[str]] = {
    # Hugging Face: self-fusion
    "llama-x2": ["self-fuse", f"{H}/llama-a", "--times", "2"],
    "llama-x3": ["self-fuse", f"{H}/llama-a", "--times", "3"],
    "llama-x2-noise-offdiag": ["self-fuse", f"{H}/llama-a", "--times", "2", "--noise-scale", "0.01", "--seed", "3"],
    "llama-x2-noise-preserving": ["self-fuse", f"{H}/llama-a", "--times", "2", "--noise-std", "0.02",
                                  "--noise-mode", "preserving", "--seed", "5"],
    "llama-x2-bf16": ["self-fuse", f"{H}/llama-a", "--times", "2", "--dtype", "bfloat16"],
    "llama-x2-fp16-sharded": ["self-fuse", f"{H}/llama-a", "--times", "2", "--dtype", "float16",
                              "--max-shard-size", "20KB"],
    "llama-mha-x2": ["self-fuse", f"{H}/llama-mha-a", "--times", "2"],
    "llama-bin-x2": ["self-fuse", f"{H}/llama-a-bin", "--times", "2"],
    "gpt2-x2-noise-preserving": ["self-fuse", f"{H}/gpt2-a", "--times", "2", "--noise-std", "0.01",
                                 "--noise-mode", "preserving"],
    "t5v10-x2": ["self-fuse", f"{H}/t5v10-a", "--times", "2"],
    "mlp-x2": ["self-fuse", f"{H}/mlp-a", "--times", "2"],
    # Hugging Face: different sources
    "llama-ab": ["fuse", f"{H}/llama-a", f"{H}/llama-b"],
    "llama-ab-prop": ["fuse", f"{H}/llama-a", f"{H}/llama-b", "--norm", "prop"],
    "llama-ab-weights": ["fuse", f"{H}/llama-a", f"{H}/llama-b", "--weights", "0.3,0.7"],
    "llama-ab-noise": ["fuse", f"{H}/llama-a", f"{H}/llama-b", "--noise-std", "0.01", "--seed", "7"],
    "llama-ab-sharded-bin": ["fuse", f"{H}/llama-a-bin", f"{H}/llama-b-sharded"],
    "llama-ab-wide-3way": ["fuse", f"{H}/llama-a", f"{H}/llama-b", f"{H}/llama-wide", "--norm", "prop"],
    "llama-tied-ab": ["fuse", f"{H}/llama-tied-a", f"{H}/llama-tied-b"],
    "mistral-ab": ["fuse", f"{H}/mistral-a", f"{H}/mistral-b"],
    "qwen2-ab-prop": ["fuse", f"{H}/qwen2-a", f"{H}/qwen2-b", "--norm", "prop"],
    "gpt2-ab": ["fuse", f"{H}/gpt2-a", f"{H}/gpt2-b-bin-sharded", "--noise-scale", "0.05"],
    "t5v11-ab": ["fuse", f"{H}/t5v11-a", f"{H}/t5v11-b", "--norm", "prop"],
    "t5v10-ab-weights": ["fuse", f"{H}/t5v10-a", f"{H}/t5v10-b", "--weights", "2,1"],
    "mlp-ab-wide": ["fuse", f"{H}/mlp-a", f"{H}/mlp-b", f"{H}/mlp-wide"],
    # T5X and Orbax
    "t5x-x2": ["self-fuse", f"{T}/legacy-a", "--times", "2"],
    "t5x-ab-prop": ["fuse", f"{T}/legacy-a", f"{T}/legacy-b", "--norm", "prop"],
    "t5x-ab-state": ["fuse", f"{T}/legacy-a", f"{T}/legacy-b", "--optimizer-state", "fuse", "--noise-std", "0.01"],
    "t5x-multi-x2": ["self-fuse", f"{T}/legacy-a-multi", "--times", "2"],
    "t5x-steps-500-x2": ["self-fuse", f"{T}/legacy-a-steps", "--step", "500", "--times", "2"],
    "t5x-ab-to-hf": ["fuse", f"{T}/legacy-a", f"{T}/legacy-b", "--to", "safetensors"],
    "t5x-ab-to-orbax": ["fuse", f"{T}/legacy-a", f"{T}/legacy-b", "--to", "orbax"],
    "orbax-ab": ["fuse", f"{O}/std-a", f"{O}/std-b", "--optimizer-state", "fuse"],
    "orbax-tied-x2": ["self-fuse", f"{O}/std-tied", "--times", "2", "--noise-std", "0.01",
                      "--noise-mode", "preserving"],
    "orbax-mgr-x2": ["self-fuse", f"{O}/mgr-a", "--times", "2"],
    "orbax-v1-x2": ["self-fuse", f"{O}/v1-a", "--times", "2"],
    "orbax-ab-to-t5x": ["fuse", f"{O}/std-a", f"{O}/std-b", "--to", "t5x"],
    # conversions
    "convert-t5x-to-hf": ["convert", f"{T}/legacy-a", "--to", "safetensors"],
    "convert-t5x-to-orbax": ["convert", f"{T}/legacy-a", "--to", "orbax"],
    "convert-orbax-to-t5x": ["convert", f"{O}/mgr-a", "--to", "t5x"],
    "convert-hf-to-t5x": ["convert", "@convert-t5x-to-hf", "--to", "t5x"],
    "convert-hf-to-orbax": ["convert", "@t5x-ab-to-hf", "--to", "orbax"],
    "hf-t5-x2-to-t5x": ["self-fuse", "@convert-t5x-to-hf", "--times", "2", "--to", "t5x"],
}


def _args(case: list[str], work: Path) -> list[str]:
    """Fixture-relative source paths made absolute; ``@name`` is the output of an earlier case."""
    out = []
    for a in case:
        head = a.split("/", 1)[0]
        if a.startswith("@"):
            out.append(str(work / a[1:]))
        else:
            out.append(str(FIX / a) if head in (H, T, O) and "/" in a else a)
    return out


def _manifest_digest(data: bytes) -> str:
    text = data.decode()
    text = text.replace(str(FIX), "<FIXTURES>")
    text = re.sub(r'"/[^"]*/deepfuse-digests-[^/"]*/', '"<WORK>/', text)
    m = json.loads(text)
    for key in ("deepfuse_version", "rules", "preset", "preset_digest", "plan_digest"):
        m.pop(key, None)
    return hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()


def _card_digest(data: bytes) -> str:
    """The model card, with what is run-specific (the fixtures' and work directory's paths in the
    command it shows, the tool version) replaced by placeholders."""
    from deepfuse_cli import __version__

    text = data.decode().replace(str(FIX), "<FIXTURES>")
    text = re.sub(r"/[^\s`\"]*/deepfuse-digests-[^/\s`\"]*/", "<WORK>/", text)
    text = text.replace(f"deepfuse {__version__}", "deepfuse <VERSION>")
    return hashlib.sha256(text.encode()).hexdigest()


def digest_dir(out: Path) -> dict[str, str]:
    table = {}
    for p in sorted(out.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(out).as_posix()
        data = p.read_bytes()
        if p.name == "deepfuse.json":
            table[rel] = _manifest_digest(data)
        elif rel == "README.md":
            table[rel] = _card_digest(data)
        else:
            table[rel] = hashlib.sha256(data).hexdigest()
    return table


def run_case(name: str, work: Path) -> dict[str, str]:
    from typer.testing import CliRunner

    from deepfuse_cli.cli import app

    out = work / name
    result = CliRunner().invoke(app, [*_args(CASES[name], work), "-o", str(out), "-q"], catch_exceptions=False)
    if result.exit_code != 0:
        raise RuntimeError(f"case {name}: exit {result.exit_code}\n{result.output}")
    return digest_dir(out)


def all_digests(names: list[str] | None = None) -> dict[str, dict[str, str]]:
    with tempfile.TemporaryDirectory(prefix="deepfuse-digests-") as tmp:
        return {name: run_case(name, Path(tmp)) for name in (names or list(CASES))}


def main(argv: list[str]) -> int:
    table = all_digests()
    if "--write" in argv:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        print(f"wrote {GOLDEN} ({len(table)} cases)")
        return 0
    for case, files in table.items():
        for f, d in files.items():
            print(f"{case}\t{f}\t{d}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
