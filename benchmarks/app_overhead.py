"""1. App overhead: the running app's /txt2img API (gradio_client, end to end: queue, worker thread, PNG with
metadata, file download) against a plain diffusers StableDiffusionPipeline call on the same weights, scheduler,
steps, guidance and seed. All sides run in turns; the ratio is median(app) / median(diffusers).

More rows split the difference: the same API called over plain HTTP (gradio's REST route: POST, then the
SSE stream, then the PNG download; gradio_client itself polls its message queue every 50 ms), the app's own
task path without HTTP (demo.running.run_task: engine view, worker thread, previews, PNG files with
parameters), and gradio's floor: a gradio_client round trip of an event with the same outputs (preview,
gallery, params, status) that runs no model.

The diffusers side is loaded and called on the app's model thread (pipelines/compute.py), where the app runs
every model call: libgomp keeps one OpenMP pool per thread that has run a parallel op, and with more pool
threads than CPUs every op waits for a wake-up, so a diffusers call on another thread would slow both sides.

    python -m benchmarks.app_overhead [--model FOLDER] [--threads N] [--repeats N] [--quick]
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks.common import (
    Options,
    Row,
    build_engine,
    cores,
    interleaved_medians,
    model_folder,
    standalone,
    start_app,
    txt2img_args,
)

PART = "1 app overhead"
GOAL = "<= 1.03"


def raw_pipeline(folder: str, engine):
    """The same weights loaded the plain diffusers way, with the app's scheduler for this model."""
    import torch
    from diffusers import StableDiffusionPipeline

    from pipelines.engine import _dtype_kwarg
    from pipelines.schedulers import make_scheduler

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                   feature_extractor=None, use_safetensors=True,
                                                   **_dtype_kwarg(torch.float32))
    pipe.scheduler = make_scheduler(engine.preset.default_scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def http_caller(server, client, api_name: str, args: dict):
    """A function that calls `api_name` with `args` over plain HTTP (POST /gradio_api/call, SSE, file download)."""
    import httpx

    info = client.view_api(print_info=False, return_format="dict")
    names = [p["parameter_name"] for p in info["named_endpoints"][api_name]["parameters"]]
    payload = {"data": [args[name] for name in names]}
    http = httpx.Client(timeout=600)
    route = f"{server.url}/gradio_api/call{api_name}"

    def call():
        event_id = http.post(route, json=payload).raise_for_status().json()["event_id"]
        kind, data = None, None
        with http.stream("GET", f"{route}/{event_id}") as stream:
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    kind = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and kind == "error":
                    raise RuntimeError(f"{api_name} failed: {line[5:].strip()}")
                elif line.startswith("data:") and kind == "complete":
                    data = json.loads(line[5:])
        http.get(data[1][0]["image"]["url"]).raise_for_status()  # the PNG, as a client would fetch it
        return data

    return call


def gradio_floor(repeats: int, png: str) -> float:
    """Median seconds of a /txt2img-shaped round trip that runs no model (gradio queue, SSE, file download)."""
    import gradio as gr

    from benchmarks.common import LiveApp, free_port

    def fake(prompt: str):
        yield gr.skip(), gr.skip(), gr.skip(), "Waiting for the model…"
        yield png, [(png, "seed 7")], {"seed": 7}, "Done"

    with gr.Blocks() as blocks:
        prompt = gr.Textbox()
        outputs = [gr.Image(format="png"), gr.Gallery(format="png", type="filepath"), gr.JSON(), gr.Markdown()]
        gr.Button().click(fake, prompt, outputs, api_name="fake", concurrency_limit=1)
    blocks.queue()
    port = free_port()
    blocks.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                  allowed_paths=[str(Path(png).parent)])
    server = LiveApp(url=f"http://127.0.0.1:{port}", blocks=blocks, engine=None)
    try:
        client = server.client()
        return interleaved_medians({"floor": lambda: client.predict("x", api_name="/fake")}, repeats=repeats,
                                   warmup=2)["floor"]
    finally:
        server.close()


def run(opts: Options) -> list[Row]:
    import torch
    from PIL import Image

    from demo.running import run_task
    from demo.studio import Studio
    from pipelines import txt2img

    folder, note = model_folder(opts)
    if note:
        opts.notes.append(note)
    engine = build_engine(folder)
    # The diffusers side runs on the same OS thread as the app's model calls, with this run's --threads (all
    # cores by default: plain diffusers as anyone would call it); the app uses its own setting (engine.threads)
    plain, plain_threads = engine.compute.thread, opts.threads or cores()
    pipe = plain.run_threads(plain_threads, raw_pipeline, engine.preset.base, engine)
    args = txt2img_args(engine, seed=7, steps=opts.steps)
    server = start_app(engine)
    try:
        client = server.client()
        outputs: dict[str, object] = {}

        def app_call():
            result = client.predict(**args, api_name="/txt2img")
            outputs["app"] = result[1][0]["image"]

        def raw_on_model_thread():
            with torch.inference_mode():
                outputs["raw"] = pipe(
                    args["prompt"], negative_prompt=None, num_inference_steps=args["steps"],
                    guidance_scale=args["guidance"], width=args["width"], height=args["height"],
                    generator=[torch.Generator("cpu").manual_seed(args["seed"])]).images[0]

        def raw_call():
            plain.run_threads(plain_threads, raw_on_model_thread)

        studio = Studio()

        def task_call():  # what the txt2img event runs, minus gradio
            for _ in run_task(engine, studio, "txt2img", txt2img.generate, dict(args), request=None, progress=None):
                pass

        medians = interleaved_medians({"app": app_call, "raw": raw_call, "task": task_call,
                                       "http": http_caller(server, client, "/txt2img", args)},
                                      repeats=opts.repeats, warmup=2)
        with Image.open(outputs["app"]) as png:
            same = np.array_equal(np.asarray(png.convert("RGB")), np.asarray(outputs["raw"]))
        floor = gradio_floor(opts.repeats, outputs["app"])
    finally:
        server.close()
    size = f"{args['width']}x{args['height']}, {args['steps']} steps"
    return [
        Row(PART, f"API /txt2img vs diffusers call ({size})", medians["app"] / medians["raw"], goal=GOAL,
            detail=f"app {medians['app']:.3f} s ({engine.threads} thread(s)) vs diffusers {medians['raw']:.3f} s "
                   f"({plain_threads} thread(s)), median of {opts.repeats}; "
                   f"images {'identical' if same else 'DIFFERENT'}"),
        Row(PART, f"API /txt2img over plain HTTP (no gradio_client) vs diffusers call ({size})",
            medians["http"] / medians["raw"],
            detail=f"{medians['http']:.3f} s vs {medians['raw']:.3f} s (POST, SSE stream, PNG download)"),
        Row(PART, f"app task path without HTTP vs diffusers call ({size})", medians["task"] / medians["raw"],
            detail=f"{medians['task']:.3f} s vs {medians['raw']:.3f} s (engine view, worker thread, previews, PNGs)"),
        Row(PART, "gradio floor: same outputs, no model (share of the diffusers call)", floor / medians["raw"],
            detail=f"{floor:.3f} s per round trip (queue, SSE, file download) vs {medians['raw']:.3f} s"),
    ]


if __name__ == "__main__":
    raise SystemExit(standalone(PART, run))
