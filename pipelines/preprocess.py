"""Input normalisation shared by every task: images, masks, sizes, and the canny control map.

Whatever arrives (PIL, numpy, a server-side path, bytes, a gr.ImageEditor dict) leaves as an 8-bit RGB
PIL image the right way up, or an `InputError` that says what was wrong. No torch here.
"""
from __future__ import annotations

import io
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipelines.common import InputError, check_int
from pipelines.settings import Limits

MIN_SIDE = 8  # one latent at f = 8: anything smaller has no content to keep
BACKGROUND = (255, 255, 255)  # transparency is composited on white, as a browser shows it on a white page


# --- images ----------------------------------------------------------------------------------------

def load_image(value: Any, *, max_pixels: int | None = None) -> Image.Image:
    """PIL / numpy / bytes / server path / editor dict -> 8-bit RGB PIL image, EXIF-upright.

    Paths are opened as given: only the server passes them (uploads and example files), never a user.
    """
    max_pixels = max_pixels or Limits().max_image_pixels
    if isinstance(value, dict):  # gr.ImageEditor / sketchpad: the uploaded picture is the background
        value = value.get("background") if value.get("background") is not None else value.get("composite")
    if value is None:
        raise InputError("no image was given: upload an image first")
    if isinstance(value, np.ndarray):
        image = _from_array(value, max_pixels)
    elif isinstance(value, Image.Image):
        _check_pixels(value.size, max_pixels)
        image = value
    elif isinstance(value, (str, Path, bytes, bytearray)):
        image = _open(value, max_pixels)
    else:
        raise InputError(f"an image of type {type(value).__name__} cannot be read; upload a PNG, JPEG or WebP file")
    image = _to_rgb(ImageOps.exif_transpose(image) if image.getexif() else image)
    check_min_size(image.size)
    return image


def check_min_size(size: tuple[int, int]) -> None:
    """Refuse a picture with a side below MIN_SIDE, naming the side(s) that are short."""
    width, height = size
    short = [f"its {name} {value}" for name, value in (("width", width), ("height", height)) if value < MIN_SIDE]
    if short:
        sides = " and ".join(short)
        verb = "are" if len(short) == 2 else "is"
        raise InputError(f"the image is {width}x{height} pixels: {sides} {verb} below the minimum of {MIN_SIDE}")


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    pixels = size[0] * size[1]
    if pixels > max_pixels:
        raise InputError(
            f"the image is {size[0]}x{size[1]} = {pixels:,} pixels, above the limit of {max_pixels:,} pixels"
        )


def _open(value, max_pixels: int) -> Image.Image:
    source = io.BytesIO(value) if isinstance(value, (bytes, bytearray)) else value
    # PIL's own bomb guard is process-wide; align it with our limit (it then refuses at 2x, warns at 1x),
    # turn its warning into an error, and check the header size ourselves before anything is decoded.
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source)
            _check_pixels(image.size, max_pixels)
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)  # animated GIF/WebP/APNG: the first frame
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        found = re.search(r"\((\d+) pixels\)", str(error))  # PIL: "Image size (N pixels) exceeds limit ..."
        pixels = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise InputError(f"the image has {pixels}, above the limit of {max_pixels:,} pixels") from None
    except UnidentifiedImageError:
        raise InputError("the file is not an image that can be read (use PNG, JPEG or WebP)") from None
    except FileNotFoundError:
        raise InputError(f"the image file {str(value)!r} does not exist") from None
    except (OSError, SyntaxError, ValueError) as error:  # truncated or corrupt data
        raise InputError(f"the image file is damaged or truncated ({error})") from None
    return image


