"""4. Latency of the built-in model, and what each CPU setting buys.

- end to end: median /txt2img API time at the defaults (64x64, 20 steps, classifier-free guidance);
- one denoising step: median U-Net time (batch 2 = CFG) against its FLOP count (torch.utils.flop_counter)
  and this machine's measured torch.mm throughput: the step at that throughput is the floor;
- settings: threads (all cores vs 1), channels_last, bf16 (with the image difference it causes), and
  torch.compile (compile time and step time), each as a ratio to the default fp32 eager step;
- cold start: a fresh `python` that imports app, builds the engine and makes one image.

    python -m benchmarks.latency [--model FOLDER] [--threads N] [--repeats N] [--quick] [--no-compile]
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np

from benchmarks.common import (
    REPO,
    Options,
    Row,
    build_engine,
    cores,
    matmul_gflops,
    median_time,
    model_folder,
    standalone,
    start_app,
    txt2img_args,
)

PART = "4 latency"
API_GOAL = "<= 0.25"
COLD_GOAL = "<= 10"
COLD_START = """
import time, torch
started = time.perf_counter()
import app
from pipelines import txt2img
engine = app.build_engine({model!r})
result = txt2img.generate(engine, prompt="a red circle", seed=1, steps={steps}, guidance=4.0)
assert result.images
print(f"in-process {{time.perf_counter() - started:.2f}}")
"""


def unet_inputs(engine, batch: int = 2):
    """What the U-Net sees in one CFG step at the model's default size: (B, 4, h, w) latents, text states."""
    import torch

    unet, text = engine.base.unet, engine.base.text_encoder
    latent = engine.preset.default_size // engine.vae_scale_factor
    tokens = engine.base.tokenizer.model_max_length
    sample = torch.randn(batch, unet.config.in_channels, latent, latent, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(batch, tokens, text.config.hidden_size, generator=torch.Generator().manual_seed(1))
    return sample, torch.tensor(500), hidden


def count_flops(module, *args) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        module(*args)
    return int(counter.get_total_flops())


def step_time(unet, args, *, repeats: int) -> float:
    import torch

    def step():
        with torch.inference_mode():
            unet(*args)

    return median_time(step, repeats=max(5, repeats * 3), warmup=3)


def image_of(engine, dtype, steps: int = 20) -> np.ndarray:
    """The default image as an array, from this model's weights loaded afresh in `dtype` (the engine's own
    modules are shared by every view, so they are never cast here)."""
    import torch
    from diffusers import StableDiffusionPipeline

    from pipelines.engine import _dtype_kwarg
    from pipelines.schedulers import make_scheduler

    pipe = StableDiffusionPipeline.from_pretrained(engine.preset.base, **_dtype_kwarg(dtype), use_safetensors=True,
                                                   safety_checker=None, requires_safety_checker=False,
                                                   feature_extractor=None)
    pipe.scheduler = make_scheduler(engine.preset.default_scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        image = pipe("a red circle left of a blue square", num_inference_steps=steps,
                     guidance_scale=engine.preset.default_guidance, output_type="np",
                     generator=[torch.Generator().manual_seed(3)]).images[0]
    return image.astype(np.float32)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def settings_rows(engine, opts: Options, compile_too: bool) -> list[Row]:
    import torch

    rows = []
    unet = engine.base.unet
    args = unet_inputs(engine)
    threads = torch.get_num_threads()
    base = step_time(unet, args, repeats=opts.repeats)

    # threads
    if cores() > 1 and threads > 1:
        torch.set_num_threads(1)
        one = step_time(unet, args, repeats=opts.repeats)
        torch.set_num_threads(threads)
        rows.append(Row(PART, f"U-Net step: all threads ({threads}) vs 1 (time ratio)", base / one,
                        detail=f"{base * 1e3:.1f} ms vs {one * 1e3:.1f} ms"))
    else:
        rows.append(Row(PART, "U-Net step: all threads vs 1 (time ratio)", float("nan"),
                        detail="skipped: this process may use 1 core"))

    # channels_last (the U-Net is shared, so put it back afterwards)
    unet.to(memory_format=torch.channels_last)
    try:
        last = step_time(unet, (args[0].to(memory_format=torch.channels_last), *args[1:]), repeats=opts.repeats)
    finally:
        unet.to(memory_format=torch.contiguous_format)
    rows.append(Row(PART, "U-Net step: channels_last vs default (time ratio)", last / base,
                    detail=f"{last * 1e3:.1f} ms vs {base * 1e3:.1f} ms"))

    # bf16: speed of the step, and what it does to the image
    import copy

    unet_bf16 = copy.deepcopy(unet).to(torch.bfloat16)
    bf16 = step_time(unet_bf16, tuple(a.to(torch.bfloat16) if a.is_floating_point() else a for a in args),
                     repeats=opts.repeats)
    del unet_bf16
    reference = image_of(engine, torch.float32, steps=opts.steps)
    halved = image_of(engine, torch.bfloat16, steps=opts.steps)
    rows.append(
        Row(
            PART,
            "U-Net step: bf16 vs fp32 (time ratio)",
            bf16 / base,
            detail=f"{bf16 * 1e3:.1f} ms vs {base * 1e3:.1f} ms; whole image in bf16: PSNR "
            f"{psnr(reference, halved):.1f} dB, max diff {np.abs(reference - halved).max() * 255:.0f}/255",
        )
    )

    # torch.compile
    if compile_too:
        try:
            compiled = torch.compile(copy.deepcopy(unet))
            started = time.perf_counter()
            with torch.inference_mode():
                compiled(*args)
            compile_s = time.perf_counter() - started
            fast = step_time(compiled, args, repeats=opts.repeats)
            rows.append(Row(PART, "U-Net step: torch.compile vs eager (time ratio)", fast / base,
                            detail=f"{fast * 1e3:.1f} ms vs {base * 1e3:.1f} ms after {compile_s:.0f} s of compiling "
                                   f"(less when inductor's on-disk cache is warm)"))
        except Exception as error:  # no compiler, unsupported op: say so, do not fail the run
            rows.append(Row(PART, "U-Net step: torch.compile vs eager (time ratio)", float("nan"),
                            detail=f"skipped: {type(error).__name__}: {str(error).splitlines()[0][:120]}"))
    else:
        rows.append(Row(PART, "U-Net step: torch.compile vs eager (time ratio)", float("nan"),
                        detail="skipped (--quick or --no-compile)"))
    return rows


def step_rows(engine, opts: Options) -> list[Row]:
    unet_args = unet_inputs(engine)
    flops = count_flops(engine.base.unet, *unet_args)
    gflops = matmul_gflops(seconds=0.5 if opts.quick else 2.0)
    step = step_time(engine.base.unet, unet_args, repeats=opts.repeats)
    floor = flops / (gflops * 1e9)
    latent = tuple(unet_args[0].shape)
    rows = [
        Row(PART, f"U-Net step {latent}: FLOPs", flops / 1e9, unit="GFLOP",
            detail="torch.utils.flop_counter.FlopCounterMode, batch 2 = CFG"),
        Row(PART, "U-Net step: time at matmul speed / measured time", floor / step * 100, unit="%",
            detail=f"{step * 1e3:.1f} ms measured vs {floor * 1e3:.2f} ms at {gflops:.0f} GFLOP/s "
                   f"(torch.mm 1024x1024 fp32 on this machine)"),
    ]
    return rows + settings_rows(engine, opts, opts.compile)


def cold_start(folder: str, steps: int, threads: int) -> tuple[float, str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", COLD_START.format(model=folder, steps=steps)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"cold start failed:\n{done.stderr[-2000:]}")
    inner = next((line for line in done.stdout.splitlines() if line.startswith("in-process")), "")
    return wall, inner.replace("in-process ", "")


def run(opts: Options) -> list[Row]:
    import torch

    folder, note = model_folder(opts)
    if note:
        opts.notes.append(note)
    engine = build_engine(folder)
    rows = []

    # end to end through the API
    args = txt2img_args(engine, seed=7, steps=opts.steps)
    server = start_app(engine)
    try:
        client = server.client()
        api = median_time(lambda: client.predict(**args, api_name="/txt2img"), repeats=opts.repeats, warmup=2)
    finally:
        server.close()
    rows.append(
        Row(
            PART,
            f"API /txt2img {args['width']}x{args['height']}, {args['steps']} steps, CFG {args['guidance']}",
            api,
            unit="s",
            goal=API_GOAL,
            detail=f"median of {opts.repeats}, the app's {engine.threads} model thread(s); goal set for 2 idle cores",
        )
    )

    # one step against the floor, and the settings; on the model thread, as the app runs the model (a second
    # thread's OpenMP pool would slow every op: pipelines/compute.py)
    rows += engine.compute.thread.run_threads(
        opts.threads or cores(), step_rows, engine, opts
    )  # this run's --threads, not the app's

    # cold start
    cold, inner = cold_start(folder, opts.steps, torch.get_num_threads())
    rows.append(Row(PART, "cold start to first image (import app, build engine, generate)", cold, unit="s",
                    goal=COLD_GOAL, detail=f"fresh interpreter, wall clock; {inner} s inside the process"))
    return rows


if __name__ == "__main__":
    raise SystemExit(standalone(PART, run))
