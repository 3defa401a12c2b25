"""Presets resolve by name or local folder; unknown values and missing weights fail with clear messages."""
import dataclasses
import time
from pathlib import Path

import pytest

from pipelines.common import ModelError, ModelNotAvailable
from pipelines.registry import PRESETS, REPO_ROOT, ModelPreset, resolve_preset

BUILTIN = REPO_ROOT / "assets" / "models" / "shapes-ldm"


def test_named_presets():
    shapes = resolve_preset("shapes")
    assert shapes.is_builtin and Path(shapes.base) == BUILTIN
    assert (shapes.default_size, shapes.max_size) == (64, 128)
    assert shapes.style_presets["striped"] == "in striped style" and len(shapes.style_presets) == 5
    # built-in ControlNets appear only once their folders exist
    for control, path in shapes.controlnets.items():
        assert (Path(path) / "config.json").is_file() and control in ("canny", "depth", "pose")
    sd = resolve_preset("sd15")
    assert sd.base == "stable-diffusion-v1-5/stable-diffusion-v1-5" and sd.default_size == 512
    assert sd.controlnets == {"canny": "lllyasviel/control_v11p_sd15_canny",
                              "depth": "lllyasviel/control_v11f1p_sd15_depth",
                              "pose": "lllyasviel/control_v11p_sd15_openpose"}
    assert {"oil painting", "watercolor", "pencil sketch", "ukiyo-e", "van gogh"} <= set(sd.style_presets)
    assert "LCM" not in sd.scheduler_names
    lcm = resolve_preset("sd15-lcm")
    assert lcm.lora == "latent-consistency/lcm-lora-sdv1-5" and lcm.default_steps == 4
    assert lcm.default_guidance == 1.0 and lcm.default_scheduler == "LCM" and "LCM" in lcm.scheduler_names
    assert resolve_preset("sd15-inpainting").base == "stable-diffusion-v1-5/stable-diffusion-inpainting"
    assert set(PRESETS) >= {"shapes", "shapes-lcm", "shapes-v2", "sd15", "sd15-lcm", "sd15-inpainting"}


def test_every_preset_names_known_schedulers():
    from pipelines.schedulers import SCHEDULERS

    for preset in PRESETS.values():
        assert preset.default_scheduler in preset.scheduler_names
        assert set(preset.scheduler_names) <= set(SCHEDULERS)
        assert isinstance(hash(preset), int)  # frozen presets can key caches


def test_unknown_names_are_refused_clearly(tmp_path):
    with pytest.raises(ValueError,
                       match=r"unknown model 'sd99': use one of the presets shapes, shapes-lcm, shapes-v2, sd15"):
        resolve_preset("sd99")
    with pytest.raises(ValueError, match="without model_index.json"):
        resolve_preset(str(tmp_path))


def test_local_folder_becomes_an_ad_hoc_preset(tiny_paths):
    shapes = resolve_preset(str(tiny_paths["shapes"]))
    assert shapes.name == "shapes-like" and shapes.default_size == 64 and not shapes.is_builtin
    sd = resolve_preset(str(tiny_paths["sd"]))
    assert sd.default_size == 64  # sample_size 8 latents * f 8
    assert isinstance(sd, ModelPreset) and sd.controlnets == {}


def test_schedulers_are_built_from_the_model_config(tiny_paths):
    import json

    from pipelines.schedulers import SCHEDULERS, make_scheduler

    config = json.loads((tiny_paths["sd"] / "scheduler" / "scheduler_config.json").read_text())
    for name in SCHEDULERS:
        scheduler = make_scheduler(name, config)
        assert scheduler.config.num_train_timesteps == 1000
        assert scheduler.config.beta_schedule == "scaled_linear"  # the model's betas carried over
    assert make_scheduler("DPM++ 2M Karras", config).config.use_karras_sigmas is True
    assert make_scheduler("DPM++ 2M", {**config, "use_karras_sigmas": True}).config.use_karras_sigmas is False
    assert make_scheduler("DDIM", config).config.clip_sample is False


def test_missing_hub_weights_offline_name_the_model_and_the_fix(monkeypatch, tmp_path):
    from pipelines.engine import Engine

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelNotAvailable) as info:
        Engine(PRESETS["sd15"], device="cpu")
    message = str(info.value)
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in message
    assert "python app.py --download sd15" in message
    assert time.monotonic() - start < 30  # offline fails fast, no network retries
    assert isinstance(info.value, ModelError)


def test_missing_hub_controlnet_is_clear_and_engine_keeps_working(tiny_presets):
    from pipelines import txt2img
    from pipelines.engine import Engine

    preset = dataclasses.replace(tiny_presets["shapes"], controlnets={"canny": "lllyasviel/control_v11p_sd15_canny"})
    engine = Engine(preset, device="cpu")
    with pytest.raises(ModelNotAvailable, match="lllyasviel/control_v11p_sd15_canny.*--download"):
        engine.controlnet("canny")
    assert txt2img.generate(engine, prompt="a red circle", seed=1, steps=1, guidance=1.0).images


