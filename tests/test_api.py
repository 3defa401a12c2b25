"""Every endpoint of the real app, called with gradio_client over HTTP, on the built-in (or tiny) model."""
from __future__ import annotations

import numpy as np
import pytest
from gradio_client import handle_file
from PIL import Image

from pipelines.common import params_from_png

STEPS = 3  # enough for every scheduler; the tests check plumbing and behaviour, not beauty
ENDPOINTS = ("/txt2img", "/inpaint", "/outpaint", "/style", "/controlnet", "/preprocess", "/restore_params")


def common_args(**overrides):
    args = dict(negative_prompt="", seed=7, steps=STEPS, guidance=4.0, scheduler="DPM++ 2M", batch_size=1)
    args.update(overrides)
    return args


def gallery_paths(gallery) -> list[str]:
    return [item["image"] if isinstance(item, dict) else item[0] for item in gallery]


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def editor(background, layer=None) -> dict:
    return {"background": handle_file(str(background)), "layers": [handle_file(str(layer))] if layer else [],
            "composite": None, "id": None}


def test_every_endpoint_has_a_stable_api_name(client):
    names = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    assert set(ENDPOINTS) <= names, names


def test_txt2img_size_batch_and_metadata(client):
    preview, gallery, params, status = client.predict(prompt="a red circle", width=64, height=48,
                                                      **common_args(batch_size=2), api_name="/txt2img")
    paths = gallery_paths(gallery)
    assert len(paths) == 2
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (64, 48)
            stored = params_from_png(im)  # the metadata survived gradio's cache and the HTTP download
        assert stored["seed"] == 7 + i and stored["prompt"] == "a red circle" and stored["steps"] == STEPS
    assert params["seed"] == 7 and params["width"] == 64 and params["height"] == 48
    assert "seed 7" in status


def test_same_seed_gives_identical_bytes(client):
    runs = [client.predict(prompt="a blue square", width=64, height=64, **common_args(seed=123), api_name="/txt2img")
            for _ in range(2)]
    first, second = (gallery_paths(r[1])[0] for r in runs)
    with open(first, "rb") as a, open(second, "rb") as b:
        assert a.read() == b.read()
    other = client.predict(prompt="a blue square", width=64, height=64, **common_args(seed=124), api_name="/txt2img")
    assert not np.array_equal(pixels(first), pixels(gallery_paths(other[1])[0]))


def test_random_seed_is_reported(client):
    _, gallery, params, status = client.predict(prompt="a star", width=64, height=64, **common_args(seed=-1),
                                                api_name="/txt2img")
    assert 0 <= params["seed"] < 2**32
    assert f"seed {params['seed']}" in status
    with Image.open(gallery_paths(gallery)[0]) as im:
        assert params_from_png(im)["seed"] == params["seed"]


def test_restore_params_reads_our_png(client):
    _, gallery, params, _ = client.predict(prompt="a green heart", width=64, height=64, **common_args(seed=99),
                                           api_name="/txt2img")
    restored = client.predict(handle_file(gallery_paths(gallery)[0]), api_name="/restore_params")
    assert restored["seed"] == 99 and restored["prompt"] == "a green heart" and restored["scheduler"] == "DPM++ 2M"


def test_inpaint_keeps_unmasked_pixels(client, images):
    _, gallery, params, _ = client.predict(
        image=editor(images["scene.png"]), prompt="a yellow star", strength=1.0, mask_blur=0,
        mask=handle_file(str(images["mask_right_half.png"])), **common_args(), api_name="/inpaint")
    out, original = pixels(gallery_paths(gallery)[0]), pixels(images["scene.png"])
    assert out.shape == original.shape
    assert np.array_equal(out[:, :32], original[:, :32])  # the left half was not masked
    assert not np.array_equal(out[:, 32:], original[:, 32:])
    assert params["task"] == "inpaint"


def test_inpaint_with_a_painted_layer(client, images, tmp_path):
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    layer.paste((255, 0, 255, 255), (0, 0, 24, 24))  # a stroke in the top-left corner, like the brush
    layer.save(tmp_path / "layer.png")
    _, gallery, _, _ = client.predict(image=editor(images["scene.png"], tmp_path / "layer.png"), prompt="a red circle",
                                      strength=1.0, mask_blur=0, mask=None, **common_args(), api_name="/inpaint")
    out, original = pixels(gallery_paths(gallery)[0]), pixels(images["scene.png"])
    assert np.array_equal(out[24:, :], original[24:, :]) and np.array_equal(out[:, 24:], original[:, 24:])
    assert not np.array_equal(out[:24, :24], original[:24, :24])


def test_outpaint_keeps_the_original(client, images):
    _, gallery, params, _ = client.predict(image=handle_file(str(images["scene.png"])), prompt="a red circle on grass",
                                           directions=["left", "bottom"], pixels=16, fill="edge", **common_args(),
                                           api_name="/outpaint")
    out, original = pixels(gallery_paths(gallery)[0]), pixels(images["scene.png"])
    assert out.shape == (64 + 16, 64 + 16, 3)
    band = 8  # pipelines.outpaint.OVERLAP: the band along each extended side where the original fades out
    assert np.array_equal(out[:64 - band, 16 + band:], original[:64 - band, band:])
    assert params["left"] == 16 and params["bottom"] == 16 and params["right"] == 0


