"""The safety checker of public deployments: diffusers' StableDiffusionSafetyChecker over every output image.

SD1.5-class models ship with it (the `safety_checker/` and `feature_extractor/` folders next to the U-Net);
the app loads it when it is public (a Space, a share link, a non-loopback host) or when asked
(`--safety-checker`, LDS_SAFETY_CHECKER). The built-in Shapes model draws coloured shapes and needs none.

A flagged image is never dropped: it is replaced by a notice image of the same size, tagged in its PNG
info (`pipelines.common.WITHHELD_KEY`), and the app's status line says how many were withheld.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from pipelines.common import WITHHELD_KEY, ModelNotAvailable
from pipelines.loading import DOWNLOAD_HINT, load_errors

NOTICE_TEXT = "withheld by the safety checker"
CHECKER_FOLDER, PROCESSOR_FOLDER = (
    "safety_checker",
    "feature_extractor",
)  # as diffusers' SD1.5 repositories lay them out


def notice_image(size: tuple[int, int]) -> Image.Image:
    """A plain grey image with a short notice, the size of the image it replaces."""
    image = Image.new("RGB", size, (96, 96, 96))
    ImageDraw.Draw(image).text((4, 4), NOTICE_TEXT if size[0] >= 180 else "withheld", fill=(255, 255, 255))
    image.info[WITHHELD_KEY] = NOTICE_TEXT
    return image


class SafetyChecker:
    """Screens PIL images with a StableDiffusionSafetyChecker and its CLIP image processor."""

    def __init__(self, checker, processor, device: str, dtype: torch.dtype):
        self.checker, self.processor, self.device, self.dtype = checker, processor, device, dtype

    @torch.no_grad()
    def flags(self, images: list[Image.Image]) -> list[bool]:
        """One verdict per image: True where the checker finds an NSFW concept."""
        if not images:
            return []
        clip_input = self.processor([im.convert("RGB") for im in images], return_tensors="pt").pixel_values
        arrays = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
        _, flagged = self.checker(images=arrays, clip_input=clip_input.to(self.device, self.dtype))
        return [bool(f) for f in flagged]

    def screen(self, images: list[Image.Image]) -> list[Image.Image]:
        """`images` with every flagged one replaced by a notice of the same size."""
        verdicts = self.flags(images)
        return [notice_image(im.size) if bad else im for im, bad in zip(images, verdicts)]


def load_safety_checker(engine) -> SafetyChecker | None:
    """The checker that comes with the engine's model (None for the built-in model, which needs none)."""
    preset = engine.preset
    if preset.is_builtin:
        return None
    source = getattr(preset, "safety_checker", None) or preset.base
    return engine.compute.run(_load, source, preset.name, engine.device, engine.torch_dtype)


def _load(source: str, preset_name: str, device: str, dtype: torch.dtype) -> SafetyChecker:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    try:
        checker = StableDiffusionSafetyChecker.from_pretrained(source, subfolder=CHECKER_FOLDER, dtype=dtype)
        processor = CLIPImageProcessor.from_pretrained(source, subfolder=PROCESSOR_FOLDER)
    except load_errors() as error:
        raise ModelNotAvailable(
            f"the safety checker of model {preset_name} ({source}/{CHECKER_FOLDER}) could not be loaded "
            f"({type(error).__name__}); the app is public, so it is on by default. Download it with "
            f"`{DOWNLOAD_HINT.format(name=preset_name)}`, or start with --no-safety-checker (LDS_SAFETY_CHECKER=0) "
            f"if you screen outputs another way") from error
    return SafetyChecker(checker.to(device).eval(), processor, device, dtype)


def screen(engine, images: list[Any]) -> list[Any]:
    """The engine's safety checker over a model call's output images (unchanged when it has none)."""
    checker = engine.safety
    if checker is None or not images:
        return images
    return engine.compute.run(checker.screen, images)
