"""8. The fast backend: the U-Net's steps on ONNX Runtime (`--backend onnx`) against eager PyTorch.

- start: the one-time export (an empty cache), opening the cached export, and an engine's whole start with and
  without it;
- one denoising step: the U-Net at the model's default size with CFG (batch 2), eager vs onnx at 1 and 2 threads
  (medians, measured in turns);
- end to end: a whole text-to-image run through the app's task path (`pipelines.txt2img.generate`: 64x64, 20 steps,
  DPM++ 2M on the built-in model) eager vs onnx, both at the same thread count, and each at its best thread count;
- what differs: the U-Net output's largest difference, and the images' (largest difference in levels out of 255,
  share of pixels that differ) over several seeds; whether a seed gives the same bytes again within each backend.

    python -m benchmarks.fast_path [--model FOLDER] [--repeats N] [--quick]

Every engine here reads its export from a private temporary cache, so the export is measured from cold each run.
"""
from __future__ import annotations

import time

import numpy as np

from benchmarks.common import (
    PROMPTS,
    Options,
    Row,
    cores,
    empty_onnx_cache,
    environment,
    interleaved_medians,
    model_folder,
    preset_for,
    standalone,
)

PART = "8 fast path"
BACKENDS = ("eager", "onnx")


APP_DEFAULT = "default"  # engines_by_backend's key for an onnx engine at the app's own thread counts


def engines_by_backend(folder: str, thread_counts: list[int], *, app_default: bool = False) -> tuple[dict, dict]:
    """{(backend, threads): Engine} and {(backend, threads): seconds its start took}; the first onnx engine exports
    into an empty cache, the later ones load that export. With `app_default`, also ("onnx", APP_DEFAULT): the
    engine the app builds when no thread count is given (its U-Net threads and its decode's differ)."""
    from pipelines.engine import Engine

    configs = [(backend, threads) for threads in thread_counts for backend in BACKENDS]
    configs += [("onnx", APP_DEFAULT)] if app_default else []
    engines, starts = {}, {}
    with environment(LDS_ONNX_CACHE=empty_onnx_cache()):
        for backend, threads in configs:
            started = time.perf_counter()
            engines[backend, threads] = Engine(preset_for(folder), device="cpu", backend=backend,
                                               threads=None if threads == APP_DEFAULT else threads)
            starts[backend, threads] = time.perf_counter() - started
    return engines, starts


def _unet(engine):
    return engine.fast_unet if engine.backend == "onnx" else engine.base.unet


def _step_rows(engines: dict, thread_counts: list[int], opts: Options) -> list[Row]:
    import torch

    from benchmarks.latency import unet_inputs
    from pipelines.compute import model_thread

    any_engine = next(iter(engines.values()))
    args = unet_inputs(any_engine)

    def step(engine):
        def call():
            with torch.inference_mode():
                engine.compute.run(_unet(engine), *args)  # inline on the model thread, at the engine's threads
        return call

    repeats = max(5, opts.repeats * 3)
    # All on the model thread: the app's one OpenMP pool (pipelines/compute.py); in turns, so load drifts hit both
    times = model_thread().run(interleaved_medians, {key: step(engine) for key, engine in engines.items()},
                               repeats=repeats, warmup=3)
    with torch.inference_mode():
        eager_out = engines["eager", thread_counts[0]].base.unet(*args).sample
        onnx_out = engines["onnx", thread_counts[0]].fast_unet(*args).sample
    latent = tuple(args[0].shape)
    rows = []
    for threads in thread_counts:
        eager_s, onnx_s = times["eager", threads], times["onnx", threads]
        rows.append(Row(PART, f"U-Net step {latent}: onnx vs eager, {threads} thread(s) (time ratio)",
                        onnx_s / eager_s,
                        detail=f"{onnx_s * 1e3:.1f} ms vs {eager_s * 1e3:.1f} ms, median of {repeats}"))
    rows.append(Row(PART, "U-Net output: onnx vs eager, largest difference", float((onnx_out - eager_out).abs().max()),
                    unit="abs", detail=f"output std {float(eager_out.std()):.3f}; same inputs, one call"))
    return rows


