"""Bad input through the real API: each case is normalised or refused with a message naming the value and
the limit, and the next request still works. (docs/ARCHITECTURE.md, Robustness)"""
from __future__ import annotations

import numpy as np
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from tests.test_api import common_args, controlnet_args, editor, gallery_paths, pixels

LONG_PROMPT = "a red circle " * 385  # 5,005 characters


def txt2img(client, **overrides):
    args = dict(prompt="a red circle", width=64, height=64, **common_args(steps=1))
    args.update(overrides)
    return client.predict(**args, api_name="/txt2img")


def still_works(client):
    _, gallery, params, _ = txt2img(client)
    assert len(gallery) == 1 and params["steps"] == 1


def refused(client, fragments, *, api_name, **kwargs):
    """The call fails with an error whose message contains every fragment; then a normal call succeeds."""
    with pytest.raises(AppError) as info:
        client.predict(**kwargs, api_name=api_name)
    message = str(info.value).lower()
    for fragment in fragments:
        assert str(fragment).lower() in message, f"{fragment!r} not in {message!r}"
    still_works(client)
    return message


# --- text-to-image settings --------------------------------------------------------------------------------

def txt2img_kwargs(**overrides):
    args = dict(prompt="a red circle", width=64, height=64, **common_args(steps=1))
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides, fragments", [
    (dict(prompt=LONG_PROMPT), ["prompt", "5005", "1000"]),
    (dict(negative_prompt=LONG_PROMPT), ["negative_prompt", "5005", "1000"]),
    (dict(seed=-5), ["seed", "-5", "-1"]),
    (dict(seed=2**70), ["seed", str(2**70), str(2**32 - 1)]),
    (dict(steps=0), ["steps", "0", "1"]),
    (dict(steps=10000), ["steps", "10000", "150"]),
    (dict(width=8192), ["width", "8192"]),
    (dict(height=4), ["height", "4"]),
    (dict(width=60), ["width", "60", "multiple of 8"]),
    (dict(batch_size=100), ["batch", "100"]),
    (dict(guidance=-1), ["guidance", "-1"]),
    (dict(guidance=1000), ["guidance", "1000"]),
    (dict(scheduler="Euler-bogus"), ["scheduler", "Euler-bogus"]),
], ids=lambda v: "-".join(f"{k}={str(x)[:12]}" for k, x in v.items()) if isinstance(v, dict) else None)
def test_txt2img_refuses(client, overrides, fragments):
    refused(client, fragments, api_name="/txt2img", **txt2img_kwargs(**overrides))


def test_empty_prompt_is_unconditional_generation(client):
    _, gallery, params, _ = txt2img(client, prompt="")
    assert len(gallery) == 1 and params["prompt"] == ""


def test_unknown_words_are_reported_not_fatal(client, live_app):
    if not live_app.engine.vocabulary():
        pytest.skip("open-vocabulary tokenizer")
    _, gallery, _, status = txt2img(client, prompt="a red zebra riding a bicycle")
    assert len(gallery) == 1
    assert "zebra" in status and "bicycle" in status


def test_largest_seed_works(client):
    _, _, params, _ = txt2img(client, seed=2**32 - 1)
    assert params["seed"] == 2**32 - 1


# --- uploaded images (style transfer img2img runs them through the whole path) -------------------------------

def stylize(client, path, live_app):
    style = next(iter(live_app.engine.preset.style_presets), "")
    return client.predict(image=handle_file(str(path)), style=style, prompt="a circle", strength=0.5, mode="img2img",
                          control="canny", conditioning_scale=1.0, **common_args(steps=2), api_name="/style")


@pytest.mark.parametrize("name", ["rgba.png", "palette_transparent.png", "16bit.png", "cmyk.jpg", "grayscale.png"])
def test_unusual_images_are_normalised(client, images, live_app, name):
    _, gallery, params, _ = stylize(client, images[name], live_app)
    out = pixels(gallery_paths(gallery)[0])
    assert out.shape == (64, 64, 3)


def test_exif_orientation_is_applied(client, images, live_app):
    _, gallery, _, _ = stylize(client, images["exif_rotated.jpg"], live_app)
    with Image.open(gallery_paths(gallery)[0]) as im:
        assert im.width > im.height  # stored 32x64 (portrait) with orientation 6: upright it is landscape


def test_odd_size_is_normalised(client, images, live_app):
    _, gallery, params, _ = stylize(client, images["513x777.png"], live_app)
    with Image.open(gallery_paths(gallery)[0]) as im:
        width, height = im.size
    assert height > width and params["width"] % 8 == 0 and params["height"] % 8 == 0
    assert max(params["width"], params["height"]) <= live_app.engine.limits.max_size


