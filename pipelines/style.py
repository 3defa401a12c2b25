"""Style transfer: img2img with a style prompt (partial noising keeps the layout), or structure-preserving
img2img where a ControlNet holds the content image's edges or depth fixed."""
from __future__ import annotations

from PIL import Image

from pipelines import preprocess
from pipelines.common import GenerationResult, InputError, check_choice, check_float
from pipelines.inpaint import check_denoising_steps
from pipelines.request import Request, base_params, check_settings, working_size
from pipelines.run import run_pipeline

MODES = ("img2img", "structure")


def style_prompt(prompt: str, suffix: str) -> str:
    """"a red circle" + "in flat style" -> "a red circle in flat style"; descriptive suffixes get a comma."""
    prompt, suffix = prompt.strip(), suffix.strip()
    if not suffix:
        return prompt
    if not prompt:
        return suffix
    return f"{prompt} {suffix}" if suffix.startswith("in ") else f"{prompt}, {suffix}"


def stylize(engine, *, image, style: str = "", prompt: str = "", negative_prompt: str = "", seed: int, steps: int,
            guidance: float, scheduler: str | None = None, strength: float = 0.6, mode: str = "img2img",
            control: str = "canny", conditioning_scale: float = 1.0, batch_size: int = 1,
            on_step=None, cancel=None) -> GenerationResult:
    # 1. Check inputs
    settings = check_settings(engine, prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps,
                              guidance=guidance, scheduler=scheduler, batch_size=batch_size)
    style = style or ""
    if style and style not in engine.preset.style_presets:
        raise InputError(f"style={style!r} is not one of {', '.join(map(repr, engine.preset.style_presets))}")
    full_prompt = style_prompt(settings["prompt"], engine.preset.style_presets.get(style, ""))
    if not full_prompt:
        raise InputError("both style and prompt are empty: pick a style or describe one")
    strength = check_float("strength", strength, 0.01, 1.0)
    check_denoising_steps(settings["steps"], strength)
    mode = check_choice("mode", mode, MODES)
    conditioning_scale = check_float("conditioning_scale", conditioning_scale, 0.0, 2.0)
    if mode == "structure":
        control = check_choice("control", control, engine.control_types or ("(no ControlNet for this model)",))
    original = preprocess.load_image(image, max_pixels=engine.limits.max_image_pixels)

    # 2. Working size: the scale the model knows, within its range, multiples of 8
    width, height = working_size(engine, original.size)
    work = original.resize((width, height), Image.LANCZOS) if original.size != (width, height) else original
    previews: list[Image.Image] = []
    with engine.lock:
        # 3. Structure mode: the content image's control map holds the layout
        if mode == "structure":
            control_image = engine.annotator(control)(work)
            if control_image.size != (width, height):
                control_image = control_image.resize((width, height))
            previews.append(control_image)
            request = Request("controlnet_img2img", settings, width, height, model_prompt=full_prompt,
                              controls=(control,), inputs=dict(image=work, strength=strength,
                                                               control_image=control_image,
                                                               controlnet_conditioning_scale=conditioning_scale))
        else:
            request = Request("img2img", settings, width, height, model_prompt=full_prompt,
                              inputs=dict(image=work, strength=strength))
        # 4. Noise the content latents to `strength`, denoise towards the style prompt
        images = run_pipeline(engine, request, on_step=on_step, cancel=cancel)
    params = {**base_params(engine, "style", request), "style": style, "full_prompt": full_prompt,
              "strength": strength, "mode": mode}
    if mode == "structure":
        params.update(control=control, conditioning_scale=conditioning_scale)
    return GenerationResult(images=images, params=params, previews=previews)
