"""Streaming writes: the row-block path gives byte-for-byte the files of the whole-tensor path.

``write_plan`` streams row blocks into the safetensors writer (computed on a worker thread ahead of
the writer, hashed on another); the reference here computes each whole tensor with
``compute_tensor`` (its row blocks gathered on this thread) and hands it to the same writer's
``write``. Row blocks are made tiny so that every tensor spans many of them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from deepfuse_cli import ops
from deepfuse_cli.compute import compute_tensor
from deepfuse_cli.errors import InputError
from deepfuse_cli.formats import open_checkpoint, safetensors_io, staged_file
from deepfuse_cli.formats.base import CheckpointWriter, OutputTensor
from deepfuse_cli.formats.hf import HFWriter
from deepfuse_cli.fuse import write_plan
from deepfuse_cli.plan import FuseOptions, build_plan

CASES = {
    # name: (sources, self-fusion times or None, options)
    "llama-x2-zeros": (["llama-a"], 2, {}),
    "llama-x2-zeros-bf16": (["llama-a"], 2, {"dtype": torch.bfloat16}),
    "llama-x3-preserving-bf16": (["llama-a"], 3, {"noise_scale": 0.05, "noise_mode": "preserving",
                                                  "dtype": torch.bfloat16}),
    "llama-x2-offdiag-fp32": (["llama-a"], 2, {"noise_std": 0.01, "seed": 3}),
    "gpt2-x2-preserving-fused-qkv": (["gpt2-a"], 2, {"noise_scale": 0.05, "noise_mode": "preserving"}),
    "gpt2-fuse-offdiag-fused-qkv": (["gpt2-a", "gpt2-b"], None, {"noise_scale": 0.02, "seed": 7}),
    "gpt2-fuse-zeros-bf16": (["gpt2-a", "gpt2-b"], None, {"dtype": torch.bfloat16}),
    "llama-heterogeneous-weighted": (["llama-a", "llama-wide"], None, {"noise_std": 0.02, "weights": [0.3, 0.7]}),
    "t5v10-tied-noise": (["t5v10-a", "t5v10-b"], None, {"noise_std": 0.001}),
    "t5v11-x3": (["t5v11-a"], 3, {}),
    "mlp-heterogeneous": (["mlp-a", "mlp-wide"], None, {"noise_scale": 0.1, "weights": [0.4, 0.6]}),
    "llama-sharded": (["llama-a", "llama-b"], None, {"noise_std": 0.01, "max_shard_size": 30_000}),
}


def make_plan(fixtures: Path, names: list[str], times: int | None, opts: dict):
    sources = [open_checkpoint(fixtures / names[0])] * times if times else [open_checkpoint(fixtures / n) for n in names]
    options = FuseOptions.parse({"sources": len(sources)}, self_fusion=times is not None, **opts)
    return build_plan(sources, options)


def write_materialised(plan, directory: Path) -> dict[str, str]:
    """The reference: every tensor computed whole, written with ``write``."""
    directory.mkdir()
    outputs = [OutputTensor(e.name, e.shape, e.dtype) for e in plan.entries]
    writer = HFWriter(directory, outputs, {"max_shard_size": plan.options.max_shard_size,
                                           "safetensors_metadata": {"format": "pt"}})
    for entry in plan.entries:
        writer.write(entry.name, compute_tensor(plan, entry))
    writer.finish()
    return writer.digests


def weight_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())
            if p.suffix == ".safetensors" or p.name.endswith(".index.json")}


@pytest.fixture(params=["direct-io", "page-cache"])
def tiny_blocks(request, monkeypatch):
    """Row blocks of ~200 bytes, 8 KiB staging buffers, writeback started every ~1 KB: every path
    runs many times; files written with O_DIRECT and through the page cache."""
    monkeypatch.setattr(ops.common, "CHUNK_BYTES", 200)  # where the ops read it
    monkeypatch.setattr(staged_file, "STAGE_BYTES", 8192)
    monkeypatch.setattr(staged_file, "STAGES", 2)
    monkeypatch.setattr(staged_file, "WRITEBACK_BYTES", 1000)
    monkeypatch.setattr(staged_file, "DIRECT_IO", request.param == "direct-io")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("ahead", [1, 4])
def test_streaming_equals_materialising(case, ahead, hf_fixtures, tmp_path, tiny_blocks, monkeypatch):
    monkeypatch.setattr(ops, "BLOCKS_AHEAD", ahead)
    names, times, opts = CASES[case]
    plan = make_plan(hf_fixtures, names, times, opts)
    reference = write_materialised(plan, tmp_path / "whole")
    result = write_plan(plan, tmp_path / "streamed")
    want, got = weight_files(tmp_path / "whole"), weight_files(tmp_path / "streamed")
    assert list(got) == list(want)
    for name in want:
        assert got[name] == want[name], f"{case}: {name} differs between the streaming and materialising paths"
        assert result.files[name] == reference[name] == hashlib.sha256(got[name]).hexdigest()


def test_default_block_size_equals_materialising(hf_fixtures, tmp_path):
    plan = make_plan(hf_fixtures, ["gpt2-a"], 2, {"noise_scale": 0.05, "noise_mode": "preserving",
                                                  "dtype": torch.bfloat16})
    write_materialised(plan, tmp_path / "whole")
    write_plan(plan, tmp_path / "streamed")
    assert weight_files(tmp_path / "whole") == weight_files(tmp_path / "streamed")


def test_output_does_not_depend_on_thread_count(hf_fixtures, tmp_path, tiny_blocks):
    """--noise-scale measures the sources' RMS: that sum must not depend on torch's thread count."""
    plan = make_plan(hf_fixtures, ["llama-a", "llama-b"], None, {"noise_scale": 0.03, "seed": 1})
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = write_plan(plan, tmp_path / "one").files
        torch.set_num_threads(max(2, threads))
        two = write_plan(plan, tmp_path / "two").files
    finally:
        torch.set_num_threads(threads)
    assert one == two


class GatheringWriter(CheckpointWriter):
    """A writer with only ``write`` (as T5X/Orbax writers may be): ``write_chunks`` is the default."""

    def __init__(self, tensors):
        super().__init__(Path("."), tensors)
        self.got: dict[str, torch.Tensor] = {}

    def write(self, name, tensor):
        self.got[name] = tensor.clone()

    def finish(self):
        return []


def test_default_write_chunks_gathers_pieces():
    t = torch.randn(7, 5).to(torch.bfloat16)
    scalar = torch.tensor(3.5)
    writer = GatheringWriter([OutputTensor("t", (7, 5), torch.bfloat16), OutputTensor("s", (), torch.float32),
                              OutputTensor("e", (0, 3), torch.float32)])
    ring = ops.BufferRing(3)

    def pieces():  # reuses its buffers as the contract allows: the default must copy
        for r in range(0, 7, 2):
            buf, _ = ring.get((min(2, 7 - r), 5), torch.bfloat16)
            buf.copy_(t[r:r + 2])
            yield buf

    writer.write_chunks("t", pieces())
    writer.write_chunks("s", [safetensors_io.tensor_bytes(scalar).tobytes()])
    writer.write_chunks("e", [])
    assert torch.equal(writer.got["t"], t)
    assert torch.equal(writer.got["s"], scalar)
    assert writer.got["e"].shape == (0, 3)
    with pytest.raises(RuntimeError, match="bytes"):
        writer.write_chunks("t", [t[:3]])
    with pytest.raises(RuntimeError, match="dtype"):
        writer.write_chunks("t", [t.float()])


def test_safetensors_writer_checks_piece_sizes(tmp_path):
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    out = safetensors_io.SafetensorsFileWriter(tmp_path / "a.safetensors", [OutputTensor("t", (3, 4), torch.float32)])
    with pytest.raises(RuntimeError, match="more than"):
        out.write_chunks("t", [t, t[:1]])
    out.abort()
    out = safetensors_io.SafetensorsFileWriter(tmp_path / "b.safetensors", [OutputTensor("t", (3, 4), torch.float32)])
    with pytest.raises(RuntimeError, match="of the 48 bytes"):
        out.write_chunks("t", [t[:2]])
    out.abort()
    out = safetensors_io.SafetensorsFileWriter(tmp_path / "c.safetensors", [OutputTensor("t", (3, 4), torch.float32)])
    out.write_chunks("t", [t[:1], memoryview(t[1:].numpy()).cast("B")])
    out.close()
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / "c.safetensors")["t"], t)


def test_worker_error_reaches_the_caller_and_nothing_is_left(hf_fixtures, tmp_path, tiny_blocks):
    """A source tensor that fails its checks on the worker thread fails the run; no output remains."""
    src = tmp_path / "bad"
    src.mkdir()
    from safetensors.torch import load_file

    state = load_file(hf_fixtures / "llama-a" / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    state[name] = state[name].clone()
    state[name][3, 2] = float("nan")
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_bytes((hf_fixtures / "llama-a" / "config.json").read_bytes())
    plan = make_plan(tmp_path, ["bad"], 2, {})
    with pytest.raises(InputError, match="non-finite"):
        write_plan(plan, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "deepfuse-tmp" in p.name]


@pytest.mark.parametrize("direct", [True, False])
def test_staged_file_bytes_and_digest(direct, tmp_path, monkeypatch):
    """Sizes around the staging buffer and the direct-I/O alignment; pieces of every size."""
    monkeypatch.setattr(staged_file, "DIRECT_IO", direct)
    monkeypatch.setattr(staged_file, "STAGE_BYTES", 8192)
    monkeypatch.setattr(staged_file, "STAGES", 2)
    g = torch.Generator().manual_seed(0)
    for total in (1, 4095, 4096, 4097, 8191, 8192, 8193, 3 * 8192 + 5, 100_000):
        data = torch.randint(0, 256, (total,), generator=g, dtype=torch.uint8).numpy().tobytes()
        path = tmp_path / f"f{total}"
        f = staged_file.StagedFile(path, sha256=True)
        if direct:
            assert f._direct  # the test filesystem takes O_DIRECT (ext4, xfs, tmpfs >= 6.6)
        pos, step = 0, 1
        while pos < total:
            f.write(memoryview(data)[pos:pos + step])
            pos += step
            step = step * 3 + 1
        f.close()
        assert path.read_bytes() == data
        assert f.hexdigest() == hashlib.sha256(data).hexdigest()


def test_staged_file_abort_leaves_descriptor_closed(tmp_path):
    f = staged_file.StagedFile(tmp_path / "x", sha256=True)
    f.write(b"abc" * 10_000)
    f.abort()
    with pytest.raises(OSError):
        os.fstat(f._fd)
