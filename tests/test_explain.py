"""The Explain tab: what it records (shapes, noise levels, x̂0, attention, guidance, FLOPs, code), that watching
changes nothing (bit-identical images, the shared U-Net restored), its API endpoints and its page."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from gradio_client import handle_file
from PIL import Image

from pipelines import explain, inpaint, txt2img
from pipelines.common import Cancelled, InputError

RUN = dict(prompt="a red circle left of a blue square", negative_prompt="", seed=11, steps=3, guidance=4.0)


def probes_state(engine) -> tuple:
    """Every place a probe could be left behind: processors and forward hooks of the shared modules."""
    base = engine.base
    processors = tuple(id(p) for p in base.unet.attn_processors.values())
    hooks = tuple(len(getattr(m, name)) for m in (base.unet, base.text_encoder, base.vae.decoder)
                  for name in ("_forward_hooks", "_forward_pre_hooks"))
    return processors, hooks


@pytest.fixture(scope="module")
def shapes_run(shapes_engine):
    return explain.explain(shapes_engine, **RUN, guidance_strip=(1.0, 4.0, 7.5))


def test_shapes_of_every_output(shapes_engine, shapes_run):
    e = shapes_run.explanation
    f = shapes_engine.vae_scale_factor
    size = shapes_engine.preset.default_size
    h = w = size // f
    steps = RUN["steps"]
    assert [im.size for im in shapes_run.images] == [(size, size)]
    assert e.steps == steps and e.timesteps.shape == e.sigmas.shape == e.alpha_bars.shape == (steps,)
    assert e.latents.shape == e.x0_latents.shape == e.eps_cond.shape == e.eps_uncond.shape == (steps, 4, h, w)
    assert e.final_latent.shape == (4, h, w)
    for images in (e.x0_images, e.x0_cond_images, e.x0_uncond_images):
        assert [im.size for im in images] == [(size, size)] * steps
    assert e.tokens == RUN["prompt"].split()  # the word-level tokenizer: one token per word
    assert e.attention.shape == (steps, len(e.tokens), h, w) and e.attention_layers > 0
    assert [scale for scale, _ in e.strip] == [1.0, 4.0, 7.5]
    assert all(im.size == (size, size) for _, im in e.strip)
    assert e.strip[1][1].tobytes() == shapes_run.images[0].tobytes()  # guidance 4 is the run itself
    assert len(e.schedule["t"]) == len(e.schedule["alpha_bar"]) == 1000
    assert set(e.timings) >= {"text_encoder", "unet", "vae_decode", "unet_per_step", "total", "other"}
    assert e.timings["unet"] > 0 and e.timings["vae_decode"] > 0 and e.timings["text_encoder"] > 0
    assert e.timings["total"] >= e.timings["unet"] + e.timings["vae_decode"]
    assert shapes_run.params["task"] == "txt2img" and shapes_run.params["batch_size"] == 1


def test_noise_levels_follow_the_schedule(shapes_run):
    e = shapes_run.explanation
    assert np.all(np.diff(e.timesteps) < 0) and np.all(np.diff(e.sigmas) < 0)  # denoising goes down in t and σ
    assert np.all(np.diff(e.alpha_bars) > 0) and np.all((e.alpha_bars > 0) & (e.alpha_bars < 1))
    np.testing.assert_allclose(e.alpha_bars, 1 / (1 + e.sigmas.astype(np.float64) ** 2), rtol=1e-5)
    table = np.asarray(e.schedule["alpha_bar"])
    # DPM++ 2M without Karras spacing samples the training schedule exactly at the integer timesteps
    np.testing.assert_allclose(e.alpha_bars, table[e.timesteps.astype(int)], rtol=1e-4)


@pytest.mark.parametrize("scheduler", ["DPM++ 2M", "DDIM", "Euler a"])
def test_x0_at_the_last_step_is_the_final_latent(shapes_engine, scheduler):
    e = explain.explain(shapes_engine, **{**RUN, "steps": 4}, scheduler=scheduler, guidance_strip=()).explanation
    # the last step removes the remaining noise: what it predicts as x0 is (up to rounding) what it returns
    np.testing.assert_allclose(e.x0_latents[-1], e.final_latent, atol=5e-3 * np.abs(e.final_latent).max())
    # earlier predictions differ: they were made from noisier latents
    assert np.abs(e.x0_latents[0] - e.final_latent).max() > 10 * np.abs(e.x0_latents[-1] - e.final_latent).max()


@pytest.mark.parametrize("engine_name,scheduler", [("shapes_engine", "DPM++ 2M"), ("shapes_engine", "Euler a"),
                                                    ("sd_engine", "DPM++ 2M Karras")])
def test_watching_leaves_the_image_and_the_shared_unet_unchanged(request, engine_name, scheduler):
    engine = request.getfixturevalue(engine_name)
    before = probes_state(engine)
    watched = explain.explain(engine, **RUN, scheduler=scheduler, guidance_strip=())
    assert probes_state(engine) == before  # the very same processor objects, no hooks left
    plain = txt2img.generate(engine, **RUN, scheduler=scheduler)
    assert watched.images[0].tobytes() == plain.images[0].tobytes()
    assert watched.explanation.attention is not None and watched.explanation.attention.any()


def test_probes_are_removed_after_cancel_and_errors(shapes_engine):
    before = probes_state(shapes_engine)

    class CancelAfterFirstStep:
        steps = 0

        def is_set(self):
            return self.steps >= 1

    cancel = CancelAfterFirstStep()

    def on_step(step, total, preview):
        cancel.steps = step

    with pytest.raises(Cancelled):
        explain.explain(shapes_engine, **{**RUN, "steps": 5}, guidance_strip=(), on_step=on_step, cancel=cancel)
    assert probes_state(shapes_engine) == before

    def failing_step(step, total, preview):
        raise RuntimeError("the UI went away")

    with pytest.raises(RuntimeError, match="went away"):
        explain.explain(shapes_engine, **RUN, guidance_strip=(), on_step=failing_step)
    assert probes_state(shapes_engine) == before
    # the lock was released: another thread can run the model now
    done = []
    worker = threading.Thread(target=lambda: done.append(txt2img.generate(shapes_engine, **RUN)))
    worker.start()
    worker.join(timeout=120)
    assert done


def test_attention_is_a_distribution_over_tokens_at_every_position(shapes_engine):
    """With every token kept, the maps of one step sum to (heads x cross-attention layers) everywhere:
    softmax rows, placed on the right grid, upsampled without losing mass."""
    engine = shapes_engine
    request = txt2img.txt2img_request(engine, **RUN)
    with explain.Probe(engine, cfg=True, keep_tokens=None) as probe:
        explain.run_pipeline(engine, request)
    from diffusers.models.attention_processor import Attention

    heads = sum(m.heads for m in engine.base.unet.modules() if isinstance(m, Attention) and m.is_cross_attention)
    for step_maps in probe.attention:
        total = step_maps.sum(0).numpy()  # (h, w)
        np.testing.assert_allclose(total, heads, rtol=1e-4)


def test_guidance_one_has_no_unconditional_prediction(shapes_engine):
    from demo import explain as ui

    result = explain.explain(shapes_engine, **{**RUN, "guidance": 1.0}, guidance_strip=())
    e = result.explanation
    assert e.eps_uncond is None and e.x0_uncond_images == []
    data = {"explanation": e, "image": result.images[0], "params": result.params, "device": "cpu"}
    views = ui.guidance_view(data, 1)
    assert views[0] is None and views[1] is not None and "skips classifier-free guidance" in views[-1]
    assert "(×2)" not in ui.cost_markdown(data) and e.flops["evaluations_per_step"] == 1


def test_flops_latent_vs_pixel(shapes_engine, sd_engine):
    for engine in (shapes_engine, sd_engine):
        size = engine.preset.default_size
        flops = explain.flop_counts(engine, width=size, height=size, steps=10, cfg=True)
        f = engine.vae_scale_factor
        assert flops["area_ratio"] == f * f
        # convolutions scale with the area, self-attention with its square: at least f² more per step
        assert flops["ratio"] >= flops["area_ratio"] * 0.95, flops
        assert flops["ratio"] < flops["area_ratio"] * 50, flops
        assert flops["pixel_run"] == 10 * 2 * flops["unet_pixel"]
        assert flops["latent_run"] == 10 * 2 * flops["unet_latent"] + flops["vae_decode"]
        assert flops["run_ratio"] > 1


def test_code_snippet_compiles_names_the_scheduler_and_reproduces_the_image(shapes_engine, tmp_path):
    result = explain.explain(shapes_engine, **RUN, scheduler="DDIM", guidance_strip=())
    code = result.explanation.code
    compile(code, "snippet.py", "exec")
    assert "DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)" in code
    assert "manual_seed(11)" in code and "num_inference_steps=3" in code and "guidance_scale=4.0" in code
    assert repr(shapes_engine.preset.base) in code
    for name, (cls, _) in explain.SCHEDULERS.items():
        if name != "LCM":
            assert f"{cls.__name__}.from_config" in explain.code_snippet(
                shapes_engine, {**result.params, "scheduler": name}
            )
    assert f"torch.set_num_threads({shapes_engine.threads})" in code  # the app's thread count, not torch's default
    # run it as a user would, in a fresh interpreter with torch's default threads: the same image
    (tmp_path / "snippet.py").write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {"HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
    with Image.open(tmp_path / "result.png") as im:
        assert im.convert("RGB").tobytes() == result.images[0].tobytes()


def test_bad_inputs_are_named(shapes_engine):
    with pytest.raises(InputError, match="guidance_strip has 7 scales"):
        explain.explain(shapes_engine, **RUN, guidance_strip=(1, 2, 3, 4, 5, 6, 7))
    with pytest.raises(InputError, match="guidance_strip=99 is above the limit"):
        explain.explain(shapes_engine, **RUN, guidance_strip=(99,))
    with pytest.raises(InputError, match="steps=0"):
        explain.explain(shapes_engine, **{**RUN, "steps": 0})


def test_inpainting_in_latent_space(shapes_engine):
    from tests.conftest import scene_image

    scene = scene_image()
    mask = Image.new("L", scene.size, 0)
    mask.paste(255, (32, 0, 64, 64))  # right half
    args = dict(image=scene, mask=mask, prompt="a yellow star", seed=3, steps=3, guidance=4.0, mask_blur=0)
    before = probes_state(shapes_engine)
    watched = explain.explain_inpaint(shapes_engine, **args)
    assert probes_state(shapes_engine) == before
    plain = inpaint.inpaint(shapes_engine, **args)
    assert watched.images[0].tobytes() == plain.images[0].tobytes()
    e = watched.explanation
    f = shapes_engine.vae_scale_factor
    expected = np.zeros((64 // f, 64 // f))
    expected[:, 32 // f:] = 1
    np.testing.assert_array_equal(e.latent_mask, expected)  # the mask, shrunk to the latent grid
    assert e.latents.shape == (3, 4, 64 // f, 64 // f) and len(e.x0_images) == 3
    assert e.image_mask.size == e.input_image.size == (64, 64)


def test_ui_renders_every_view(shapes_engine, shapes_run):
    from demo import explain as ui

    e = shapes_run.explanation
    data = {"explanation": e, "image": shapes_run.images[0], "params": shapes_run.params, "device": "cpu"}
    latent, x0, text = ui.trajectory_view(data, 2)
    h = e.latents.shape[-1]
    block = h * max(1, -(-ui.CHANNEL_PX // h))
    assert latent.size == (4 * block + 3 * 4, block)  # 4 channels side by side
    assert ui.guidance_view(data, 1)[0].size == (2 * block + 4, 2 * block + 4)  # 2 x 2 channels
    assert min(x0.size) >= ui.IMAGE_PX and "Step 2 of 3" in text
    assert len(ui.filmstrip(data)) == 3
    maps = ui.attention_maps(data, 1, 3)
    assert [caption.split(" · ")[0] for _, caption in maps] == e.tokens
    shares = [float(caption.split(" · ")[1].rstrip("%")) for _, caption in maps]
    assert abs(sum(shares) - 100) <= len(shares)  # rounded percentages of one whole
    views = ui.guidance_view(data, 1)
    assert all(v is not None for v in views[:6]) and "ε̂_uncond + 4" in views[-1]
    assert [caption for _, caption in ui.strip_gallery(data)][0].startswith("guidance 1")
    frame, cutoff = ui.schedule_frame(e.schedule, e.timesteps, e.alpha_bars, 0.6)
    start = frame[frame["curve"].str.startswith("img2img")]
    # 3 steps at strength 0.6: int(3 * 0.6) = 1 step runs, so img2img starts at the last timestep
    assert list(start["t"]) == [e.timesteps[2]] * 2 and "skips the first 2" in cutoff
    assert len(ui.run_noise_frame(data)) == 2 * 3
    cost = ui.cost_markdown(data)
    assert "FLOP" in cost and f"{e.flops['ratio']:.1f}×" in cost
    assert set(ui.render(data, 0.6)) == set(ui.EXPLAIN_VIEWS)  # every view the endpoint returns has a value


# --- through the live app --------------------------------------------------------------------------------------

def test_explain_endpoint(client, live_app):
    args = dict(prompt="a red circle", negative_prompt="", seed=5, steps=3, guidance=4.0, scheduler="DDIM",
                width=64, height=64)
    from demo.explain import EXPLAIN_OUTPUTS

    out = client.predict(**args, guidance_strip=[1.0, 4.0], strength=0.5, api_name="/explain")
    assert len(out) == len(EXPLAIN_OUTPUTS)
    out = dict(zip(EXPLAIN_OUTPUTS, out))
    assert out["status"].startswith("Done") and out["params"]["seed"] == 5 and out["params"]["scheduler"] == "DDIM"
    plain = client.predict(**args, batch_size=1, api_name="/txt2img")
    with open(out["gallery"][0]["image"], "rb") as a, open(plain[1][0]["image"], "rb") as b:
        assert a.read() == b.read()  # the same PNG as Text to image, metadata included
    assert out["step"]["maximum"] == 3 and "Step 3 of 3" in out["noise_level"] and len(out["x0_per_step"]) == 3
    with Image.open(out["latent"]) as im:
        assert im.width > 3 * im.height  # four channels side by side
    assert [item["caption"].split(" · ")[0] for item in out["attention_per_word"]] == ["a", "red", "circle"]
    assert [item["caption"].split(" · ")[0] for item in out["guidance_strip"]] == ["guidance 1", "guidance 4"]
    assert "FLOP" in out["cost"] and "DDIMScheduler" in out["code"]
    compile(out["code"], "snippet.py", "exec")


def test_the_readme_names_the_explain_outputs_in_order():
    import ast
    import re

    from demo.explain import EXPLAIN_INPAINT_OUTPUTS, EXPLAIN_OUTPUTS

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for name, names in (("EXPLAIN_OUTPUTS", EXPLAIN_OUTPUTS), ("EXPLAIN_INPAINT_OUTPUTS", EXPLAIN_INPAINT_OUTPUTS)):
        found = re.search(rf"^{name} = (\(.*?\))$", readme, re.MULTILINE | re.DOTALL)
        assert found, f"README.md has no '{name} = (...)' line"
        assert ast.literal_eval(found.group(1)) == names


def test_explain_inpaint_endpoint(client, images):
    out = client.predict(image={"background": handle_file(str(images["scene.png"])), "layers": [], "composite": None,
                                "id": None},
                         mask=handle_file(str(images["mask_right_half.png"])), inpaint_prompt="a yellow star",
                         prompt="", strength=1.0, negative_prompt="", seed=2, steps=3, guidance=4.0,
                         scheduler="DPM++ 2M", api_name="/explain_inpaint")
    from demo.explain import EXPLAIN_INPAINT_OUTPUTS

    assert len(out) == len(EXPLAIN_INPAINT_OUTPUTS)
    out = dict(zip(EXPLAIN_INPAINT_OUTPUTS, out))
    assert out["status"].startswith("Done") and "Step 1 of 3" in out["step_text"]
    with Image.open(out["mask_latent"]) as im:
        grid = np.asarray(im.convert("L"))
    assert grid[:, : grid.shape[1] // 2 - 8].max() == 0 and grid[:, grid.shape[1] // 2 + 8:].min() == 255


def test_explain_endpoint_refuses_bad_values(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="(?i)steps"):
        client.predict(prompt="a red circle", negative_prompt="", seed=5, steps=0, guidance=4.0, scheduler="DDIM",
                       width=64, height=64, guidance_strip=[], strength=0.5, api_name="/explain")


# --- in the browser -------------------------------------------------------------------------------------------------

@pytest.mark.browser
def test_explain_tab_in_the_browser(live_app, test_output):
    from tests.test_browser import chromium_page, open_settings, set_number

    with chromium_page(live_app.url) as page:
        page.get_by_role("tab", name="Explain").click()
        page.fill("#explain-prompt textarea", "a red circle left of a blue square")
        open_settings(page, "explain")
        set_number(page, "explain-steps", 6)
        set_number(page, "explain-seed", 5)
        page.locator("#explain-generate").click()
        page.wait_for_function("() => (document.querySelector('#explain-status')?.innerText || '').startsWith('Done')",
                               timeout=180_000)
        page.locator("#explain-x0 img").first.wait_for()
        assert "Step 6 of 6" in page.locator("#explain-noise").inner_text()
        set_number(page, "explain-step", 2)  # scrub back: the views follow without another run
        page.wait_for_function("() => document.querySelector('#explain-noise').innerText.includes('Step 2 of 6')")
        assert page.locator("#explain-attention img").count() == 8  # one overlay per word
        page.locator("#explain-code-button").click()
        page.locator("#explain-code").get_by_text("StableDiffusionPipeline.from_pretrained").wait_for()
        page.wait_for_timeout(1000)
        page.screenshot(path=str(test_output / "browser-explain.png"), full_page=True)


def test_empty_prompt_and_a_nine_channel_model(shapes_engine, sd_inpaint_engine):
    empty = explain.explain(shapes_engine, **{**RUN, "prompt": ""}, guidance_strip=())
    assert empty.explanation.tokens == [] and empty.explanation.attention.shape[1] == 0
    # a dedicated inpainting U-Net makes text-to-image by inpainting a blank canvas, as txt2img does
    args = {**RUN, "prompt": "a cat"}
    watched = explain.explain(sd_inpaint_engine, **args, width=64, height=64, guidance_strip=())
    plain = txt2img.generate(sd_inpaint_engine, **args, width=64, height=64)
    assert watched.images[0].tobytes() == plain.images[0].tobytes()
    e = watched.explanation
    assert e.latents.shape[1] == 4 and e.tokens == ["a", "c", "a", "t"]  # CLIP BPE over single letters
    assert "StableDiffusionInpaintPipeline" in e.code
    compile(e.code, "snippet.py", "exec")


def test_predict_x0_recovers_the_clean_latents_from_the_true_target():
    """x̂0 from a U-Net output (Explain's side views, evaluate_inpaint --one-step): given the true v (or epsilon) it
    must give back exactly what was noised, and a wrong prediction must not."""
    import torch
    from diffusers import DDPMScheduler

    from pipelines.explain import predict_x0

    for prediction_type in ("v_prediction", "epsilon"):
        scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  prediction_type=prediction_type)
        clean, noise = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
        for t in (20, 50, 400):
            noisy = scheduler.add_noise(clean, noise, torch.tensor([t]))
            target = scheduler.get_velocity(clean, noise, torch.tensor([t])) if prediction_type == "v_prediction" \
                else noise
            alpha_bar = float(scheduler.alphas_cumprod[t])
            assert torch.allclose(predict_x0(noisy, target, alpha_bar, prediction_type), clean, atol=1e-4)
            assert not torch.allclose(predict_x0(noisy, target + 0.5, alpha_bar, prediction_type), clean, atol=1e-2)
