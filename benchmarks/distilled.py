"""10. The fast path: the distilled built-in model (`shapes-lcm`, 4 LCM steps, no CFG pass) on the ONNX backend,
against plain diffusers running the built-in model at its defaults (20 DPM-Solver++ steps with CFG).

- task path: the app's `pipelines.txt2img.generate` without HTTP, per image (64x64), at 1 and 2 threads and at the
  app's default counts (U-Net on all cores but one, the decode on all: pipelines/compute.py), beside the plain
  diffusers call at the most threads the fast side uses, and each side at its best thread count; and the same task
  path on the eager backend, which splits the gain between distillation and ONNX Runtime;
- end to end: the running app's /txt2img through gradio_client (the app started on the distilled model with the
  ONNX backend, as `python app.py --model shapes-lcm --backend onnx` does), next to gradio's floor (the same round
  trip running no model, benchmark part 1);
- the decoder: one image's decode on the int8 ONNX decoder (a preset's `int8_decoder`) beside the float one, and
  the int8 decode's PSNR on held-out scenes;
- Live mode in Chromium on the same engine (part 9's measurement), and the cold start.

    python -m benchmarks.distilled [--lcm FOLDER] [--repeats N] [--quick]

The distilled model is `assets/models/shapes-lcm`; while it does not exist, the trainer's latest export
runs/lcm/pipeline is measured and the table says so. Its prompt following is scored by training/evaluate_lcm.py,
not here.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

from benchmarks import live_mode
from benchmarks.common import (
    PROMPT,
    REPO,
    Options,
    Row,
    _private_copy,
    cores,
    empty_onnx_cache,
    environment,
    interleaved_medians,
    model_folder,
    preset_for,
    print_table,
    quiet_libraries,
    set_threads,
    start_app,
    txt2img_args,
)
from benchmarks.fast_path import APP_DEFAULT, engines_by_backend

PART = "10 distilled fast path"
LCM_MODEL = REPO / "assets" / "models" / "shapes-lcm"
LCM_EXPORT = REPO / "runs" / "lcm" / "pipeline"  # train_lcm's latest export (until the model ships)
TASK_GOAL_S = 0.050  # issue goal: <= 50 ms per image on the task path, and >= 9x plain diffusers at 20 steps
SPEEDUP_GOAL = 9.0
END_TO_END_GOAL_S = 0.25
LIVE_GOAL_S = 0.3  # issue goal: the final prompt's image shown <= 0.3 s after the last keystroke


def lcm_folder(path: str | None, notes: list[str]) -> str:
    """A private copy of the distilled model folder (see common.model_folder for why a copy)."""
    if path:
        source = Path(path)
    elif (LCM_MODEL / "model_index.json").is_file():
        source = LCM_MODEL
    elif (LCM_EXPORT / "model_index.json").is_file():
        source = LCM_EXPORT
        from training.common import folder_step

        step = folder_step(source)
        notes.append(f"{PART}: {LCM_MODEL.relative_to(REPO)} does not exist yet: measured the trainer's export "
                     f"runs/lcm/pipeline (training step {step})")
    else:
        raise SystemExit(f"no distilled model: neither {LCM_MODEL} nor {LCM_EXPORT} exists "
                         "(python -m training.train_lcm)")
    if not (source / "model_index.json").is_file():
        raise SystemExit(f"--lcm {source}: not a diffusers pipeline folder (no model_index.json)")
    return _private_copy(source)


def _plain(base_folder: str, threads: int, steps: int):
    """A function making one image the plain diffusers way: the built-in model at its preset's defaults (scheduler,
    guidance, 20 steps), on the app's model thread (see benchmarks/app_overhead.py) at `threads` threads."""
    import torch

    from benchmarks.app_overhead import raw_pipeline
    from pipelines.compute import model_thread

    preset = preset_for(base_folder)
    thread = model_thread()
    pipe = thread.run_threads(threads, raw_pipeline, base_folder, SimpleNamespace(preset=preset))  # its scheduler

    def once():
        with torch.inference_mode():
            pipe(PROMPT, num_inference_steps=steps, guidance_scale=preset.default_guidance,
                 width=preset.default_size, height=preset.default_size,
                 generator=[torch.Generator("cpu").manual_seed(7)])

    return lambda: thread.run_threads(threads, once)


def _widest(engine) -> int:
    """The most threads an engine's model work uses (its U-Net's or its decode's)."""
    return max(engine.threads, engine.decode_threads)


def _threads_label(engine) -> str:
    if engine.decode_threads == engine.threads:
        return f"{engine.threads} thread(s)"
    return f"{engine.threads} thread(s), decode {engine.decode_threads}"