def test_missing_builtin_model_says_how_to_get_it(tmp_path):
    from pipelines.engine import Engine

    preset = dataclasses.replace(PRESETS["shapes"], base=str(tmp_path / "shapes-ldm"))
    with pytest.raises(ModelNotAvailable, match="built-in Shapes model is not at .*train it"):
        Engine(preset, device="cpu")


def test_missing_inpaint_model_falls_back_to_latent_blending(tiny_presets):
    from pipelines.engine import Engine

    preset = dataclasses.replace(tiny_presets["sd"], inpaint_model="stable-diffusion-v1-5/stable-diffusion-inpainting")
    engine = Engine(preset, device="cpu")
    assert engine.inpaint_unet() is None
    assert engine.pipeline("inpaint").unet is engine.base.unet


@pytest.mark.skipif(not (BUILTIN / "model_index.json").is_file(),
                    reason="the built-in model is not trained yet (assets/models/shapes-ldm missing)")
def test_builtin_model_generates_in_two_steps():
    from pipelines import txt2img
    from pipelines.engine import Engine

    engine = Engine(resolve_preset("shapes"), device="cpu")
    result = txt2img.generate(engine, prompt="a red circle on grass", seed=0, steps=2, guidance=4.0)
    assert result.images[0].size == (64, 64) and result.params["model"] == "shapes"
    assert engine.unknown_words("a red circle on grass") == []
    assert engine.unknown_words("a red dragon") == ["dragon"]


def test_distilled_builtin_model_runs_four_lcm_steps_without_a_cfg_pass():
    """shapes-lcm: the built-in model distilled (training/train_lcm.py); the guidance scale goes into the U-Net, so
    a step is one U-Net pass of batch 1, and the scale changes the image."""
    from pipelines import txt2img
    from pipelines.engine import Engine

    preset = resolve_preset("shapes-lcm")
    assert preset.is_builtin and Path(preset.base) == REPO_ROOT / "assets" / "models" / "shapes-lcm"
    assert (preset.default_steps, preset.default_scheduler, preset.inpaint_model) == (4, "LCM", None)
    engine = Engine(preset, device="cpu", threads=1)
    assert engine.base.unet.config.time_cond_proj_dim
    batches = []
    hook = engine.base.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        first = txt2img.generate(engine, prompt="a red circle on grass", seed=0, steps=4, guidance=2.5)
    finally:
        hook.remove()
    assert batches == [1, 1, 1, 1]  # one pass a step, no unconditional half
    assert first.params["scheduler"] == "LCM" and first.params["model"] == "shapes-lcm"
    other = txt2img.generate(engine, prompt="a red circle on grass", seed=0, steps=4, guidance=4.0)
    assert first.images[0].tobytes() != other.images[0].tobytes()


def test_a_folder_with_a_distilled_unet_defaults_to_lcm_steps(tmp_path):
    import json
    import shutil

    folder = tmp_path / "student"
    shutil.copytree(BUILTIN, folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "time_cond_proj_dim": 64}))
    preset = resolve_preset(str(folder))
    assert (preset.default_steps, preset.default_scheduler) == (4, "LCM") and "LCM" in preset.scheduler_names
    assert resolve_preset(str(BUILTIN)).default_scheduler != "LCM"


def _hub_engine(name):
    from pipelines.engine import Engine

    try:
        return Engine(resolve_preset(name))
    except ModelNotAvailable as error:
        pytest.skip(f"hub weights not in the local cache: {error}")


@pytest.mark.hub
@pytest.mark.slow
def test_hub_sd15_txt2img_and_controlnet():
    from pipelines import controlnet, txt2img

    engine = _hub_engine("sd15")
    result = txt2img.generate(
        engine, prompt="a red apple on a table", seed=0, steps=4, guidance=7.0, width=512, height=512
    )
    assert result.images[0].size == (512, 512)
    edges = controlnet.preprocess(engine, image=result.images[0], control_type="canny")
    out = controlnet.generate(engine, control_images=edges, control_types="canny", prompt="a green apple",
                              seed=0, steps=4, guidance=7.0)
    assert out.images[0].size == (512, 512)


@pytest.mark.hub
@pytest.mark.slow
def test_hub_sd15_lcm_four_steps():
    from pipelines import txt2img

    engine = _hub_engine("sd15-lcm")
    result = txt2img.generate(engine, prompt="a lighthouse at dusk", seed=0, steps=4, guidance=1.0, scheduler="LCM")
    assert result.images[0].size == (512, 512)