@pytest.mark.parametrize("mode", ["img2img", "structure"])
def test_style(client, images, live_app, mode):
    if mode == "structure" and "canny" not in live_app.engine.control_types:
        pytest.skip("this model has no canny ControlNet")
    style = next(iter(live_app.engine.preset.style_presets))
    _, gallery, params, _ = client.predict(image=handle_file(str(images["scene.png"])), style=style, prompt="a circle",
                                           strength=0.6, mode=mode, control="canny", conditioning_scale=1.0,
                                           **common_args(), api_name="/style")
    assert pixels(gallery_paths(gallery)[0]).shape == (64, 64, 3)
    assert params["style"] == style and params["mode"] == mode


def test_preprocess_canny_and_ready_map(client, images, live_app):
    edges = client.predict(image=handle_file(str(images["scene.png"])), control_type="canny", preprocessor="canny",
                           low_threshold=100, high_threshold=200, api_name="/preprocess")
    edge_pixels = pixels(edges)
    assert edge_pixels.shape == (64, 64, 3) and set(np.unique(edge_pixels)) <= {0, 255} and edge_pixels.max() == 255
    # A ready map passes through unchanged, whichever control type it is declared as.
    control_type = "pose" if "pose" in live_app.engine.control_types else live_app.engine.control_types[0]
    ready = client.predict(
        image=handle_file(str(images["control_pose.png"])),
        control_type=control_type,
        preprocessor="none",
        low_threshold=100,
        high_threshold=200,
        api_name="/preprocess",
    )
    assert np.array_equal(pixels(ready), pixels(images["control_pose.png"]))


def controlnet_args(image, **overrides):
    args = dict(image=handle_file(str(image)), control_type="canny", preprocessor="canny", low_threshold=100,
                high_threshold=200, conditioning_scale=1.0, guidance_start=0.0, guidance_end=1.0, use_second=False,
                image_2=None, control_type_2="canny", preprocessor_2="none", conditioning_scale_2=0.5,
                prompt="a red circle at the top", **common_args())
    args.update(overrides)
    return args


def test_controlnet_one_and_two_controls(client, images, live_app):
    if not {"canny", "pose"} <= set(live_app.engine.control_types):
        pytest.skip("this model lacks the canny and pose ControlNets")
    _, gallery, params, _ = client.predict(**controlnet_args(images["scene.png"]), api_name="/controlnet")
    one = pixels(gallery_paths(gallery)[0])
    assert one.shape == (64, 64, 3)
    _, gallery, params2, _ = client.predict(
        **controlnet_args(
            images["scene.png"],
            use_second=True,
            control_type_2="pose",
            image_2=handle_file(str(images["control_pose.png"])),
        ),
        api_name="/controlnet",
    )
    two = pixels(gallery_paths(gallery)[0])
    assert two.shape == (64, 64, 3) and not np.array_equal(one, two)


def test_outpaint_starts_at_its_own_guidance(client):
    """The Outpaint tab's guidance default is the preset's own for it (chosen on inpainting validation), the other
    tabs keep the preset's; an API call that leaves guidance out gets the tab's default."""
    from pipelines.registry import resolve_preset

    preset = resolve_preset("shapes")
    assert preset.guidance_for("outpaint") != preset.default_guidance == preset.guidance_for("inpaint")
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    defaults = {name: {p["parameter_name"]: p.get("parameter_default") for p in endpoints[name]["parameters"]}
                for name in ("/outpaint", "/inpaint", "/txt2img")}
    assert defaults["/outpaint"]["guidance"] == preset.guidance_for("outpaint")
    assert defaults["/inpaint"]["guidance"] == defaults["/txt2img"]["guidance"] == preset.default_guidance


def test_pictures_run_at_the_models_height_and_other_heights_are_said(client, images, live_app):
    """On the built-in model (scenes 64 px tall): a 256 px upload to Style transfer runs at 64 px, and text to
    image 128 px tall says under the result that the model may draw the horizon twice; 128x64 says nothing."""
    if not live_app.engine.preset.picture_height:
        pytest.skip("this model has no picture height (the tiny random model)")
    style = next(iter(live_app.engine.preset.style_presets))
    _, gallery, params, _ = client.predict(image=handle_file(str(images["scene_256.png"])), style=style,
                                           prompt="a circle", strength=0.6, mode="img2img", control="canny",
                                           conditioning_scale=1.0, **common_args(), api_name="/style")
    assert pixels(gallery_paths(gallery)[0]).shape == (64, 64, 3) and (params["width"], params["height"]) == (64, 64)
    _, _, params, status = client.predict(prompt="a red circle", width=64, height=128, **common_args(),
                                          api_name="/txt2img")
    assert "64 px tall; at 128 px tall it often draws the horizon twice" in status and len(params["warnings"]) == 1
    _, _, params, status = client.predict(prompt="a red circle", width=128, height=64, **common_args(),
                                          api_name="/txt2img")
    assert "⚠" not in status and "warnings" not in params