@pytest.mark.parametrize("name, fragments", [
    ("1x1.png", ["1x1", "below the minimum of 8"]),
    ("bomb.png", ["too large", "pixels"]),
    ("too_big.png", ["5000x5000", "pixels"]),
    ("truncated.png", ["damaged"]),
    ("not_image.png", ["not a readable image"]),
])
def test_bad_images_are_refused(client, images, live_app, name, fragments):
    style = next(iter(live_app.engine.preset.style_presets), "")
    refused(client, fragments, api_name="/style", image=handle_file(str(images[name])), style=style, prompt="a circle",
            strength=0.5, mode="img2img", control="canny", conditioning_scale=1.0, **common_args(steps=2))


def test_bomb_refused_on_every_image_input(client, images):
    refused(client, ["too large"], api_name="/inpaint", image=editor(images["bomb.png"]), prompt="x", strength=1.0,
            mask_blur=0, mask=handle_file(str(images["mask_full.png"])), **common_args(steps=1))
    refused(client, ["too large"], api_name="/preprocess", image=handle_file(str(images["bomb.png"])),
            control_type="canny", preprocessor="canny", low_threshold=100, high_threshold=200)


# --- masks ----------------------------------------------------------------------------------------------------

def inpaint(client, images, mask_name, **overrides):
    args = dict(image=editor(images["scene.png"]), prompt="a star", strength=1.0, mask_blur=0,
                mask=handle_file(str(images[mask_name])) if mask_name else None, **common_args(steps=2))
    args.update(overrides)
    return args


def test_empty_mask_is_refused(client, images):
    refused(client, ["mask is empty"], api_name="/inpaint", **inpaint(client, images, "mask_empty.png"))


def test_no_mask_and_no_strokes_is_refused(client, images):
    refused(client, ["mask"], api_name="/inpaint", **inpaint(client, images, None))


def test_no_image_to_inpaint(client, images):
    refused(client, ["upload an image"], api_name="/inpaint", **inpaint(client, images, "mask_full.png", image=None))


def test_full_mask_repaints_everything(client, images):
    _, gallery, _, _ = client.predict(**inpaint(client, images, "mask_full.png"), api_name="/inpaint")
    out = pixels(gallery_paths(gallery)[0])
    assert out.shape == (64, 64, 3) and not np.array_equal(out, pixels(images["scene.png"]))


def test_mask_of_another_size_is_resized(client, images):
    _, gallery, _, _ = client.predict(**inpaint(client, images, "mask_other_size.png"), api_name="/inpaint")
    out, original = pixels(gallery_paths(gallery)[0]), pixels(images["scene.png"])
    assert np.array_equal(out[:, :32], original[:, :32])  # the mask still means "right half"


# --- task-specific values ----------------------------------------------------------------------------------------

def outpaint_kwargs(images, **overrides):
    args = dict(image=handle_file(str(images["scene.png"])), prompt="grass", directions=["right"], pixels=16,
                fill="edge", **common_args(steps=2))
    args.update(overrides)
    return args


def test_outpaint_without_a_side(client, images):
    refused(client, ["at least one side"], api_name="/outpaint", **outpaint_kwargs(images, directions=[]))


def test_outpaint_unknown_side(client, images):
    refused(client, ["up"], api_name="/outpaint", **outpaint_kwargs(images, directions=["up"]))


def test_outpaint_too_many_pixels(client, images):
    refused(client, ["pixels", "4096"], api_name="/outpaint", **outpaint_kwargs(images, pixels=4096))


def test_outpaint_unknown_fill(client, images):
    refused(client, ["fill", "lava"], api_name="/outpaint", **outpaint_kwargs(images, fill="lava"))


def test_style_unknown_style(client, images):
    refused(
        client,
        ["style", "cubism"],
        api_name="/style",
        image=handle_file(str(images["scene.png"])),
        style="cubism",
        prompt="",
        strength=0.5,
        mode="img2img",
        control="canny",
        conditioning_scale=1.0,
        **common_args(steps=2),
    )


def test_controlnet_guidance_window(client, images, live_app):
    if "canny" not in live_app.engine.control_types:
        pytest.skip("no canny ControlNet")
    refused(client, ["guidance_start", "0.8", "0.2"], api_name="/controlnet",
            **controlnet_args(images["scene.png"], guidance_start=0.8, guidance_end=0.2))


def test_preprocess_bad_choices(client, images):
    scene = handle_file(str(images["scene.png"]))
    refused(client, ["preprocessor", "magic"], api_name="/preprocess", image=scene, control_type="canny",
            preprocessor="magic", low_threshold=100, high_threshold=200)
    refused(client, ["low_threshold", "200", "100"], api_name="/preprocess", image=scene, control_type="canny",
            preprocessor="canny", low_threshold=200, high_threshold=100)
    refused(client, ["control type", "x-ray"], api_name="/preprocess", image=scene, control_type="x-ray",
            preprocessor="canny", low_threshold=100, high_threshold=200)


def test_restore_from_png_without_parameters(client, images):
    refused(
        client, ["no generation parameters"], api_name="/restore_params", png=handle_file(str(images["scene.png"]))
    )
