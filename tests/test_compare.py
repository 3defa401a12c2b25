"""The Compare tab: reading axes, limits, every cell equal to its own tab's image, Cancel within one step, the
/compare endpoint (cells restorable, grid downloadable) and the tab in the browser."""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
from gradio_client import handle_file
from PIL import Image

from pipelines import compare, controlnet, style, txt2img
from pipelines.common import InputError, params_from_png

BASE = dict(prompt="a red circle", negative_prompt="", seed=3, steps=2, guidance=4.0)


def test_axis_values_from_lists_and_ranges(shapes_engine):
    def values(name, text, prompt=""):
        return compare.axis_values(shapes_engine, name, text, prompt=prompt).values

    assert values("seed", "1-5") == [1, 2, 3, 4, 5]
    assert values("steps", "1-10 (+3)") == [1, 4, 7, 10]
    assert values("guidance", "1-7 [4]") == [1.0, 3.0, 5.0, 7.0]
    assert values("guidance", "1, 2.5,7.5") == [1.0, 2.5, 7.5]
    assert values("seed", "5-3") == [5, 4, 3]
    assert values("scheduler", "DDIM, Euler a") == ["DDIM", "Euler a"]
    assert values("prompt", "red -> blue, green", "a red circle") == ["a red circle", "a blue circle",
                                                                      "a green circle"]
    assert values("prompt", "red, blue", "a red circle") == ["a red circle", "a blue circle"]
    assert compare.axis_values(shapes_engine, "prompt", "red -> blue", prompt="a red circle").labels == ["red", "blue"]


