"""Input components that say what was wrong: uploads that refuse unreadable files and decompression bombs,
sliders and choices whose server-side checks name their field; reading uploads and example files."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image, ImageOps, UnidentifiedImageError

from pipelines.common import (
    params_from_png,
)

REPO_ROOT = Path(__file__).resolve().parent.parent

EXAMPLES_DIR = REPO_ROOT / "assets" / "examples"


def check_image_file(path: str | None, max_pixels: int, what: str) -> None:
    """Refuse what PIL cannot read, and decompression bombs, before anything decodes the pixels."""
    if not path:
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
    except Image.DecompressionBombError as e:
        raise gr.Error(f"The {what} is too large to open safely ({e}); the limit is {max_pixels:,} pixels.") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise gr.Error(
            f"The {what} is not a readable image (PNG, JPEG or WebP); the file is damaged or of another type."
        ) from None
    if width * height > max_pixels:
        raise gr.Error(
            f"The {what} is {width}x{height} = {width * height:,} pixels, above the limit of {max_pixels:,} pixels."
        )


def _decode_error(what: str, e: Exception) -> gr.Error:
    return gr.Error(f"The {what} could not be decoded ({type(e).__name__}: {e}); the file is damaged or truncated.")


class SafeImage(gr.Image):
    """gr.Image that refuses unreadable files and decompression bombs with a clear message."""

    is_template = True  # the browser renders it with gr.Image's frontend
    max_pixels = 4096 * 4096  # set per instance by `safe_image` (no __init__: gradio reads props from its signature)

    def preprocess(self, payload):
        check_image_file(payload.path if payload is not None else None, self.max_pixels, f"image '{self.label}'")
        try:
            image = super().preprocess(payload)
            if isinstance(image, Image.Image):
                image.load()
            return image
        except gr.Error:
            raise
        except Exception as e:
            raise _decode_error(f"image '{self.label}'", e) from None


class SafeImageEditor(gr.ImageEditor):
    """gr.ImageEditor with the same checks on its background and every layer."""

    is_template = True
    max_pixels = 4096 * 4096  # set per instance by `safe_image_editor`

    def preprocess(self, payload):
        if payload is not None:
            files = [payload.background, payload.composite, *(payload.layers or [])]
            for file in files:
                check_image_file(getattr(file, "path", None), self.max_pixels, f"image '{self.label}'")
        try:
            value = super().preprocess(payload)
        except gr.Error:
            raise
        except Exception as e:
            raise _decode_error(f"image '{self.label}'", e) from None
        return value


def _named_errors(cls):
    """`cls` whose server-side checks (gradio's bounds and choices) say which field was wrong:
    "Steps: Value 10000 is greater than maximum value 150." instead of the bare sentence."""

    class Named(cls):
        is_template = True  # rendered by the frontend of `cls`

        def preprocess(self, payload):
            try:
                return super().preprocess(payload)
            except gr.Error as error:
                raise gr.Error(f"{self.label}: {error.message}", title="Invalid input") from None

    Named.__name__ = Named.__qualname__ = f"Named{cls.__name__}"
    return Named


Slider = _named_errors(gr.Slider)

Number = _named_errors(gr.Number)

Dropdown = _named_errors(gr.Dropdown)

Radio = _named_errors(gr.Radio)

CheckboxGroup = _named_errors(gr.CheckboxGroup)


def safe_image(*, max_pixels: int, **kwargs) -> SafeImage:
    component = SafeImage(**kwargs)
    component.max_pixels = max_pixels
    return component


def safe_image_editor(*, max_pixels: int, **kwargs) -> SafeImageEditor:
    component = SafeImageEditor(**kwargs)
    component.max_pixels = max_pixels
    return component


def open_png_params(path: str | None, max_pixels: int) -> dict[str, Any]:
    """The generation parameters stored in a PNG written by this app (or by AUTOMATIC1111)."""
    if not path:
        raise gr.Error("Drop a PNG made by this app to restore its parameters.")
    check_image_file(path, max_pixels, "parameters file")
    with Image.open(path) as im:
        try:
            params = params_from_png(im)
        except Exception as e:  # a damaged text chunk
            raise _decode_error("parameters file", e) from None
    if not params:
        raise gr.Error(f"{Path(path).name} carries no generation parameters (no 'parameters' PNG text chunk).")
    return params


def open_image(value) -> Image.Image | None:
    """An upload as a PIL image with EXIF orientation applied (pipelines normalise mode and size)."""
    if value is None:
        return None
    if isinstance(value, (str, Path)):
        with Image.open(value) as im:
            im.load()
            value = im.copy() if im.format != "MPO" else im.convert("RGB")
    try:
        return ImageOps.exif_transpose(value)
    except Exception:
        return value


def example_files(*names: str) -> list[str]:
    """Paths of example inputs in assets/examples that exist (the folder is generated by scripts/make_examples.py)."""
    return [str(EXAMPLES_DIR / name) for name in names if (EXAMPLES_DIR / name).is_file()]
