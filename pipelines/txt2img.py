"""Text to image: random latents z_T -> guided denoising -> VAE decode."""
from __future__ import annotations

from PIL import Image

from pipelines.batching import Waiting
from pipelines.common import GenerationResult
from pipelines.request import Request, base_params, check_settings, check_size
from pipelines.run import run_pipeline


def generate(engine, *, prompt: str, negative_prompt: str = "", seed: int, steps: int, guidance: float,
             scheduler: str | None = None, width: int | None = None, height: int | None = None,
             batch_size: int = 1, on_step=None, cancel=None) -> GenerationResult:
    # 1. Check inputs (before taking the lock: a bad request never waits in line)
    request = txt2img_request(engine, prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps,
                              guidance=guidance, scheduler=scheduler, width=width, height=height,
                              batch_size=batch_size)
    # 2. Denoise from z_T ~ N(0, I), one generator per image: (B, 4, H/f, W/f) -> B images
    if request.task == "txt2img":
        # Wait for the engine; requests with the same settings waiting alongside run in the same call
        images = engine.batcher.run(Waiting(request, on_step=on_step, cancel=cancel))
    else:
        with engine.lock:
            images = run_pipeline(engine, request, on_step=on_step, cancel=cancel)
    return GenerationResult(images=images, params=base_params(engine, "txt2img", request))


def runs_as_inpainting(engine) -> bool:
    """A dedicated inpainting U-Net (9 input channels) has no plain text-to-image mode: text to image is then
    inpainting everything on a blank canvas."""
    return engine.unet_in_channels == 9


def txt2img_request(engine, *, prompt, negative_prompt="", seed, steps, guidance, scheduler=None, width=None,
                    height=None, batch_size=1) -> Request:
    """The checked Request of a text-to-image run (size default: the model's own)."""
    settings = check_settings(engine, prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps,
                              guidance=guidance, scheduler=scheduler, batch_size=batch_size)
    width, height = check_size(engine, width or engine.preset.default_size, height or engine.preset.default_size)
    if not runs_as_inpainting(engine):
        return Request("txt2img", settings, width, height)
    return Request("inpaint", settings, width, height, inputs=dict(
        image=Image.new("RGB", (width, height), "white"), mask_image=Image.new("L", (width, height), 255),
        strength=1.0))