@pytest.mark.parametrize("axis,text,message", [
    ("steps", "0, 2", "steps=0 is below the minimum of 1"),
    ("seed", "1, x", "seed value 'x' is not a whole number"),
    ("guidance", "1-99 [2]", "guidance=99 is above the limit of 30"),
    ("scheduler", "DDIM, Fancy", "scheduler='Fancy' is not one of"),
    ("prompt", "blue -> green", "prompt search term 'blue' is not in the prompt 'a red circle'"),
    ("seed", "", "seed values are empty"),
    ("colour", "1", "axis='colour' is not one of"),
])
def test_bad_axis_values_are_named(shapes_engine, axis, text, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compare.compare(shapes_engine, **BASE, x_axis=axis, x_values=text)


def test_limits_and_combinations_are_named(shapes_engine, monkeypatch):
    limits = dataclasses.replace(shapes_engine.limits, max_compare_cells=4, max_compare_pixels=3 * 64 * 64)
    monkeypatch.setattr(shapes_engine, "limits", limits)
    with pytest.raises(InputError, match=r"the grid has 6 cells \(3 x 2\), above the limit of 4"):
        compare.compare(shapes_engine, **BASE, x_axis="seed", x_values="1-3", y_axis="steps", y_values="1, 2")
    with pytest.raises(InputError, match=r"the grid's cells hold 16,384 pixels \(4 of 64x64\), above the limit of "
                                         r"12,288"):
        compare.compare(shapes_engine, **BASE, x_axis="seed", x_values="1-4")
    monkeypatch.undo()
    with pytest.raises(InputError, match="x_axis and y_axis are both 'seed'"):
        compare.compare(shapes_engine, **BASE, x_axis="seed", x_values="1", y_axis="seed", y_values="2")
    with pytest.raises(InputError, match="strength axis needs an input image"):
        compare.compare(shapes_engine, **BASE, x_axis="strength", x_values="0.5")
    with pytest.raises(InputError, match="conditioning_scale axis needs an input image and a control type"):
        compare.compare(shapes_engine, **BASE, x_axis="conditioning_scale", x_values="0.5")
    with pytest.raises(InputError, match="adapter_scale axis needs an adapter"):
        compare.compare(shapes_engine, **BASE, x_axis="adapter_scale", x_values="0.5")
    with pytest.raises(InputError, match="adapter='nope' is not loaded"):
        compare.compare(shapes_engine, **BASE, x_axis="adapter_scale", x_values="0.5", adapter="nope")


@pytest.mark.parametrize("engine_name", ["shapes_engine", "sd_engine"])
def test_every_cell_is_its_own_tabs_image(request, engine_name):
    engine = request.getfixturevalue(engine_name)
    cells = []
    result = compare.compare(engine, **BASE, width=64, height=64, x_axis="seed", x_values="1, 2", y_axis="guidance",
                             y_values="1, 4", on_cell=lambda i, image, params, grid: cells.append((i, grid.size)))
    assert [i for i, _ in cells] == [0, 1, 2, 3] and not result.cancelled
    for i, (seed, guidance) in enumerate([(1, 1.0), (2, 1.0), (1, 4.0), (2, 4.0)]):
        alone = txt2img.generate(engine, **{**BASE, "seed": seed, "guidance": guidance}, width=64, height=64)
        assert result.images[i].tobytes() == alone.images[0].tobytes(), i
        params = result.image_params(i)
        assert params["task"] == "txt2img" and params["seed"] == seed and params["guidance"] == guidance
        assert params["compare_cell"] == {"x": {"seed": str(seed)}, "y": {"guidance": f"{guidance:g}"}}
    # the grid: 2 x 2 enlarged cells under the X labels, right of the Y labels
    grid = np.asarray(result.grid)
    cell = compare.MIN_CELL_PX
    assert result.grid.width > 2 * cell and result.grid.height > 2 * cell
    assert (grid[:compare.LABEL_PX + 6] < 128).any()  # the axis title is written above the cells
    assert result.params["x_values"] == ["1", "2"] and result.params["y_values"] == ["1", "4"]


def test_img2img_and_controlnet_cells(shapes_engine):
    from tests.conftest import scene_image

    scene = scene_image()
    result = compare.compare(shapes_engine, **BASE, x_axis="strength", x_values="0.5, 1", image=scene)
    for i, strength in enumerate([0.5, 1.0]):
        alone = style.stylize(shapes_engine, image=scene, style="", **BASE, strength=strength, mode="img2img")
        assert result.images[i].tobytes() == alone.images[0].tobytes()
        assert result.image_params(i)["task"] == "style" and result.image_params(i)["strength"] == strength
    result = compare.compare(shapes_engine, **BASE, x_axis="conditioning_scale", x_values="0, 1.5", image=scene,
                             control_type="canny")
    edges = controlnet.preprocess(shapes_engine, image=scene, control_type="canny")
    for i, scale in enumerate([0.0, 1.5]):
        alone = controlnet.generate(shapes_engine, control_images=[edges], control_types=["canny"], **BASE,
                                    conditioning_scales=scale, width=64, height=64)
        assert result.images[i].tobytes() == alone.images[0].tobytes()
    assert result.images[0].tobytes() != result.images[1].tobytes()


def test_cancel_stops_the_grid_within_one_step(shapes_engine):
    """Cancel arrives while cell 2 of 3 is at its step 2: the U-Net runs no further step, and cell 1 is kept."""
    unet = shapes_engine.base.unet
    calls = []
    handle = unet.register_forward_pre_hook(lambda module, args: calls.append(1))

    class CancelAt:
        def __init__(self):
            self.flag = False

        def is_set(self):
            return self.flag

    cancel = CancelAt()
    steps = 4
    seen = []

    def on_step(step, total, preview=None):
        seen.append((step, total))
        if step == steps + 2:  # cell 2, step 2
            cancel.flag = True

    try:
        result = compare.compare(shapes_engine, **{**BASE, "steps": steps}, x_axis="seed", x_values="1-3",
                                 on_step=on_step, cancel=cancel)
    finally:
        handle.remove()
    assert seen[-1] == (steps + 2, 3 * steps)
    assert len(calls) == steps + 2  # one U-Net call per step (CFG runs both halves in one batch)
    assert len(result.images) == 1 and "cell 2 of 3" in result.cancelled
    assert result.params["cells_done"] == 1 and result.grid is not None


# --- through the live app --------------------------------------------------------------------------------------

def compare_args(**overrides):
    args = dict(prompt="a red circle", negative_prompt="", seed=5, steps=3, guidance=4.0, scheduler="DPM++ 2M",
                width=64, height=64, x_axis="guidance", x_values="1, 4", y_axis="seed", y_values="5, 6", image=None,
                control_type="none", strength=0.6, conditioning_scale=1.0, adapter="")
    args.update(overrides)
    return args


def test_compare_endpoint_cells_restore_and_grid_downloads(client):
    grid, gallery, params, status, grid_file = client.predict(**compare_args(), api_name="/compare")
    assert status.startswith("Done: 4 cells"), status
    paths = [item["image"] for item in gallery]
    assert len(paths) == 4 and [item["caption"] for item in gallery][1] == "guidance 4 · seed 5"
    with Image.open(grid_file) as im:
        assert im.format == "PNG" and params_from_png(im)["x_axis"] == "guidance"
    # a cell's PNG restores into Text to image, and Text to image makes the same bytes from it
    restored = client.predict(handle_file(paths[3]), api_name="/restore_params")
    assert restored["seed"] == 6 and restored["guidance"] == 4.0 and restored["task"] == "txt2img"
    again = client.predict(prompt=restored["prompt"], negative_prompt="", seed=restored["seed"],
                           steps=restored["steps"], guidance=restored["guidance"], scheduler=restored["scheduler"],
                           width=64, height=64, batch_size=1, api_name="/txt2img")
    with Image.open(paths[3]) as a, Image.open(again[1][0]["image"]) as b:
        assert a.tobytes() == b.tobytes()


def test_compare_endpoint_refuses_bad_values(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=r"the grid has 49 cells \(7 x 7\), above the limit of 36"):
        client.predict(**compare_args(x_values="1-7", y_values="1-7"), api_name="/compare")
    with pytest.raises(AppError, match="strength axis needs an input image"):
        client.predict(**compare_args(x_axis="strength", x_values="0.3, 0.6"), api_name="/compare")
    with pytest.raises(AppError, match="steps=0 is below the minimum of 1"):
        client.predict(**compare_args(x_axis="steps", x_values="0-2"), api_name="/compare")
    # and the app still serves
    assert client.predict(**compare_args(y_axis="none"), api_name="/compare")[3].startswith("Done: 2 cells")


def test_cancel_button_stops_the_grid(live_app):
    client = live_app.client()
    job = client.submit(**compare_args(steps=150, x_values="1-6", y_values="1-6"), api_name="/compare")
    deadline = time.time() + 120
    while time.time() < deadline and not any("step" in str(o[3]) for o in job.outputs() or []):
        time.sleep(0.2)
    assert client.predict(api_name="/cancel_compare") == "Cancelling…"
    status = job.result(timeout=120)[3]
    assert status.startswith("Cancelled at cell 1 of 36"), status


def test_compare_with_an_input_image(client, images):
    _, gallery, params, status, _ = client.predict(
        **compare_args(x_axis="strength", x_values="0.4, 0.8", y_axis="none",
                       image=handle_file(str(images["scene.png"]))), api_name="/compare")
    assert status.startswith("Done: 2 cells") and params["mode"] == "img2img"
    with Image.open(gallery[0]["image"]) as im:
        assert params_from_png(im)["task"] == "style" and params_from_png(im)["strength"] == 0.4


@pytest.mark.browser
def test_compare_tab_in_the_browser(live_app, test_output):
    from tests.test_browser import chromium_page, open_settings, set_number

    with chromium_page(live_app.url) as page:
        page.get_by_role("tab", name="Compare").click()
        page.fill("#compare-prompt textarea", "a big red circle on the left")
        page.fill("#compare-x-values input", "1, 4")
        page.fill("#compare-y-values input", "1-2")
        open_settings(page, "compare")
        set_number(page, "compare-steps", 4)
        page.locator("#compare-generate").click()
        page.wait_for_function("() => (document.querySelector('#compare-status')?.innerText || '').startsWith('Done')",
                               timeout=180_000)
        assert "4 cells" in page.locator("#compare-status").inner_text()
        page.locator("#compare-preview img").first.wait_for()
        assert page.locator("#compare-gallery img").count() == 4
        page.locator("#compare-grid-file a").first.wait_for()
        page.screenshot(path=str(test_output / "browser-compare.png"), full_page=True)
