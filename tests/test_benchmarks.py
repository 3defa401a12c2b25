"""The benchmark script runs end to end and prints every row (a smoke test: no timing is asserted;
docs/ARCHITECTURE.md, Measuring)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

ROWS = [
    "1 app overhead | API /txt2img vs diffusers call",
    "1 app overhead | API /txt2img over plain HTTP (no gradio_client) vs diffusers call",
    "1 app overhead | app task path without HTTP vs diffusers call",
    "1 app overhead | gradio floor: same outputs, no model",
    "2 sharing      | built-in: all tab pipelines via engine vs 1 txt2img + 3 ControlNets (RSS)",
    "2 sharing      | built-in: same, unique weight bytes",
    "2 sharing      | built-in: same pipelines loaded separately vs via engine",
    "2 sharing      | SD1.5-shaped: all tab pipelines via engine",
    "2 sharing      | SD1.5-shaped: same, unique weight bytes",
    "2 sharing      | SD1.5-shaped: same pipelines loaded separately",
    "3 throughput   | 2 clients at once vs 1 client in turn (batching on",
    "3 throughput   | 2 clients at once vs 1 client in turn (batching off",
    "4 latency      | API /txt2img 64x64",
    "4 latency      | U-Net step (2, 4, 16, 16): FLOPs",
    "4 latency      | U-Net step: time at matmul speed / measured time",
    "4 latency      | U-Net step: all threads vs 1",
    "4 latency      | U-Net step: channels_last vs default",
    "4 latency      | U-Net step: bf16 vs fp32",
    "4 latency      | U-Net step: torch.compile vs eager",
    "4 latency      | cold start to first image",
    "5 LDM claim    | built-in: U-Net FLOPs per step, pixel space 64x64x3 / latent 16x16x4",
    "5 LDM claim    | SD1.5: U-Net FLOPs per step",
    "7 compare grid | 2x2 grid of 64x64, 2 steps",
    "7 compare grid | grid vs the same images as single txt2img runs",
    "10 distilled fast path | txt2img 64x64: the fast path per image, at its best thread count",
    "10 distilled fast path | API /txt2img end to end (gradio_client), distilled on onnx",
    "10 distilled fast path | cold start: fresh python, import app, engine on onnx with the cached exports",
    "10 distilled fast path | first start after install: the same, exporting first",
]


def _env(tmp_path) -> dict:
    return {**os.environ, "LDS_BENCH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


@pytest.mark.slow
def test_quick_benchmark_prints_every_row(tiny_paths, tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--threads", "1",
                           "--model", str(tiny_paths["shapes"])],
                          cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    lines = [" | ".join(cell.strip() for cell in line.split(" | ")) for line in done.stdout.splitlines()]
    for row in ROWS:
        wanted = " | ".join(cell.strip() for cell in row.split(" | "))
        assert any(line.startswith(wanted) for line in lines), f"missing row {row!r} in:\n{done.stdout}"
    assert "FAILED" not in done.stdout
    assert "goal" in done.stdout and "<= 1.03" in done.stdout and ">= 1.8" in done.stdout


def test_gpu_benchmark_exits_cleanly_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the GPU benchmark would run for real")
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu"], cwd=REPO, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no CUDA GPU" in done.stdout
