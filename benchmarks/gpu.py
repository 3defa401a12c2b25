"""SD1.5-shaped U-Net (random weights, the exact SD1.5 architecture from benchmarks/models.py) denoising speed
on a CUDA GPU: iterations per second of one classifier-free-guidance step (batch 2) at 512x512 in fp16, with
the settings the engine can use: SDPA attention (diffusers' default on torch 2) against the classic attention
processor, channels_last, and optionally torch.compile.

    python -m benchmarks.gpu                 # eager variants
    python -m benchmarks.gpu --compile       # also torch.compile (takes a minute or two to compile)

On a machine without CUDA it says so and exits with status 0. `--device cpu --size 64 --dtype fp32` runs the
same code on a CPU (slowly; only to check the script).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from benchmarks.common import Row, print_table, quiet_libraries

PART = "GPU"


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def iterations_per_second(unet, args, device: str, *, seconds: float, warmup: int = 3) -> float:
    import torch

    with torch.inference_mode():
        for _ in range(warmup):
            unet(*args)
        _sync(device)
        rates = []
        for _ in range(3):  # three windows; the median rate
            count, started = 0, time.perf_counter()
            while True:
                unet(*args)
                count += 1
                if count % 5 == 0:
                    _sync(device)
                    if time.perf_counter() - started >= seconds / 3:
                        break
            rates.append(count / (time.perf_counter() - started))
    return statistics.median(rates)


def run(device: str, dtype_name: str, size: int, compile_too: bool, seconds: float) -> tuple[list[Row], str]:
    import torch
    from diffusers.models.attention_processor import AttnProcessor

    from benchmarks.models import sd15_unet

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    torch.manual_seed(0)
    with torch.device(device):
        unet = sd15_unet().to(dtype).eval()  # random weights: speed does not depend on the values
    latent = size // 8
    args = (torch.randn(2, 4, latent, latent, device=device, dtype=dtype), torch.tensor(500, device=device),
            torch.randn(2, 77, 768, device=device, dtype=dtype))
    label = f"SD1.5-shaped U-Net, {size}x{size}, {dtype_name}, batch 2 (CFG)"
    rows = []

    sdpa = iterations_per_second(unet, args, device, seconds=seconds)
    rows.append(Row(PART, f"{label}: SDPA (default)", sdpa, unit="it/s"))

    unet.set_attn_processor(AttnProcessor())
    classic = iterations_per_second(unet, args, device, seconds=seconds)
    unet.set_default_attn_processor()
    rows.append(Row(PART, f"{label}: speed-up of SDPA over classic attention", sdpa / classic,
                    detail=f"{sdpa:.2f} vs {classic:.2f} it/s"))

    unet.to(memory_format=torch.channels_last)
    cl_args = (args[0].to(memory_format=torch.channels_last), *args[1:])
    last = iterations_per_second(unet, cl_args, device, seconds=seconds)
    rows.append(Row(PART, f"{label}: speed-up of channels_last (SDPA)", last / sdpa, detail=f"{last:.2f} it/s"))

    if compile_too:
        try:
            compiled = torch.compile(unet, fullgraph=False)
            started = time.perf_counter()
            with torch.inference_mode():
                compiled(*cl_args)
            _sync(device)
            compile_s = time.perf_counter() - started
            fast = iterations_per_second(compiled, cl_args, device, seconds=seconds)
            rows.append(Row(PART, f"{label}: speed-up of torch.compile (SDPA, channels_last)", fast / last,
                            detail=f"{fast:.2f} it/s after {compile_s:.0f} s of compiling"))
        except Exception as error:  # say why, do not fail the run
            rows.append(Row(PART, f"{label}: speed-up of torch.compile (SDPA, channels_last)", float("nan"),
                            detail=f"skipped: {type(error).__name__}: {str(error).splitlines()[0][:120]}"))
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        peak = torch.cuda.max_memory_allocated(torch.device(device)) / 2**30
        where = f"{name}, torch {torch.__version__}, peak {peak:.1f} GiB allocated"
    else:
        where = f"{device}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    return rows, where


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:1, ... (cpu only to check the script)")
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile")
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per variant")
    args = parser.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("benchmarks.gpu: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing to measure.")
        return 0
    quiet_libraries()
    rows, where = run(args.device, args.dtype, args.size, args.compile, args.seconds)
    print_table(rows, [], title=f"GPU benchmark ({where})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