def _from_array(array: np.ndarray, max_pixels: int) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise InputError(f"an image array must be (H, W), (H, W, 3) or (H, W, 4); got shape {array.shape}")
    _check_pixels((array.shape[1], array.shape[0]), max_pixels)
    return Image.fromarray(_to_uint8(array))


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Any numeric array -> uint8: 16-bit scaled by 1/257, floats in [0, 1] scaled by 255."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        array = np.nan_to_num(array.astype(np.float64))
        scale = 255.0 if array.size and array.max() <= 1.0 else 1.0
        return np.clip(array * scale, 0, 255).round().astype(np.uint8)
    array = array.astype(np.int64)
    if array.size and array.max() > 255:  # 16-bit (or wider) integers
        return np.clip(array / 257.0, 0, 255).round().astype(np.uint8)
    return np.clip(array, 0, 255).astype(np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = Image.fromarray(_to_uint8(np.asarray(image)))  # 16-bit / 32-bit grey -> 8-bit grey
    elif mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        canvas = Image.new("RGB", image.size, BACKGROUND)
        canvas.paste(image, mask=image.getchannel("A"))
        return canvas
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, ...


def _fit_scale(long_side: int, max_size: int, min_size: int | None) -> float:
    """The factor that brings the long side within [min_size, max_size] (1.0 when it already is)."""
    if long_side > max_size:
        return max_size / long_side
    if min_size and long_side < min_size:
        return min(min_size, max_size) / long_side
    return 1.0


def fit_to_model(image: Image.Image, max_size: int, multiple: int = 8, *, min_size: int | None = None) -> Image.Image:
    """Resize keeping the aspect ratio so the long side is <= max_size (and >= min_size when given), then
    centre-crop each side down to a multiple of `multiple` (at most multiple - 1 pixels lost)."""
    w, h = image.size
    scale = _fit_scale(max(w, h), max_size, min_size)
    if scale != 1.0:
        w, h = max(multiple, round(w * scale)), max(multiple, round(h * scale))
        image = image.resize((w, h), Image.LANCZOS)
    tw, th = max(multiple, w - w % multiple), max(multiple, h - h % multiple)
    if (tw, th) != image.size:
        if tw > image.width or th > image.height:  # smaller than one multiple: stretch instead of crop
            return image.resize((tw, th), Image.LANCZOS)
        left, top = (image.width - tw) // 2, (image.height - th) // 2
        image = image.crop((left, top, left + tw, top + th))
    return image


# --- masks -------------------------------------------------------------------------------------------

def load_mask(value: Any, size: tuple[int, int]) -> Image.Image:
    """Any mask form -> binary "L" mask (0 keep, 255 repaint) at `size`.

    Accepts PIL (RGBA/LA: alpha where painted; L/RGB/1: white = repaint), numpy, or a gr.ImageEditor /
    sketchpad dict {"background", "layers", "composite"}: the union of painted layer pixels, else the
    pixels where the composite differs from the background.
    """
    if value is None:
        raise InputError("no mask was given: paint over the area to change")
    if isinstance(value, dict):
        mask = _mask_from_editor(value, size)
    else:
        if isinstance(value, np.ndarray):
            value = Image.fromarray(_to_uint8(value[..., 0] if value.ndim == 3 and value.shape[-1] == 1 else value))
        if not isinstance(value, Image.Image):
            raise InputError(f"a mask of type {type(value).__name__} cannot be read")
        mask = _mask_from_image(value)
    if mask.size != tuple(size):
        mask = mask.resize(tuple(size), Image.NEAREST)
    return mask.point(lambda v: 255 if v >= 128 else 0)


def _mask_from_image(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        if alpha.getextrema()[0] < 255:  # painted strokes on a transparent layer
            return alpha.point(lambda v: 255 if v > 0 else 0)
        image = rgba.convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image = Image.fromarray(_to_uint8(np.asarray(image)))
    return image.convert("L")


def _mask_from_editor(value: dict, size: tuple[int, int]) -> Image.Image:
    mask = Image.new("L", tuple(size), 0)
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        layer = layer if isinstance(layer, Image.Image) else Image.fromarray(_to_uint8(np.asarray(layer)))
        painted = _mask_from_image(layer).resize(tuple(size), Image.NEAREST)
        mask = Image.fromarray(np.maximum(np.asarray(mask), np.asarray(painted)))
    if mask.getextrema()[1] == 0 and value.get("composite") is not None and value.get("background") is not None:
        background = load_image(value["background"]).resize(tuple(size))
        composite = load_image(value["composite"]).resize(tuple(size))
        diff = np.abs(np.asarray(background, np.int16) - np.asarray(composite, np.int16)).max(axis=-1)
        mask = Image.fromarray(((diff > 8) * 255).astype(np.uint8))  # > 8 levels: ignore re-encoding noise
    return mask


def feather(mask: Image.Image, radius: float) -> Image.Image:
    """Soft mask that ramps from 0 at the mask's edge to 255 at `radius` pixels inside it, and is exactly 0
    outside it, so compositing with it never touches an unmasked pixel."""
    if radius <= 0:
        return mask
    import cv2

    binary = (np.asarray(mask) >= 128).astype(np.uint8)
    distance = cv2.distanceTransform(binary, cv2.DIST_L2, 5)  # (H, W) pixels to the nearest unmasked pixel
    ramp = np.clip(distance / radius, 0.0, 1.0)
    ramp = ramp * ramp * (3 - 2 * ramp)  # smoothstep: no visible kink where the ramp starts or ends
    return Image.fromarray((ramp * 255).round().astype(np.uint8))


# Jacobi sweeps of the border offset's solve: at the coarsest level (at most HARMONIC_COARSE pixels a side) and at
# each finer level, which starts from the coarser solution upsampled and only has local detail left to settle
HARMONIC_COARSE = 8
HARMONIC_COARSE_SWEEPS = 64
HARMONIC_FINE_SWEEPS = 30


def match_edges(original: Image.Image, generated: Image.Image, mask: Image.Image) -> Image.Image:
    """`generated` plus a smooth colour offset that makes it meet `original` on the mask's edge: the offset is
    `original - generated` outside the mask, continued into the mask as smoothly as possible (the harmonic
    continuation, as in Poisson image editing), so inside the mask every edge and detail the model drew stays and
    only a slow drift is added. Why: the VAE never gives back the exact colours around a hole (a few levels off
    even where nothing changed), and that difference showed as a line along the mask's edge."""
    if generated.size != original.size:
        generated = generated.resize(original.size, Image.LANCZOS)
    repaint = np.asarray(mask) >= 128  # (H, W)
    if not repaint.any() or repaint.all():
        return generated  # nothing to match: no edge
    source = np.asarray(generated.convert("RGB"), np.float32)
    offset = _harmonic_fill(np.asarray(original.convert("RGB"), np.float32) - source, ~repaint)
    return Image.fromarray(np.clip(source + offset, 0, 255).round().astype(np.uint8))


def _harmonic_fill(values: np.ndarray, known: np.ndarray) -> np.ndarray:
    """(H, W, C) `values` kept where `known`, and elsewhere the solution of Laplace's equation that meets them
    (image borders: no flux), by Jacobi sweeps from the solution at half the size."""
    import cv2

    height, width = known.shape
    if max(height, width) > HARMONIC_COARSE:
        size = (max(1, width // 2), max(1, height // 2))
        weight = cv2.resize(known.astype(np.float32), size, interpolation=cv2.INTER_AREA)
        mean = cv2.resize(values * known[..., None], size, interpolation=cv2.INTER_AREA)
        coarse_known = weight > 0.5  # mostly known: its known pixels' mean stands for it
        coarse = _harmonic_fill(mean / np.maximum(weight, 1e-6)[..., None], coarse_known)
        start, sweeps = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR), HARMONIC_FINE_SWEEPS
    else:
        start, sweeps = np.zeros_like(values), HARMONIC_COARSE_SWEEPS
    kernel = np.array([[0, 0.25, 0], [0.25, 0, 0.25], [0, 0.25, 0]], np.float32)  # the mean of the 4 neighbours
    keep = known[..., None]
    field = np.where(keep, values, start.reshape(values.shape)).astype(np.float32)
    for _ in range(sweeps):
        field = np.where(keep, values, cv2.filter2D(field, -1, kernel, borderType=cv2.BORDER_REPLICATE)
                         .reshape(values.shape))
    return field


def composite(original: Image.Image, generated: Image.Image, soft_mask: Image.Image) -> Image.Image:
    """original where soft_mask = 0, generated where 255, blended between; all three at the same size."""
    if generated.size != original.size:
        generated = generated.resize(original.size, Image.LANCZOS)
    return Image.composite(generated, original, soft_mask)


# --- control maps ------------------------------------------------------------------------------------

def canny(image: Image.Image, *, low_threshold: int = 100, high_threshold: int = 200, **_: Any) -> Image.Image:
    """OpenCV Canny edges as the white-on-black RGB map ControlNet canny models take."""
    import cv2

    low = check_int("low_threshold", low_threshold, 0, 255)
    high = check_int("high_threshold", high_threshold, 0, 255)
    if low > high:
        raise InputError(f"low_threshold={low} is above high_threshold={high}")
    grey = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(grey, low, high)  # (H, W) uint8, 255 on edges
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def control_map(value: Any, size: tuple[int, int], *, max_pixels: int | None = None) -> Image.Image:
    """A ready-made control map (uploaded edges/depth/pose image) -> RGB at `size`."""
    image = load_image(value, max_pixels=max_pixels)
    return image if image.size == tuple(size) else image.resize(tuple(size), Image.BILINEAR)


def working_size(
    size: tuple[int, int], max_size: int, *, min_size: int | None = None, multiple: int = 8
) -> tuple[int, int]:
    """The size the model runs at for an input of `size`: long side within [min_size, max_size], both
    sides multiples of `multiple`, aspect kept to within one multiple. Results are mapped back to `size`."""
    w, h = size
    scale = _fit_scale(max(w, h), max_size, min_size)

    def snap(v: float) -> int:
        return int(min(max(multiple, round(v / multiple) * multiple), max_size - max_size % multiple))

    return snap(w * scale), snap(h * scale)
