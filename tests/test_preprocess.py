"""Input normalisation (docs/ARCHITECTURE.md, Robustness): every awkward upload becomes 8-bit upright RGB, or a
clear InputError."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipelines import preprocess
from pipelines.common import InputError


def png_bytes(image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def header_only_png(width, height) -> bytes:
    """A PNG claiming width x height in a few bytes: a decompression bomb."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def gradient(size=(48, 32)):
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x * 5 % 256, y * 7 % 256, (x + y) % 256], -1).astype(np.uint8))


def test_exif_orientation_is_applied(tmp_path):
    upright = gradient((32, 64))  # portrait
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": the stored pixels lie on their side
    path = tmp_path / "rotated.jpg"
    upright.transpose(Image.ROTATE_90).save(path, exif=exif.tobytes(), quality=95)
    image = preprocess.load_image(str(path))
    assert image.size == (32, 64) and image.mode == "RGB"


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparency_is_composited_on_white(mode):
    image = gradient().convert(mode)
    alpha = Image.new("L", image.size, 255)
    alpha.paste(0, (0, 0, 10, 10))
    image.putalpha(alpha)
    out = preprocess.load_image(Image.open(io.BytesIO(png_bytes(image))))
    assert out.mode == "RGB" and out.getpixel((2, 2)) == (255, 255, 255)
    assert out.getpixel((30, 20)) != (255, 255, 255)


def test_palette_with_transparency():
    image = gradient().convert("P", palette=Image.ADAPTIVE, colors=16)
    index = image.getpixel((0, 0))
    out = preprocess.load_image(Image.open(io.BytesIO(png_bytes(image, transparency=index))))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_grey_becomes_8_bit():
    grey = np.asarray(gradient().convert("L"), np.uint16) * 257  # full 16-bit range
    image = Image.open(io.BytesIO(png_bytes(Image.fromarray(grey.astype("<u2")))))
    out = preprocess.load_image(image)
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(out)[..., 0], np.asarray(gradient().convert("L")))
    assert preprocess.load_image(grey).mode == "RGB"  # numpy uint16 too


def test_cmyk_grayscale_and_float_arrays():
    assert preprocess.load_image(gradient().convert("CMYK")).mode == "RGB"
    assert preprocess.load_image(gradient().convert("L")).mode == "RGB"
    assert preprocess.load_image(gradient().convert("1")).mode == "RGB"
    floats = np.asarray(gradient(), np.float32) / 255.0
    assert np.abs(np.asarray(preprocess.load_image(floats), int) - np.asarray(gradient(), int)).max() <= 1
    assert preprocess.load_image(np.zeros((16, 16, 4), np.uint8)).getpixel((0, 0)) == (255, 255, 255)


def test_tiny_images_are_refused():
    with pytest.raises(InputError, match="1x1 pixels: its width 1 and its height 1 are below the minimum of 8"):
        preprocess.load_image(Image.new("RGB", (1, 1)))


def test_decompression_bombs_are_refused():
    with pytest.raises(InputError, match="400,000,000 pixels, above the limit of 16,777,216 pixels"):
        preprocess.load_image(header_only_png(20000, 20000))
    with pytest.raises(InputError, match="25,000,000 pixels, above the limit of 16,777,216"):
        preprocess.load_image(header_only_png(5000, 5000))  # between 1x and 2x the limit: PIL warns, we refuse
    with pytest.raises(InputError, match="above the limit of 1,000 pixels"):
        preprocess.load_image(png_bytes(gradient()), max_pixels=1000)
    with pytest.raises(InputError, match="above the limit"):
        preprocess.load_image(np.zeros((200, 200, 3), np.uint8), max_pixels=1000)


