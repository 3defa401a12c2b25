"""Outpainting: inpainting on an enlarged canvas whose new border is pre-filled from the image's edges."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from pipelines import preprocess
from pipelines.common import GenerationResult, InputError, check_choice, check_float, check_int
from pipelines.inpaint import check_denoising_steps, run_inpaint, with_method_notes
from pipelines.request import base_params, check_settings
from pipelines.settings import OUTPAINT_FILLS

FILLS = OUTPAINT_FILLS
SIDE_MULTIPLE = 8  # new borders are whole latents at f = 8 (and f = 4)
# Pixels of the original inside the mask: the model draws across the old border, and the result fades from the
# original into the new area over this band (the original stays byte-identical further in).
OVERLAP = 8
NOISE_LEVEL = 24  # std of the "noise" fill in 0..255 levels: texture for latent blending to grow from


def outpaint(engine, *, image, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0, prompt: str,
             negative_prompt: str = "", seed: int, steps: int, guidance: float, scheduler: str | None = None,
             fill: str = "edge", strength: float = 1.0, batch_size: int = 1, on_step=None,
             cancel=None) -> GenerationResult:
    # 1. Check inputs; borders round up to multiples of 8
    settings = check_settings(engine, prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps,
                              guidance=guidance, scheduler=scheduler, batch_size=batch_size)
    limit = engine.limits.max_outpaint
    sides = {name: check_int(name, value, 0, limit) for name, value in
             (("left", left), ("right", right), ("top", top), ("bottom", bottom))}
    sides = {name: -(-value // SIDE_MULTIPLE) * SIDE_MULTIPLE for name, value in sides.items()}
    if not any(sides.values()):
        raise InputError("left, right, top and bottom are all 0: set at least one border to extend")
    fill = check_choice("fill", fill, FILLS)
    strength = check_float("strength", strength, 0.01, 1.0)
    check_denoising_steps(settings["steps"], strength)
    original = preprocess.load_image(image, max_pixels=engine.limits.max_image_pixels)

    # 2. Enlarged canvas, pre-filled: (H + top + bottom, W + left + right, 3)
    canvas = prefill(original, **sides, fill=fill, seed=settings["seed"])
    # 3. Mask: the new border plus OVERLAP pixels into the original on each extended side
    mask = np.full((canvas.height, canvas.width), 255, np.uint8)  # (H', W'): 255 = generate
    inner_left = sides["left"] + (OVERLAP if sides["left"] else 0)
    inner_top = sides["top"] + (OVERLAP if sides["top"] else 0)
    inner_right = sides["left"] + original.width - (OVERLAP if sides["right"] else 0)
    inner_bottom = sides["top"] + original.height - (OVERLAP if sides["bottom"] else 0)
    mask[max(inner_top, 0):max(inner_bottom, 0), max(inner_left, 0):max(inner_right, 0)] = 0
    binary = Image.fromarray(mask)

    # 4. Inpaint the canvas, then 5. fade from the original into the new area over the overlap band
    images, request, kind = run_inpaint(engine, canvas, binary, settings=settings, strength=strength,
                                        picture_size=original.size,
                                        on_step=on_step, cancel=cancel)
    soft = preprocess.feather(binary, OVERLAP)  # (H', W'): 0 on the original, 255 from the old border out
    images = [preprocess.composite(canvas, preprocess.match_edges(canvas, generated, binary), soft)
              for generated in images]
    params = {**base_params(engine, "outpaint", request), **sides, "fill": fill, "strength": strength,
              "inpaint_unet": kind, "image_size": list(original.size), "canvas_size": list(canvas.size)}
    return GenerationResult(images=images, params=with_method_notes(engine, kind, params), previews=[canvas, binary])


def prefill(image: Image.Image, *, left: int, right: int, top: int, bottom: int, fill: str, seed: int) -> Image.Image:
    """Canvas with `image` at (left, top) and the border filled: edge-stretch, + blur, + noise."""
    array = np.asarray(image)  # (H, W, 3)
    padded = np.pad(array, ((top, bottom), (left, right), (0, 0)), mode="edge")  # (H', W', 3) edges stretched
    canvas = Image.fromarray(padded)
    if fill in ("blur", "noise"):
        radius = max(4, max(left, right, top, bottom) // 4)
        blurred = np.asarray(canvas.filter(ImageFilter.GaussianBlur(radius))).astype(np.float32)
        if fill == "noise":
            rng = np.random.default_rng(seed)  # seeded: the same request gives the same canvas
            blurred = blurred + rng.normal(0, NOISE_LEVEL, blurred.shape)
        canvas = Image.fromarray(np.clip(blurred, 0, 255).round().astype(np.uint8))
    canvas.paste(image, (left, top))
    return canvas
