"""Text to image: random latents z_T -> guided denoising -> VAE decode."""
from __future__ import annotations

from typing import Any

from PIL import Image

from pipelines.batching import Request
from pipelines.common import GenerationResult
from pipelines.run import base_params, check_common, check_size, generators, run_pipeline


def generate(engine, *, prompt: str, negative_prompt: str = "", seed: int, steps: int, guidance: float,
             scheduler: str | None = None, width: int | None = None, height: int | None = None,
             batch_size: int = 1, on_step=None, cancel=None) -> GenerationResult:
    # 1. Check inputs (before taking the lock: a bad request never waits in line)
    common, width, height = check_inputs(engine, prompt=prompt, negative_prompt=negative_prompt, seed=seed,
                                         steps=steps, guidance=guidance, scheduler=scheduler, width=width,
                                         height=height, batch_size=batch_size)
    params = base_params(engine, "txt2img", common, width, height)

    if engine.unet_in_channels == 9:
        with engine.lock:
            # 2. Request-scoped pipeline view (inpaint over a full mask: a 9-channel U-Net has no txt2img mode)
            view, call_kwargs = request_view(engine, common, width, height)
            # 3. Denoise from z_T ~ N(0, I), one generator per image: (B, 4, H/f, W/f) -> B images
            images = run_pipeline(engine, view, on_step=on_step, cancel=cancel, **call_kwargs)
    else:
        # 2. Wait for the engine; requests with the same settings waiting alongside run in the same call
        # 3. Denoise from z_T ~ N(0, I), one generator per image: (B, 4, H/f, W/f) -> B images
        images = engine.batcher.run(Request(
            scheduler=common["scheduler"],
            shared=dict(num_inference_steps=common["steps"], guidance_scale=common["guidance"],
                        width=width, height=height),
            prompt=common["prompt"], negative_prompt=common["negative_prompt"], seed=common["seed"],
            count=common["batch_size"], on_step=on_step, cancel=cancel,
            adapters=engine.adapters.active_for(common["prompt"]),
        ))
    return GenerationResult(images=images, params=params)


def check_inputs(engine, *, prompt, negative_prompt="", seed, steps, guidance, scheduler=None, width=None,
                 height=None, batch_size=1) -> tuple[dict[str, Any], int, int]:
    """The validated settings of a text-to-image run: (common settings, width, height)."""
    common = check_common(engine, prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps,
                          guidance=guidance, scheduler=scheduler, batch_size=batch_size)
    width, height = check_size(engine, width or engine.preset.default_size, height or engine.preset.default_size)
    return common, width, height


def request_view(engine, common: dict[str, Any], width: int, height: int) -> tuple[Any, dict[str, Any]]:
    """(request-scoped pipeline view, its call arguments) for checked settings; the caller holds engine.lock."""
    if engine.unet_in_channels == 9:
        # A dedicated inpainting U-Net has no plain text-to-image mode: inpaint everything on a blank canvas.
        view = engine.pipeline("inpaint", scheduler=common["scheduler"])
        extra = dict(image=Image.new("RGB", (width, height), "white"),
                     mask_image=Image.new("L", (width, height), 255), strength=1.0)
    else:
        view = engine.pipeline("txt2img", scheduler=common["scheduler"])
        extra = {}
    return view, dict(
        prompt=common["prompt"], negative_prompt=common["negative_prompt"] or None,
        num_inference_steps=common["steps"], guidance_scale=common["guidance"],
        width=width, height=height, num_images_per_prompt=common["batch_size"],
        generator=generators(common["seed"], common["batch_size"]), **extra,
    )