def test_truncated_and_non_images_are_refused(tmp_path):
    data = png_bytes(gradient((128, 128)))
    with pytest.raises(InputError, match="damaged or truncated"):
        preprocess.load_image(data[: len(data) // 2])
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello\n" * 50)
    with pytest.raises(InputError, match="not an image"):
        preprocess.load_image(str(not_image))
    with pytest.raises(InputError, match="does not exist"):
        preprocess.load_image(str(tmp_path / "missing.png"))
    with pytest.raises(InputError, match="no image was given"):
        preprocess.load_image(None)
    with pytest.raises(InputError, match="type int"):
        preprocess.load_image(5)


def test_first_frame_of_animation():
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    assert preprocess.load_image(buffer.getvalue()).getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize("size, expected", [((513, 777), (88, 128)), ((64, 64), (64, 64)), ((30, 20), (64, 40)),
                                            ((1000, 200), (128, 24))])
def test_fit_to_model_and_working_size(size, expected):
    image = Image.new("RGB", size)
    out = preprocess.fit_to_model(image, 128, min_size=64)
    assert out.width % 8 == 0 and out.height % 8 == 0 and max(out.size) <= 128
    assert preprocess.working_size(size, 128, min_size=64) == expected


def test_masks_of_every_form_become_binary_at_image_size():
    size = (64, 48)
    grey = Image.new("L", (32, 24), 0)
    grey.paste(200, (0, 0, 16, 24))  # left half, other size
    strokes = Image.new("RGBA", size, (0, 0, 0, 0))
    strokes.paste((255, 255, 255, 255), (0, 0, 32, 48))
    opaque_rgb = Image.new("RGB", size, "black")
    opaque_rgb.paste((255, 255, 255), (0, 0, 32, 48))
    for value in (
        grey,
        strokes,
        opaque_rgb,
        np.asarray(opaque_rgb.convert("L")),
        grey.convert("1", dither=Image.Dither.NONE),
    ):
        mask = preprocess.load_mask(value, size)
        array = np.asarray(mask)
        assert mask.mode == "L" and mask.size == size and set(np.unique(array)) <= {0, 255}
        assert array[:, :32].min() == 255 and array[:, 32:].max() == 0


def test_editor_dict_masks():
    background = gradient((64, 48))
    layer = Image.new("RGBA", background.size, (0, 0, 0, 0))
    layer.paste((255, 0, 0, 128), (10, 10, 20, 20))  # half-transparent brush still counts
    mask = preprocess.load_mask(
        {"background": background, "layers": [layer], "composite": background}, background.size
    )
    assert np.asarray(mask)[15, 15] == 255 and np.asarray(mask)[30, 30] == 0
    # no layers: the painted difference between composite and background is the mask
    composite = background.copy()
    composite.paste((0, 0, 0), (40, 5, 50, 15))
    mask = preprocess.load_mask({"background": background, "layers": [], "composite": composite}, background.size)
    assert np.asarray(mask)[10, 45] == 255 and np.asarray(mask)[30, 10] == 0
    empty = preprocess.load_mask({"background": background, "layers": [], "composite": background}, background.size)
    assert np.asarray(empty).max() == 0


def test_feather_stays_inside_the_mask():
    mask = Image.new("L", (40, 40), 0)
    mask.paste(255, (10, 10, 30, 30))
    soft = np.asarray(preprocess.feather(mask, 4))
    assert soft[np.asarray(mask) == 0].max() == 0
    assert 0 < soft[10, 20] < soft[12, 20] < 255 and soft[20, 20] == 255 and soft[15, 20] == 255


def _gradient_picture(size: int) -> np.ndarray:
    """A sky-like vertical gradient with a horizontal ripple: an input whose colours change along the mask's edge."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return np.clip(np.stack([80 + yy, 120 + 10 * np.sin(xx / 5), 200 - yy / 2], -1), 0, 255).astype(np.uint8)


def test_match_edges_removes_a_colour_drift_and_keeps_what_was_drawn():
    original = _gradient_picture(64)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 20:52] = 255
    # what a model gives back: the input a few levels off everywhere (as a VAE does) and a sharp square drawn inside
    generated = original.astype(np.int16) + np.array([6, -5, 4], np.int16)
    generated[26:38, 30:42] = (220, 40, 40)
    generated = np.clip(generated, 0, 255).astype(np.uint8)
    matched = np.asarray(preprocess.match_edges(Image.fromarray(original), Image.fromarray(generated),
                                                Image.fromarray(mask))).astype(int)
    inside = mask > 0
    edge_in = inside & ~np.pad(inside[1:-1, 1:-1] & inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2]
                               & inside[1:-1, 2:], 1)
    before = np.abs(generated.astype(int)[edge_in] - original.astype(int)[edge_in]).mean()
    after = np.abs(matched[edge_in] - original.astype(int)[edge_in]).mean()
    assert before >= 4 and after <= 1.5  # the drift is gone on the mask's edge
    assert np.array_equal(matched[~inside], original[~inside])  # outside: the input itself
    square = matched[26:38, 30:42]
    assert (np.abs(square - (220, 40, 40)) <= 7).all()  # what was drawn keeps its colour (the drift taken off)
    assert abs(matched[32, 41, 1] - matched[32, 42, 1]) > 80  # and its edge stays sharp


def test_match_edges_on_a_mask_at_the_border_and_at_any_size():
    for size in (40, 97, 300):
        original = _gradient_picture(size)
        mask = np.zeros((size, size), np.uint8)
        mask[:, : size // 3] = 255  # an outpainted side: the mask touches the picture's border
        generated = np.clip(original.astype(np.int16) - 9, 0, 255).astype(np.uint8)
        matched = np.asarray(preprocess.match_edges(Image.fromarray(original), Image.fromarray(generated),
                                                    Image.fromarray(mask))).astype(int)
        assert matched.shape == original.shape
        assert np.abs(matched[:, size // 3 - 1] - original[:, size // 3 - 1].astype(int)).max() <= 2
        assert np.abs(matched[:, 0] - original[:, 0].astype(int)).max() <= 2  # a constant drift: gone everywhere
    blank, full = Image.new("L", (32, 32), 0), Image.new("L", (32, 32), 255)
    picture, other = Image.fromarray(_gradient_picture(32)), Image.new("RGB", (32, 32), "red")
    assert preprocess.match_edges(picture, other, blank).tobytes() == other.tobytes()  # no edge: unchanged
    assert preprocess.match_edges(picture, other, full).tobytes() == other.tobytes()


def test_canny():
    image = Image.new("RGB", (64, 64), "black")
    image.paste((255, 255, 255), (16, 16, 48, 48))
    edges = preprocess.canny(image)
    array = np.asarray(edges)
    assert edges.mode == "RGB" and array.max() == 255 and array[32, 32].max() == 0
    with pytest.raises(InputError, match="low_threshold=200 is above high_threshold=100"):
        preprocess.canny(image, low_threshold=200, high_threshold=100)