def run(opts: Options, lcm: str | None = None) -> list[Row]:
    from pipelines import txt2img

    base_folder, note = model_folder(opts)
    if note:
        opts.notes.append(note)
    folder = lcm_folder(lcm, opts.notes)
    thread_counts = [1, 2] if cores() >= 2 else [1]
    # onnx and eager at each count, and onnx at the app's default counts; a cold export cache
    engines, _ = engines_by_backend(folder, thread_counts, app_default=True)
    any_engine = engines["onnx", thread_counts[0]]
    preset = any_engine.preset
    steps = 2 if opts.quick else preset.default_steps
    settings = dict(prompt=PROMPT, seed=7, steps=steps, guidance=preset.default_guidance,
                    scheduler=preset.default_scheduler)

    def task(engine):
        return lambda: txt2img.generate(engine, **settings)

    calls = {("task", backend, n): task(engine) for (backend, n), engine in engines.items()}
    plain_counts = sorted({*thread_counts, _widest(engines["onnx", APP_DEFAULT])})
    calls.update({("plain", "eager", n): _plain(base_folder, n, opts.steps) for n in plain_counts})
    repeats = max(5, opts.repeats * 3)  # each call is short: more repeats for a steady median
    times = interleaved_medians(calls, repeats=repeats, warmup=2)

    what = f"txt2img {preset.default_size}x{preset.default_size}"
    plain_what = f"plain diffusers, built-in model, {opts.steps} steps"
    rows = []
    # each fast configuration beside plain diffusers at the most threads it uses
    for n in [*thread_counts, APP_DEFAULT]:
        engine = engines["onnx", n]
        widest = _widest(engine)
        fast, plain = times["task", "onnx", n], times["plain", "eager", widest]
        label = _threads_label(engine) + (" (the app's default)" if n == APP_DEFAULT else "")
        rows.append(Row(PART, f"{what}: distilled {steps} steps on onnx vs {plain_what}, {label} (time ratio)",
                        fast / plain, detail=f"{fast * 1e3:.1f} ms vs {plain * 1e3:.1f} ms at {widest} thread(s), "
                                             f"median of {repeats} (the app's task path, no HTTP)"))
    best_fast = min([*thread_counts, APP_DEFAULT], key=lambda n: times["task", "onnx", n])
    best_plain = min(plain_counts, key=lambda n: times["plain", "eager", n])
    fast, plain = times["task", "onnx", best_fast], times["plain", "eager", best_plain]
    best_label = _threads_label(engines["onnx", best_fast])
    rows.append(Row(PART, f"{what}: the fast path per image, at its best thread count", fast, unit="s",
                    goal=f"<= {TASK_GOAL_S:g}", detail=f"{fast * 1e3:.1f} ms at {best_label}, median of {repeats}"))
    rows.append(Row(PART, f"{what}: the fast path's speed-up over {plain_what}, each at its best", plain / fast,
                    goal=f">= {SPEEDUP_GOAL:g}", detail=f"{plain * 1e3:.1f} ms plain at {best_plain} thread(s) vs "
                                                       f"{fast * 1e3:.1f} ms at {best_label}"))
    for n in thread_counts:
        onnx, eager = times["task", "onnx", n], times["task", "eager", n]
        rows.append(Row(PART, f"{what}: distilled {steps} steps, onnx vs eager backend, {n} thread(s) (time ratio)",
                        onnx / eager, detail=f"{onnx * 1e3:.1f} ms vs {eager * 1e3:.1f} ms"))
    rows += _decoder_rows(engines, thread_counts, repeats)
    rows += _end_to_end_rows(engines["onnx", best_fast], steps, opts)
    # Live mode on the same fast path, so every figure of the fast path comes from one run
    rows += live_mode.measure(engines["onnx", best_fast], opts, part=PART, goal=f"<= {LIVE_GOAL_S:g}")
    rows += _cold_start_rows("shapes-lcm" if Path(lcm or LCM_MODEL) == LCM_MODEL and LCM_MODEL.is_dir() else folder,
                             steps)
    return rows


