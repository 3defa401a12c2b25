"""One request to the model, decided once: the checked settings, the task pipeline and scheduler, the
adapters, the generators and the diffusers arguments.

Every task checks its settings with `check_settings` (first, and before taking engine.lock, so a bad request
never waits in line), then its own values, then builds one `Request` and hands it to `run.run_pipeline`
under the lock, which resolves its adapters there, once. The batcher merges several txt2img requests into
one call (`merged_kwargs`). So the walk from a tab to the U-Net reads: tab -> task function -> Request ->
run_pipeline -> diffusers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from pipelines import preprocess
from pipelines.common import InputError, check_float, check_int, check_text

# img2img pipelines take the size from their input image and have no width/height arguments
SIZE_FROM_IMAGE = ("img2img", "controlnet_img2img")
# A model asked for a height it never drew a whole scene at (ModelPreset.scene_heights): the README has its figures
SIZE_NOTE = ("{model} draws scenes {tall} px tall; at {height} px tall it often draws the horizon twice, stretches "
             "the scene or adds stray objects")


@dataclass(eq=False)
class Request:
    """What one model call needs; `settings` are what the user asked for, the rest how the model is asked."""

    task: str  # the engine's task pipeline: txt2img, img2img, inpaint, controlnet, controlnet_img2img
    settings: dict[str, Any]  # checked: prompt, negative_prompt, seed, steps, guidance, scheduler, batch_size
    width: int
    height: int
    model_prompt: str | None = None  # what the model reads, when not settings["prompt"] (a style adds words)
    controls: tuple[str, ...] = ()  # ControlNet types of a controlnet task
    inputs: dict[str, Any] = field(default_factory=dict)  # the task's own diffusers arguments (image, mask, ...)
    adapters: tuple[str, ...] | None = None  # adapters the prompt switches on; set under engine.lock (run_pipeline)

    @property
    def prompt(self) -> str:
        return self.settings["prompt"] if self.model_prompt is None else self.model_prompt

    @property
    def scheduler(self) -> str:
        return self.settings["scheduler"]

    @property
    def seed(self) -> int:
        return self.settings["seed"]

    @property
    def count(self) -> int:
        """Images this request makes (batch_size); image i uses seed + i."""
        return self.settings["batch_size"]

    def shared_kwargs(self) -> dict[str, Any]:
        """The diffusers arguments that requests must have in common to share one call."""
        size = {} if self.task in SIZE_FROM_IMAGE else {"width": self.width, "height": self.height}
        return dict(num_inference_steps=self.settings["steps"], guidance_scale=self.settings["guidance"], **size)

    def call_kwargs(self) -> dict[str, Any]:
        """The diffusers arguments of this request alone."""
        return dict(prompt=self.prompt, negative_prompt=self.settings["negative_prompt"] or None,
                    num_images_per_prompt=self.count, generator=generators(self.seed, self.count),
                    **self.shared_kwargs(), **self.inputs)

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys can run as one call (txt2img only; adapters must be resolved)."""
        return (self.task, self.scheduler, tuple(sorted(self.shared_kwargs().items())), self.adapters)


def merged_kwargs(requests: list[Request]) -> dict[str, Any]:
    """The diffusers arguments of one call that makes every image of `requests` (equal batch keys, no inputs)."""
    return dict(
        prompt=[r.prompt for r in requests for _ in range(r.count)],
        negative_prompt=[r.settings["negative_prompt"] for r in requests for _ in range(r.count)],  # "" = None
        num_images_per_prompt=1,
        generator=[g for r in requests for g in generators(r.seed, r.count)],
        **requests[0].shared_kwargs())


def check_settings(engine, *, prompt, negative_prompt, seed, steps, guidance, scheduler, batch_size) -> dict[str, Any]:
    """Validate the settings every task shares; returns them cleaned (ints as ints, text as str)."""
    limits = engine.limits
    return dict(
        prompt=check_text("prompt", prompt, limits.max_prompt_chars),
        negative_prompt=check_text("negative_prompt", negative_prompt, limits.max_prompt_chars),
        seed=check_int("seed", seed, 0, limits.max_seed),
        steps=check_int("steps", steps, 1, limits.max_steps),
        guidance=check_float("guidance", guidance, 0.0, limits.max_guidance),
        scheduler=engine.check_scheduler(scheduler),
        batch_size=check_int("batch_size", batch_size, 1, limits.max_batch),
    )


def check_size(engine, width, height) -> tuple[int, int]:
    """Width and height within the model's limit and multiples of 8 (the VAE and U-Net need whole latents)."""
    limit = engine.limits.max_size
    width = check_int("width", width, 8, limit)
    height = check_int("height", height, 8, limit)
    for name, value in (("width", width), ("height", height)):
        if value % 8:
            raise InputError(f"{name}={value} is not a multiple of 8 (try {value - value % 8 or 8})")
    return width, height


def working_size(engine, size: tuple[int, int], picture_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """The size the model runs at for an image task's canvas of `size`: scaled so the user's picture (the whole
    canvas, or the original inside an outpainting canvas: `picture_size`) is at most the preset's `picture_height`
    tall, the scale the model knows; then long side within [default_size, max_size], in whole latents. The height,
    not the long side: the built-in model's scenes are that tall, with the horizon at a share of the height, and a
    wider canvas only goes on sideways; a wide picture brought there by its long side would be shorter than any
    scene the model saw (training.evaluate_inpaint --picture-sizes measures both)."""
    limit = engine.preset.picture_height
    scale = min(1.0, limit / (picture_size or size)[1]) if limit else 1.0
    target = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
    return preprocess.working_size(target, engine.limits.max_size, min_size=engine.preset.default_size)


def generators(seed: int, count: int) -> list[torch.Generator]:
    """One CPU generator per image, seeded seed + i, so image i can be regenerated alone with seed + i.

    CPU generators give the same noise on every device, so a seed means the same image on CPU and GPU
    (up to kernel differences).
    """
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(count)]


def base_params(engine, task: str, request: Request) -> dict[str, Any]:
    """The params every result carries (written into its PNGs): enough to make the same images again, and the
    "warnings" the tabs show under it."""
    params = {"task": task, "model": engine.preset.name, **request.settings, "width": request.width,
              "height": request.height}
    if request.adapters:
        params["adapters"] = list(request.adapters)  # which fine-tunes made the image: needed to make it again
    tall = engine.preset.picture_height
    low, high = engine.preset.scene_heights or (tall, tall)
    if tall and not low <= request.height <= high:
        heights = f"{low}-{high}" if low != high else f"{low}"
        params["warnings"] = [SIZE_NOTE.format(model=engine.preset.name, tall=heights, height=request.height)]
    return params
