"""ControlNet: a control map (edges, depth, pose) steers generation through a trainable copy of the U-Net
encoder whose outputs are added to the U-Net's skip connections. One or two ControlNets at once."""
from __future__ import annotations

from typing import Any, Sequence

from PIL import Image

from pipelines import preprocess as prep
from pipelines.common import GenerationResult, InputError, check_choice, check_float
from pipelines.registry import CONTROL_TYPES, NO_PREPROCESSOR, PREPROCESSORS
from pipelines.request import Request, base_params, check_settings, check_size, working_size
from pipelines.run import run_pipeline

MAX_CONTROLS = 2
MAX_CONDITIONING_SCALE = 2.0


def preprocess(engine, *, image, control_type: str, preprocessor: str | None = None,
                     low_threshold: int = 100, high_threshold: int = 200) -> Image.Image:
    """Image -> control map at the model's working size (the detector for `preprocessor`, default = control_type)."""
    check_choice("control_type", control_type, CONTROL_TYPES)
    preprocessor = check_choice("preprocessor", preprocessor or control_type, PREPROCESSORS)
    original = prep.load_image(image, max_pixels=engine.limits.max_image_pixels)
    width, height = working_size(engine, original.size)
    work = original.resize((width, height), Image.LANCZOS) if original.size != (width, height) else original
    if preprocessor == NO_PREPROCESSOR:
        return work
    if preprocessor == "canny":
        return prep.canny(work, low_threshold=low_threshold, high_threshold=high_threshold)
    with engine.lock:  # learned annotators are models too
        result = engine.annotator(preprocessor)(work)
    return result if result.size == work.size else result.resize(work.size, Image.BILINEAR)


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def generate(engine, *, control_images, control_types, prompt: str, negative_prompt: str = "", seed: int,
             steps: int, guidance: float, scheduler: str | None = None,
             conditioning_scales: float | Sequence[float] = 1.0, guidance_start: float = 0.0,
             guidance_end: float = 1.0, width: int | None = None, height: int | None = None, batch_size: int = 1,
             on_step=None, cancel=None) -> GenerationResult:
    # 1. Check inputs: one or two (control type, control map, scale) triples
    settings = check_settings(engine, prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps,
                              guidance=guidance, scheduler=scheduler, batch_size=batch_size)
    types = tuple(_as_list(control_types))
    images = _as_list(control_images)
    scales = _as_list(conditioning_scales)
    if not 1 <= len(types) <= MAX_CONTROLS:
        raise InputError(f"control_types has {len(types)} entries; use 1 to {MAX_CONTROLS}")
    if len(set(types)) != len(types):
        raise InputError(f"control_types={types!r} repeats a type")
    for t in types:
        engine.check_control_type(t)
    if len(images) != len(types) or any(im is None for im in images):
        raise InputError(
            f"{len(types)} control type(s) need {len(types)} control image(s), "
            f"got {sum(im is not None for im in images)}"
        )
    if len(scales) == 1:
        scales = scales * len(types)
    if len(scales) != len(types):
        raise InputError(f"conditioning_scales has {len(scales)} values for {len(types)} control types")
    scales = [check_float("conditioning_scale", s, 0.0, MAX_CONDITIONING_SCALE) for s in scales]
    start = check_float("guidance_start", guidance_start, 0.0, 1.0)
    end = check_float("guidance_end", guidance_end, 0.0, 1.0)
    if start >= end:
        raise InputError(f"guidance_start={start:g} must be below guidance_end={end:g}")
    maps = [prep.load_image(im, max_pixels=engine.limits.max_image_pixels) for im in images]

    # 2. Output size: given, else the first control map's working size; every map is resized to it
    if width is None or height is None:
        width, height = working_size(engine, maps[0].size)
    width, height = check_size(engine, width, height)
    maps = [m if m.size == (width, height) else m.resize((width, height), Image.BILINEAR) for m in maps]

    # 3. Denoise with the ControlNet residuals added to the U-Net's skips between start and end
    single = len(types) == 1
    request = Request("controlnet", settings, width, height, controls=types, inputs=dict(
        image=maps[0] if single else maps,
        controlnet_conditioning_scale=scales[0] if single else scales,
        control_guidance_start=start if single else [start] * len(types),
        control_guidance_end=end if single else [end] * len(types)))
    with engine.lock:
        out = run_pipeline(engine, request, on_step=on_step, cancel=cancel)
    params = {**base_params(engine, "controlnet", request), "control_types": list(types),
              "conditioning_scales": scales, "guidance_start": start, "guidance_end": end}
    return GenerationResult(images=out, params=params, previews=maps)