def _decoder_rows(engines: dict, thread_counts: list[int], repeats: int) -> list[Row]:
    """One image's VAE decode on the fast path's ONNX decoder against the float ONNX decoder, when the preset
    decodes in int8 (`int8_decoder`): what the quantized convolutions save."""
    import torch

    from pipelines import fast_backend

    if not engines["onnx", thread_counts[0]].preset.int8_decoder:
        return []
    calls = {}
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cache = Path(empty_onnx_cache())  # the float decoder exported once, loaded at each thread count
    for n in thread_counts:
        engine = engines["onnx", n]
        full = fast_backend.build_decoder(engine.base.vae, threads=n, cache_dir=cache)
        for name, decoder in (("int8", engine.fast_vae), ("float", full)):
            calls[name, n] = lambda decoder=decoder: decoder.decode(latents)
    with torch.inference_mode():
        times = interleaved_medians(calls, repeats=repeats, warmup=2)
    rows = [Row(PART, f"VAE decode of one 64x64 image: int8 vs float ONNX decoder, {n} thread(s) (time ratio)",
                times["int8", n] / times["float", n],
                detail=f"{times['int8', n] * 1e3:.1f} ms vs {times['float', n] * 1e3:.1f} ms, median of {repeats}")
            for n in thread_counts]
    return rows + [_decoder_quality_row(engines["onnx", thread_counts[0]], full, scenes=32 if repeats <= 5 else 256)]


def _decoder_quality_row(engine, float_decoder, scenes: int) -> Row:
    """PSNR of the int8 decode from the float decode, and of each from the rendered scene, on held-out scenes of the
    built-in world (the base VAE's posterior means)."""
    import torch

    from training import shapes
    from training.common import HELD_OUT_SEED, images_to_tensor, tensor_to_images
    from training.train_vae import psnr

    truth, _ = shapes.batch(range(HELD_OUT_SEED, HELD_OUT_SEED + scenes))
    with torch.inference_mode():
        latents = engine.base.vae.encode(images_to_tensor(truth)).latent_dist.mean
        int8, full = [tensor_to_images(torch.cat([decoder.decode(z[None]).sample for z in latents]))
                      for decoder in (engine.fast_vae, float_decoder)]
    return Row(PART, f"int8 decode vs float decode, {scenes} held-out scenes (PSNR)", psnr(int8, full), unit="dB",
               detail=f"from the rendered scenes: int8 {psnr(int8, truth):.2f} dB, float {psnr(full, truth):.2f} dB")


def _cold_start_rows(model: str, steps: int) -> list[Row]:
    """A fresh python that imports the app, builds the engine with the ONNX backend and makes one image: first with
    an empty export cache (the one-time exports), then again with the cache it left."""
    from benchmarks.latency import cold_start

    with environment(LDS_BACKEND="onnx", LDS_ONNX_CACHE=empty_onnx_cache()):
        first = cold_start(model, steps, threads=1)
        later = cold_start(model, steps, threads=1)
    build = first[0] - later[0]
    return [
        Row(PART, "cold start: fresh python, import app, engine on onnx with the cached exports, one image", later[0],
            unit="s", goal="<= 10", detail=f"model {Path(model).name}; {later[1]} s inside the process"),
        Row(PART, "first start after install: the same, exporting first (U-Net, decoder, its int8 quantization)",
            first[0], unit="s", detail=f"the one-time build: {build:.1f} s more than a later start; {first[1]} s "
                                        f"inside the process"),
    ]


def _end_to_end_rows(engine, steps: int, opts: Options) -> list[Row]:
    from benchmarks.app_overhead import gradio_floor

    args = txt2img_args(engine, seed=7, steps=steps)
    server = start_app(engine)
    try:
        client = server.client()
        shown: dict[str, str] = {}

        def app_call():
            shown["png"] = client.predict(**args, api_name="/txt2img")[1][0]["image"]

        repeats = max(5, opts.repeats * 3)
        app_s = interleaved_medians({"app": app_call}, repeats=repeats, warmup=2)["app"]
        floor = gradio_floor(repeats, shown["png"])
    finally:
        server.close()
    return [
        Row(PART, f"API /txt2img end to end (gradio_client), distilled on onnx, {_threads_label(engine)}", app_s,
            unit="s", goal=f"<= {END_TO_END_GOAL_S:g}",
            detail=f"median of {repeats}; gradio's floor (same outputs, no model) {floor:.3f} s, so the model and "
                   f"the app's own work take {app_s - floor:.3f} s"),
    ]


def main(argv=None) -> int:
    from benchmarks.common import add_arguments, machine_line, options_from

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    parser.add_argument("--lcm", default=None, help="distilled model folder (default: assets/models/shapes-lcm)")
    args = parser.parse_args(argv)
    opts = options_from(args)
    quiet_libraries()
    threads = set_threads(opts)
    rows = run(opts, args.lcm)
    print_table(rows, opts.notes, title=f"{PART} ({machine_line(threads)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