def _txt2img_rows(engines: dict, thread_counts: list[int], opts: Options) -> list[Row]:
    from pipelines import txt2img

    any_engine = next(iter(engines.values()))
    preset = any_engine.preset
    settings = dict(prompt=PROMPTS[0], seed=7, steps=opts.steps, guidance=preset.default_guidance,
                    scheduler=preset.default_scheduler)
    outputs: dict = {key: set() for key in engines}

    def run(key):
        def call():
            outputs[key].add(txt2img.generate(engines[key], **settings).images[0].tobytes())
        return call

    times = interleaved_medians({key: run(key) for key in engines}, repeats=opts.repeats, warmup=1)
    size = preset.default_size
    what = f"txt2img {size}x{size}, {opts.steps} steps, {preset.default_scheduler}"
    rows = []
    for threads in thread_counts:
        eager_s, onnx_s = times["eager", threads], times["onnx", threads]
        rows.append(Row(PART, f"{what}: onnx vs eager, {threads} thread(s) (time ratio)", onnx_s / eager_s,
                        detail=f"{onnx_s:.3f} s vs {eager_s:.3f} s, median of {opts.repeats} "
                               f"(the app's task path, no HTTP)"))
    best = {b: min(thread_counts, key=lambda n, b=b: times[b, n]) for b in BACKENDS}
    eager_s, onnx_s = times["eager", best["eager"]], times["onnx", best["onnx"]]
    rows.append(Row(PART, f"{what}: onnx at its best vs eager at its best (time ratio)", onnx_s / eager_s,
                    detail=f"onnx {onnx_s:.3f} s at {best['onnx']} thread(s) vs eager {eager_s:.3f} s at "
                           f"{best['eager']} thread(s)"))
    stable = ", ".join(f"{b} {n} thread(s) {'yes' if len(outputs[b, n]) == 1 else 'NO'}" for b, n in engines)
    same_across = all(outputs["onnx", n] == outputs["onnx", thread_counts[0]] for n in thread_counts)
    rows.append(Row(PART, "same seed, same bytes on every repeat", float("nan"),
                    detail=f"{stable}; onnx bytes equal across thread counts: {'yes' if same_across else 'no'}"))
    return rows


def _difference_rows(engines: dict, thread_counts: list[int], opts: Options) -> list[Row]:
    """The images eager and onnx make from the same seeds (both at the first thread count)."""
    from pipelines import txt2img

    eager, onnx = engines["eager", thread_counts[0]], engines["onnx", thread_counts[0]]
    preset = eager.preset
    seeds = 2 if opts.quick else 16
    largest, differing, total, changed_images = 0, 0, 0, 0
    for seed in range(seeds):
        settings = dict(prompt=PROMPTS[seed % len(PROMPTS)], seed=seed, steps=opts.steps,
                        guidance=preset.default_guidance, scheduler=preset.default_scheduler)
        a = np.asarray(txt2img.generate(eager, **settings).images[0]).astype(int)
        b = np.asarray(txt2img.generate(onnx, **settings).images[0]).astype(int)
        diff = np.abs(a - b).max(axis=-1)  # per pixel, over its channels
        largest = max(largest, int(diff.max()))
        differing += int((diff > 0).sum())
        total += diff.size
        changed_images += bool(diff.any())
    return [Row(PART, f"images: onnx vs eager over {seeds} seeds, largest difference", largest, unit="levels",
                detail=f"{100 * differing / total:.2f}% of pixels differ (by 1 level or more); {changed_images} of "
                       f"{seeds} images not byte-identical; {opts.steps} steps")]


def run(opts: Options) -> list[Row]:
    folder, note = model_folder(opts)
    if note:
        opts.notes.append(note)
    thread_counts = [1, 2] if cores() >= 2 else [1]
    engines, starts = engines_by_backend(folder, thread_counts)
    first_onnx = engines["onnx", thread_counts[0]].fast_unet.info
    later_onnx = engines["onnx", thread_counts[-1]].fast_unet.info
    size_mb = first_onnx.path.stat().st_size / 2**20
    rows = [
        Row(PART, "onnx: one-time export of the U-Net (empty cache)", first_onnx.export_s or float("nan"), unit="s",
            detail=f"{size_mb:.1f} MB file; then the ONNX Runtime session opened in {first_onnx.load_s:.2f} s"),
        Row(PART, "onnx: opening the cached export (every later start)", later_onnx.load_s, unit="s",
            detail="export_s=None: loaded, not exported" if later_onnx.export_s is None else "exported again?!"),
        Row(PART, "engine start: onnx with a cached export vs eager (time ratio)",
            starts["onnx", thread_counts[-1]] / starts["eager", thread_counts[-1]],
            detail=f"{starts['onnx', thread_counts[-1]]:.2f} s vs {starts['eager', thread_counts[-1]]:.2f} s "
                   f"(the weights' hash and the session on top of loading the model)"),
    ]
    rows += _step_rows(engines, thread_counts, opts)
    rows += _txt2img_rows(engines, thread_counts, opts)
    rows += _difference_rows(engines, thread_counts, opts)
    if len(thread_counts) == 1:
        opts.notes.append(f"{PART}: this process may use 1 core, so only 1 thread was measured")
    return rows


if __name__ == "__main__":
    raise SystemExit(standalone(PART, run))
