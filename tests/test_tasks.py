"""Task functions on tiny random models: sizes, determinism, exact pixels kept, metadata, ControlNet paths."""
import io
import threading

import numpy as np
import pytest
from PIL import Image

from pipelines import controlnet, inpaint, outpaint, style, txt2img
from pipelines.common import Cancelled, InputError, params_from_png, params_to_png_info

RUN = dict(prompt="a red circle", seed=3, steps=2, guidance=4.0)


def scene(size=(64, 64), seed=0):
    """A photo-like input: smooth gradient plus a square, so edges exist for canny."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    array = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, 128)], -1).astype(np.uint8)
    array[h // 4:h // 2, w // 4:w // 2] = rng.integers(0, 255, 3)
    return Image.fromarray(array)


def centre_mask(size=(64, 64), box=(16, 16, 40, 40)):
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


# --- PNG metadata ---------------------------------------------------------------------------------------

def test_params_roundtrip_through_png(shapes_engine):
    result = txt2img.generate(shapes_engine, **RUN, negative_prompt="blurry, dark")
    buffer = io.BytesIO()
    result.images[0].save(buffer, format="PNG", pnginfo=params_to_png_info(result.params))
    restored = params_from_png(Image.open(io.BytesIO(buffer.getvalue())))
    assert restored == result.params
    again = txt2img.generate(
        shapes_engine,
        **{
            k: restored[k]
            for k in ("prompt", "negative_prompt", "seed", "steps", "guidance", "scheduler", "width", "height")
        },
    )
    assert again.images[0].tobytes() == result.images[0].tobytes()


def test_a1111_text_block_is_written_and_read():
    params = {"task": "txt2img", "model": "sd15", "prompt": "a cat, oil painting", "negative_prompt": "blurry",
              "seed": 42, "steps": 20, "guidance": 7.5, "scheduler": "Euler a", "width": 512, "height": 768}
    image = Image.new("RGB", (8, 8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=params_to_png_info(params))
    text = Image.open(io.BytesIO(buffer.getvalue())).text["a1111_parameters"]
    assert "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x768" in text
    # a PNG written by AUTOMATIC1111 itself: its block lives under "parameters"
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", text)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    parsed = params_from_png(Image.open(io.BytesIO(buffer.getvalue())))
    assert {
        k: parsed[k]
        for k in ("prompt", "negative_prompt", "seed", "steps", "guidance", "scheduler", "width", "height")
    } == {
        k: params[k]
        for k in ("prompt", "negative_prompt", "seed", "steps", "guidance", "scheduler", "width", "height")
    }
    assert params_from_png(Image.new("RGB", (8, 8))) is None


# --- inpaint -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("engine_name", ["shapes_engine", "sd_engine", "sd_inpaint_engine"])
def test_inpaint_keeps_unmasked_pixels_exactly(request, engine_name):
    engine = request.getfixturevalue(engine_name)
    image, mask = scene(), centre_mask()
    result = inpaint.inpaint(engine, image=image, mask=mask, **RUN, mask_blur=4, batch_size=2)
    keep = np.asarray(mask) == 0
    for out in result.images:
        assert out.size == image.size
        assert np.array_equal(np.asarray(out)[keep], np.asarray(image)[keep])
        assert not np.array_equal(np.asarray(out)[~keep], np.asarray(image)[~keep])
    expected = "9-channel" if engine_name == "sd_inpaint_engine" else "latent blending"
    assert result.params["inpaint_unet"] == expected and result.params["task"] == "inpaint"


def test_inpaint_deterministic_and_odd_sizes_map_back(shapes_engine):
    image = scene((70, 50))  # not multiples of 8: the model runs at 72x48, the output is 70x50
    mask = centre_mask((70, 50), (10, 10, 30, 30))
    a = inpaint.inpaint(shapes_engine, image=image, mask=mask, **RUN)
    b = inpaint.inpaint(shapes_engine, image=image, mask=mask, **RUN)
    assert a.images[0].size == (70, 50) and a.images[0].tobytes() == b.images[0].tobytes()
    keep = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(a.images[0])[keep], np.asarray(image)[keep])
    assert (a.params["width"], a.params["height"]) == (72, 48)


def test_inpaint_with_dedicated_nine_channel_unet(tiny_presets):
    from pipelines.engine import Engine

    engine = Engine(tiny_presets["sd_inpaint_unet"], device="cpu")
    result = inpaint.inpaint(engine, image=scene(), mask=centre_mask(), **RUN)
    assert result.params["inpaint_unet"] == "9-channel"
    view = engine.pipeline("inpaint")
    assert view.unet is not engine.base.unet and view.vae is engine.base.vae  # only the U-Net differs
    assert view.unet is engine.pipeline("inpaint").unet


def test_inpaint_editor_dict_mask_and_full_mask(shapes_engine):
    image = scene()
    stroke = Image.new("RGBA", image.size, (0, 0, 0, 0))
    stroke.paste((255, 0, 0, 255), (8, 8, 24, 24))
    editor = {"background": image, "layers": [stroke], "composite": image}
    result = inpaint.inpaint(shapes_engine, image=editor, mask=editor, **RUN, mask_blur=0)
    assert np.array_equal(np.asarray(result.images[0])[30:, 30:], np.asarray(image)[30:, 30:])
    full = inpaint.inpaint(shapes_engine, image=image, mask=Image.new("L", image.size, 255), **RUN)
    assert full.images[0].size == image.size


def test_inpaint_empty_mask_is_refused(shapes_engine):
    with pytest.raises(InputError, match="the mask is empty: paint over the area to change"):
        inpaint.inpaint(shapes_engine, image=scene(), mask=Image.new("L", (64, 64), 0), **RUN)
    with pytest.raises(InputError, match="mask_blur=100 is above the limit of 64"):
        inpaint.inpaint(shapes_engine, image=scene(), mask=centre_mask(), **RUN, mask_blur=100)


# --- outpaint ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fill", ["edge", "blur", "noise"])
def test_outpaint_keeps_original_beyond_the_overlap_band(shapes_engine, fill):
    image = scene((48, 40))
    result = outpaint.outpaint(shapes_engine, image=image, left=10, right=0, top=8, bottom=3, **RUN, fill=fill)
    # borders round up to multiples of 8: left 16, top 8, bottom 8
    assert result.params["left"] == 16 and result.params["bottom"] == 8 and result.params["right"] == 0
    out = result.images[0]
    assert out.size == (48 + 16, 40 + 16)
    # byte-identical beyond the band along each extended side where the original fades into the new area
    band = outpaint.OVERLAP
    assert np.array_equal(np.asarray(out)[8 + band:48 - band, 16 + band:64], np.asarray(image)[band:40 - band, band:])
    canvas, mask = result.previews
    assert canvas.size == out.size and np.asarray(mask)[0, 0] == 255 and np.asarray(mask)[20, 40] == 0
    again = outpaint.outpaint(shapes_engine, image=image, left=10, right=0, top=8, bottom=3, **RUN, fill=fill)
    assert again.images[0].tobytes() == out.tobytes()


def test_outpaint_large_canvas_runs_downscaled_and_maps_back(sd_engine):
    image = scene((120, 96))
    result = outpaint.outpaint(sd_engine, image=image, left=32, right=32, **RUN)
    assert result.images[0].size == (184, 96)
    assert max(result.params["width"], result.params["height"]) <= sd_engine.limits.max_size
    band = outpaint.OVERLAP
    assert np.array_equal(np.asarray(result.images[0])[:, 32 + band:152 - band], np.asarray(image)[:, band:120 - band])


def test_outpaint_validation(shapes_engine):
    with pytest.raises(InputError, match="set at least one border"):
        outpaint.outpaint(shapes_engine, image=scene(), **RUN)
    with pytest.raises(InputError, match="left=9999 is above the limit of 512"):
        outpaint.outpaint(shapes_engine, image=scene(), left=9999, **RUN)
    with pytest.raises(InputError, match="fill='smear' is not one of"):
        outpaint.outpaint(shapes_engine, image=scene(), left=8, fill="smear", **RUN)


# --- style -------------------------------------------------------------------------------------------------

def test_style_img2img(shapes_engine):
    result = style.stylize(shapes_engine, image=scene(), style="striped", prompt="a red circle", seed=1, steps=4,
                           guidance=4.0, strength=0.5)
    assert result.images[0].size == (64, 64)
    assert result.params["full_prompt"] == "a red circle in striped style" and result.params["mode"] == "img2img"
    again = style.stylize(shapes_engine, image=scene(), style="striped", prompt="a red circle", seed=1, steps=4,
                          guidance=4.0, strength=0.5)
    assert again.images[0].tobytes() == result.images[0].tobytes()


def test_style_structure_mode_uses_controlnet(sd_engine):
    result = style.stylize(sd_engine, image=scene(), style="watercolor", prompt="a house", seed=1, steps=4,
                           guidance=5.0, strength=0.75, mode="structure", control="canny")
    assert result.params["full_prompt"] == "a house, watercolor painting"
    assert result.params["control"] == "canny" and len(result.previews) == 1
    assert result.images[0].size == (64, 64)


def test_style_validation(shapes_engine):
    with pytest.raises(InputError, match="style='cubism' is not one of"):
        style.stylize(shapes_engine, image=scene(), style="cubism", seed=1, steps=4, guidance=4.0)
    with pytest.raises(InputError, match="both style and prompt are empty"):
        style.stylize(shapes_engine, image=scene(), seed=1, steps=4, guidance=4.0)
    with pytest.raises(InputError, match="steps=2 with strength=0.3 leaves no denoising step"):
        style.stylize(shapes_engine, image=scene(), style="flat", seed=1, steps=2, guidance=4.0, strength=0.3)


def test_image_tasks_bring_pictures_to_the_presets_height(tiny_presets, shapes_engine):
    """With picture_height (the built-in preset's 64: its scenes are 64 px tall), Style transfer and ControlNet run
    a larger upload at that height and a wide picture at its own height, as Inpaint does; a preset without it
    keeps only the size limits (the long side within [default_size, max_size])."""
    from dataclasses import replace

    from pipelines.engine import Engine

    engine = Engine(replace(tiny_presets["shapes"], picture_height=64), device="cpu")
    settings = dict(style="striped", prompt="a red circle", seed=1, steps=2, guidance=4.0, strength=0.5)
    for picture, size in ((scene((256, 256)), (64, 64)), (scene((300, 200)), (96, 64)), (scene((48, 48)), (64, 64))):
        result = style.stylize(engine, image=picture, **settings)
        assert (result.params["width"], result.params["height"]) == size and result.images[0].size == size
        edges = controlnet.preprocess(engine, image=picture, control_type="canny", preprocessor="canny")
        assert edges.size == size
        made = controlnet.generate(engine, control_images=picture, control_types="canny", **RUN)
        assert made.images[0].size == size
    assert style.stylize(shapes_engine, image=scene((256, 256)), **settings).images[0].size == (128, 128)
    assert controlnet.preprocess(shapes_engine, image=scene((300, 200)), control_type="canny",
                                 preprocessor="canny").size == (128, 88)


def test_a_height_the_model_does_not_know_is_said_with_the_result(tiny_presets, shapes_engine):
    """A preset with picture_height warns (in params["warnings"], which the tabs show) when a run's height is
    another (or outside its scene_heights); a wide canvas at that height does not; inpainting by latent blending
    keeps its own warning too."""
    from dataclasses import replace

    from pipelines.engine import Engine

    engine = Engine(replace(tiny_presets["shapes"], picture_height=64), device="cpu")
    tall = txt2img.generate(engine, **RUN, width=64, height=128)
    assert tall.params["warnings"] == [
        "tiny-shapes draws scenes 64 px tall; at 128 px tall it often draws the horizon twice, stretches the scene "
        "or adds stray objects"]
    assert "warnings" not in txt2img.generate(engine, **RUN, width=128, height=64).params
    assert "warnings" not in txt2img.generate(shapes_engine, **RUN, width=64, height=128).params
    brought = inpaint.inpaint(engine, image=scene((64, 128)), mask=centre_mask((64, 128)), **RUN)  # run at 32x64
    assert [note.split(" ")[1] for note in brought.params["warnings"]] == ["has"]  # only: no 9-channel U-Net
    taller = outpaint.outpaint(engine, image=scene(), top=32, **RUN)  # the canvas grows to 64x96 around it
    assert [note.split(" ")[1] for note in taller.params["warnings"]] == ["draws", "has"]
    # a model trained on a range of canvas heights (shapes-v2: 64-128) warns outside the range only
    ranged = Engine(replace(tiny_presets["shapes"], picture_height=64, scene_heights=(64, 128)), device="cpu")
    assert "warnings" not in txt2img.generate(ranged, **RUN, width=64, height=128).params
    assert txt2img.generate(ranged, **RUN, width=64, height=32).params["warnings"] == [
        "tiny-shapes draws scenes 64-128 px tall; at 32 px tall it often draws the horizon twice, stretches the scene "
        "or adds stray objects"]


# --- ControlNet --------------------------------------------------------------------------------------------

def test_controlnet_canny_preprocess_and_generate(shapes_engine):
    edges = controlnet.preprocess(shapes_engine, image=scene(), control_type="canny", preprocessor="canny")
    assert edges.size == (64, 64) and edges.mode == "RGB" and np.asarray(edges).max() == 255
    result = controlnet.generate(shapes_engine, control_images=edges, control_types="canny", **RUN)
    assert result.images[0].size == (64, 64) and result.params["control_types"] == ["canny"]
    plain = txt2img.generate(shapes_engine, **RUN)
    assert result.images[0].tobytes() != plain.images[0].tobytes()  # the ControlNet changed the output
    again = controlnet.generate(shapes_engine, control_images=[edges], control_types=["canny"], **RUN)
    assert again.images[0].tobytes() == result.images[0].tobytes()


def test_two_controlnets_at_once(sd_engine):
    edges = controlnet.preprocess(sd_engine, image=scene(), control_type="canny")
    depth = controlnet.preprocess(sd_engine, image=scene(), control_type="depth", preprocessor="none")
    result = controlnet.generate(sd_engine, control_images=[edges, depth], control_types=["canny", "depth"],
                                 conditioning_scales=[1.0, 0.5], guidance_start=0.0, guidance_end=0.8, **RUN)
    assert result.images[0].size == (64, 64) and result.params["conditioning_scales"] == [1.0, 0.5]
    assert len(result.previews) == 2


def test_controlnet_validation(shapes_engine, sd_inpaint_engine):
    edges = Image.new("RGB", (64, 64))
    with pytest.raises(InputError, match="control_types has 3 entries"):
        controlnet.generate(shapes_engine, control_images=[edges] * 3, control_types=["canny", "depth", "pose"], **RUN)
    with pytest.raises(InputError, match="need 2 control image"):
        controlnet.generate(shapes_engine, control_images=[edges], control_types=["canny", "depth"], **RUN)
    with pytest.raises(InputError, match="guidance_start=0.9 must be below guidance_end=0.5"):
        controlnet.generate(shapes_engine, control_images=edges, control_types="canny", guidance_start=0.9,
                            guidance_end=0.5, **RUN)
    with pytest.raises(InputError, match="conditioning_scale=5 is above the limit of 2"):
        controlnet.generate(shapes_engine, control_images=edges, control_types="canny", conditioning_scales=5, **RUN)
    with pytest.raises(InputError, match="low_threshold=300 is above the limit of 255"):
        controlnet.preprocess(shapes_engine, image=scene(), control_type="canny", low_threshold=300)
    with pytest.raises(InputError, match="has no ControlNet for model tiny-sd-inpainting"):
        controlnet.generate(sd_inpaint_engine, control_images=edges, control_types="canny", **RUN)


def test_missing_learned_annotator_is_a_clear_error(shapes_engine):
    from pipelines.common import ModelError

    with pytest.raises(ModelError, match="no depth annotator|upload a ready depth map"):
        controlnet.preprocess(shapes_engine, image=scene(), control_type="depth")


def test_cancel_in_other_tasks(shapes_engine):
    cancel = threading.Event()

    def stop(i, n, preview):
        cancel.set()

    with pytest.raises(Cancelled):
        inpaint.inpaint(
            shapes_engine, image=scene(), mask=centre_mask(), **{**RUN, "steps": 10}, on_step=stop, cancel=cancel
        )
    cancel.clear()
    with pytest.raises(Cancelled):
        style.stylize(
            shapes_engine, image=scene(), style="flat", seed=1, steps=10, guidance=4.0, on_step=stop, cancel=cancel
        )
