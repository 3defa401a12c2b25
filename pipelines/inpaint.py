"""Inpainting: denoise only inside a mask, then put every unmasked input pixel back unchanged.

A 4-channel U-Net inpaints by latent blending (outside the mask, each step's latents are replaced by the
input's latents noised to that step); a 9-channel inpainting U-Net also sees the mask and the masked image.
Either way the final image is composited with the input, so unmasked pixels are byte-identical.
"""
from __future__ import annotations

from PIL import Image

from pipelines import preprocess
from pipelines.common import GenerationResult, InputError, check_float
from pipelines.request import Request, base_params, check_settings, working_size
from pipelines.run import run_pipeline
from pipelines.settings import DEFAULT_MASK_BLUR

MAX_MASK_BLUR = 64  # pixels; more feathers away the whole edit on small images
NINE_CHANNEL, LATENT_BLENDING = "9-channel", "latent blending"  # params["inpaint_unet"]: how the mask was applied
LATENT_BLENDING_NOTE = (
    "{model} has no inpainting U-Net, so the mask was applied by latent blending: the U-Net never sees the pixels "
    "around the hole and the mask acts on {f}x{f}-pixel latent cells, so a new object may land outside the mask "
    "(saying where in the prompt helps) and the mask's edge may show.")


def inpaint(engine, *, image, mask, prompt: str, negative_prompt: str = "", seed: int, steps: int,
            guidance: float, scheduler: str | None = None, strength: float = 1.0, mask_blur: float = DEFAULT_MASK_BLUR,
            batch_size: int = 1, on_step=None, cancel=None) -> GenerationResult:
    # 1. Check inputs
    settings = check_settings(engine, prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps,
                              guidance=guidance, scheduler=scheduler, batch_size=batch_size)
    strength = check_float("strength", strength, 0.01, 1.0)
    mask_blur = check_float("mask_blur", mask_blur, 0.0, MAX_MASK_BLUR)
    check_denoising_steps(settings["steps"], strength)
    original = preprocess.load_image(image, max_pixels=engine.limits.max_image_pixels)
    binary = preprocess.load_mask(mask, original.size)  # (H, W) 0 keep / 255 repaint
    if binary.getextrema()[1] == 0:
        raise InputError("the mask is empty: paint over the area to change")

    # 2. Run the model at a size it supports; map back to the input size afterwards
    images, request, kind = run_inpaint(engine, original, binary, settings=settings, strength=strength,
                                        on_step=on_step, cancel=cancel)

    # 3. Composite: generated pixels only inside the (feathered) mask, the input everywhere else, after the
    # generated picture's colours are matched to the input's along the mask's edge
    soft = preprocess.feather(binary, mask_blur)
    images = [preprocess.composite(original, preprocess.match_edges(original, generated, binary), soft)
              for generated in images]
    params = {**base_params(engine, "inpaint", request), "strength": strength, "mask_blur": mask_blur,
              "inpaint_unet": kind, "image_size": list(original.size)}
    return GenerationResult(images=images, params=with_method_notes(engine, kind, params), previews=[binary])


def check_denoising_steps(steps: int, strength: float) -> None:
    """Partial denoising runs int(steps * strength) steps; zero would return the input untouched."""
    if int(steps * strength) < 1:
        raise InputError(f"steps={steps} with strength={strength:g} leaves no denoising step; "
                         f"raise steps to at least {int(1 / strength) + 1} or strength")


def run_inpaint(engine, canvas: Image.Image, binary: Image.Image, *, settings: dict, strength: float,
                picture_size: tuple[int, int] | None = None, on_step=None,
                cancel=None) -> tuple[list[Image.Image], Request, str]:
    """Shared by inpaint and outpaint: (canvas, binary mask) at any size -> (generated images at canvas size,
    the request that made them, how the mask was applied). `picture_size`: the user's picture inside the canvas
    (outpainting), which sets the working scale (request.working_size)."""
    width, height = working_size(engine, canvas.size, picture_size)
    work_image = canvas.resize((width, height), Image.LANCZOS) if canvas.size != (width, height) else canvas
    # NEAREST then re-binarise: a resized mask must stay 0/255, the pipeline thresholds at 0.5 anyway.
    work_mask = binary.resize((width, height), Image.NEAREST) if binary.size != (width, height) else binary
    request = Request("inpaint", settings, width, height,
                      inputs=dict(image=work_image, mask_image=work_mask, strength=strength))
    with engine.lock:
        kind = NINE_CHANNEL if engine.task_unet("inpaint").config.in_channels == 9 else LATENT_BLENDING
        images = run_pipeline(engine, request, on_step=on_step, cancel=cancel)
    images = [im.resize(canvas.size, Image.LANCZOS) if im.size != canvas.size else im for im in images]
    return images, request, kind


def with_method_notes(engine, kind: str, params: dict) -> dict:
    """`params` with a warning that the mask was applied by latent blending, when it was: the tabs show it."""
    if kind != LATENT_BLENDING:
        return params
    note = LATENT_BLENDING_NOTE.format(model=engine.preset.name, f=engine.vae_scale_factor)
    return {**params, "warnings": [*params.get("warnings", []), note]}
