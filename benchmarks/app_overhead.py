"""1. App overhead: the running app's /txt2img API (gradio_client, end to end: queue, worker thread, PNG with
metadata, file download) against a plain diffusers StableDiffusionPipeline call on the same weights, scheduler,
steps, guidance and seed. Both sides run in turns; the ratio is median(app) / median(diffusers).

    python -m benchmarks.app_overhead [--model FOLDER] [--threads N] [--repeats N] [--quick]
"""
from __future__ import annotations

import numpy as np

from benchmarks.common import Options, Row, build_engine, interleaved_medians, model_folder, standalone, start_app, txt2img_args

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


def run(opts: Options) -> list[Row]:
    import torch
    from PIL import Image

    folder, note = model_folder(opts)
    if note:
        opts.notes.append(note)
    engine = build_engine(folder)
    pipe = raw_pipeline(engine.preset.base, engine)
    args = txt2img_args(engine, seed=7, steps=opts.steps)
    server = start_app(engine)
    try:
        client = server.client()
        outputs: dict[str, object] = {}

        def app_call():
            result = client.predict(**args, api_name="/txt2img")
            outputs["app"] = result[1][0]["image"]

        def raw_call():
            with torch.inference_mode():
                outputs["raw"] = pipe(
                    args["prompt"], negative_prompt=None, num_inference_steps=args["steps"],
                    guidance_scale=args["guidance"], width=args["width"], height=args["height"],
                    generator=[torch.Generator("cpu").manual_seed(args["seed"])]).images[0]

        medians = interleaved_medians({"app": app_call, "raw": raw_call}, repeats=opts.repeats, warmup=2)
        with Image.open(outputs["app"]) as png:
            same = np.array_equal(np.asarray(png.convert("RGB")), np.asarray(outputs["raw"]))
    finally:
        server.close()
    return [Row(PART, f"API /txt2img vs diffusers call ({args['width']}x{args['height']}, {args['steps']} steps)",
                medians["app"] / medians["raw"], goal=GOAL,
                detail=f"app {medians['app']:.3f} s vs diffusers {medians['raw']:.3f} s, median of {opts.repeats}; "
                       f"images {'identical' if same else 'DIFFERENT'}")]


if __name__ == "__main__":
    raise SystemExit(standalone(PART, run))
