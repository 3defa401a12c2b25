"""Engine: one shared model, request-scoped views, txt2img determinism, progress, cancel, failure recovery."""
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from pipelines import txt2img
from pipelines.common import Cancelled, InputError, ModelError
from pipelines.engine import TASKS, Engine

SETTINGS = dict(prompt="a red circle left of a blue square", seed=7, steps=3, guidance=4.0)


def pixels(image):
    return np.asarray(image)


def test_all_task_pipelines_share_the_same_modules(sd_engine):
    base = sd_engine.base
    views = [sd_engine.pipeline(t, scheduler="DDIM", controls=("canny",) if t.startswith("controlnet") else ())
             for t in TASKS]
    views.append(sd_engine.pipeline("controlnet", scheduler="Euler a", controls=("canny", "depth")))
    for view in views:
        assert view.unet is base.unet and view.vae is base.vae and view.text_encoder is base.text_encoder
        assert view.tokenizer is base.tokenizer
        assert view.scheduler is not base.scheduler  # request-scoped
    # the same control type is one object, also inside a MultiControlNetModel
    assert views[-1].controlnet.nets[0] is sd_engine.controlnet("canny")


def test_second_task_pipeline_loads_no_weights(tiny_presets, monkeypatch):
    from diffusers.models.modeling_utils import ModelMixin
    from transformers import PreTrainedModel

    engine = Engine(tiny_presets["sd"], device="cpu")
    engine.pipeline("img2img", scheduler="DDIM")  # first task pipeline after the base
    loads = []
    for cls in (ModelMixin, PreTrainedModel):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            loads.append(klass.__name__)
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    for task in ("txt2img", "img2img", "inpaint"):
        engine.pipeline(task, scheduler="UniPC")
    assert loads == []
    engine.pipeline("controlnet", scheduler="DDIM", controls=("canny",))
    engine.pipeline("controlnet_img2img", scheduler="DDIM", controls=("canny",))
    assert loads == ["ControlNetModel"]  # loaded lazily, once


def test_views_do_not_mutate_the_shared_pipeline(shapes_engine):
    base = shapes_engine.base
    scheduler_before, config_before = base.scheduler, dict(base.scheduler.config)
    view = shapes_engine.pipeline("txt2img", scheduler="Euler a")
    assert type(view.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert base.scheduler is scheduler_before and dict(base.scheduler.config) == config_before
    assert base.unet.dtype == torch.float32  # from_pipe casts shared modules: the engine passes its dtype


def test_views_are_cheap_copies_over_the_same_modules(shapes_engine):
    base = shapes_engine.base
    a = shapes_engine.pipeline("txt2img", scheduler="Euler a")
    b = shapes_engine.pipeline("txt2img", scheduler="DDIM")
    assert a is not b and base not in (a, b)
    assert a.unet is b.unet is base.unet and a.vae is base.vae and a.text_encoder is base.text_encoder
    assert (
        a.config["scheduler"][1] == "EulerAncestralDiscreteScheduler" and b.config["scheduler"][1] == "DDIMScheduler"
    )
    assert base.config["scheduler"][1] == type(base.scheduler).__name__  # the shared pipeline's config is untouched
    a._interrupt = True  # what Cancel does to a running view
    assert not getattr(b, "_interrupt", False) and not getattr(base, "_interrupt", False)


def test_txt2img_sizes_and_params(shapes_engine):
    result = txt2img.generate(shapes_engine, **SETTINGS, scheduler="DPM++ 2M", width=64, height=48, batch_size=2)
    assert [im.size for im in result.images] == [(64, 48), (64, 48)]
    assert all(im.mode == "RGB" for im in result.images)
    p = result.params
    assert p["task"] == "txt2img" and p["model"] == "tiny-shapes" and p["seed"] == 7 and p["steps"] == 3
    assert (p["width"], p["height"], p["batch_size"], p["scheduler"]) == (64, 48, 2, "DPM++ 2M")


@pytest.mark.parametrize("scheduler", ["DDIM", "Euler a", "DPM++ 2M Karras", "UniPC"])
def test_txt2img_same_seed_same_bytes(sd_engine, scheduler):
    a = txt2img.generate(sd_engine, **SETTINGS, scheduler=scheduler, width=64, height=64)
    b = txt2img.generate(sd_engine, **SETTINGS, scheduler=scheduler, width=64, height=64)
    assert a.images[0].tobytes() == b.images[0].tobytes()
    c = txt2img.generate(sd_engine, **{**SETTINGS, "seed": 8}, scheduler=scheduler, width=64, height=64)
    assert a.images[0].tobytes() != c.images[0].tobytes()


def test_batch_item_i_is_reproducible_alone_with_seed_plus_i(shapes_engine):
    batch = txt2img.generate(shapes_engine, **SETTINGS, scheduler="Euler a", batch_size=3)
    alone = txt2img.generate(shapes_engine, **{**SETTINGS, "seed": SETTINGS["seed"] + 2}, scheduler="Euler a")
    # Same noise per image; batched matmuls may round differently from batch-1 ones, so allow +-2 levels.
    diff = np.abs(pixels(batch.images[2]).astype(int) - pixels(alone.images[0]).astype(int))
    assert diff.max() <= 2
    assert batch.image_params(2)["seed"] == SETTINGS["seed"] + 2


def test_progress_calls_every_step_with_preview(shapes_engine, sd_engine, monkeypatch):
    for engine in (shapes_engine, sd_engine):
        monkeypatch.setattr(engine, "preview_every_s", 0)  # a preview at every step (default: at most every 0.15 s)
        seen = []
        txt2img.generate(engine, **{**SETTINGS, "steps": 4}, scheduler="DDIM",
                         on_step=lambda i, n, preview, seen=seen: seen.append((i, n, preview)))
        assert [(i, n) for i, n, _ in seen] == [(1, 4), (2, 4), (3, 4), (4, 4)]
        assert all(p is not None and p.mode == "RGB" for _, _, p in seen)


def test_previews_are_rationed_in_time(shapes_engine, monkeypatch):
    # The built-in model's preview is a VAE decode (about two U-Net steps): made at most every preview_every_s.
    monkeypatch.setattr(shapes_engine, "preview_every_s", 3600)
    seen = []
    txt2img.generate(shapes_engine, **{**SETTINGS, "steps": 4}, scheduler="DDIM",
                     on_step=lambda i, n, preview: seen.append((i, n, preview)))
    assert [(i, n, p) for i, n, p in seen] == [(1, 4, None), (2, 4, None), (3, 4, None), (4, 4, None)]


def test_linear_preview_for_large_latents(sd_engine):
    latents = torch.randn(2, 4, 40, 40)  # above the real-decode threshold -> fitted linear map
    preview = sd_engine.preview(latents)
    assert preview.size == (40, 40) and preview.mode == "RGB"
    weight, bias = sd_engine._fit_preview()
    assert weight.shape == (4, 3) and bias.shape == (3,)


def test_cancel_stops_within_two_steps(shapes_engine):
    cancel = threading.Event()
    unet_calls = []
    handle = shapes_engine.base.unet.register_forward_hook(lambda *a: unet_calls.append(1))
    try:
        def on_step(i, n, preview):
            if i == 2:
                cancel.set()

        with pytest.raises(Cancelled):
            txt2img.generate(
                shapes_engine, **{**SETTINGS, "steps": 20}, scheduler="DDIM", on_step=on_step, cancel=cancel
            )
    finally:
        handle.remove()
    assert len(unet_calls) <= 3  # cancelled after step 2: at most one more U-Net call
    # the engine is fine afterwards and views start un-interrupted
    assert len(txt2img.generate(shapes_engine, **SETTINGS).images) == 1


def test_cancel_before_start(shapes_engine):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        txt2img.generate(shapes_engine, **SETTINGS, cancel=cancel)


def test_model_failure_is_model_error_and_engine_recovers(shapes_engine):
    failures = []

    def fail_once(module, args, output):
        if not failures:
            failures.append(1)
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    handle = shapes_engine.base.unet.register_forward_hook(fail_once)
    try:
        with pytest.raises(ModelError, match="out of memory"):
            txt2img.generate(shapes_engine, **SETTINGS)
        assert not shapes_engine.lock._is_owned()  # the lock was released
        after = txt2img.generate(shapes_engine, **SETTINGS)
    finally:
        handle.remove()
    clean = txt2img.generate(shapes_engine, **SETTINGS)
    assert after.images[0].tobytes() == clean.images[0].tobytes()


def test_other_model_failure_is_model_error(shapes_engine):
    def broken(module, args, output):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    handle = shapes_engine.base.vae.decoder.register_forward_hook(broken)
    try:
        with pytest.raises(ModelError, match="mat1 and mat2"):
            txt2img.generate(shapes_engine, **SETTINGS)
    finally:
        handle.remove()


@pytest.mark.parametrize("change, message", [
    ({"steps": 10000}, "steps=10000 is above the limit of 150"),
    ({"steps": 0}, "steps=0 is below the minimum of 1"),
    ({"batch_size": 9}, "batch_size=9 is above the limit of 4"),
    ({"width": 4096}, "width=4096 is above the limit of 128"),
    ({"height": 60}, "height=60 is not a multiple of 8"),
    ({"guidance": 99.0}, "guidance=99 is above the limit of 30"),
    ({"seed": -1}, "seed=-1 is below the minimum of 0"),
    ({"seed": 1.5}, "seed=1.5 is not a whole number"),
    ({"prompt": "x" * 1001}, "prompt has 1001 characters, above the limit of 1000"),
    ({"scheduler": "LCM"}, "scheduler='LCM' is not one of"),
    ({"scheduler": "nope"}, "scheduler='nope' is not one of"),
])
def test_validation_names_value_and_limit(shapes_engine, change, message):
    kwargs = {**SETTINGS, "width": 64, "height": 64, **change}
    with pytest.raises(InputError) as info:
        txt2img.generate(shapes_engine, **kwargs)
    assert message in str(info.value)


def test_limits_come_from_environment(tiny_presets, monkeypatch):
    monkeypatch.setenv("LDS_MAX_STEPS", "5")
    monkeypatch.setenv("LDS_MAX_SIZE", "64")
    engine = Engine(tiny_presets["shapes"], device="cpu")
    assert engine.limits.max_steps == 5 and engine.limits.max_size == 64
    with pytest.raises(InputError, match="steps=6 is above the limit of 5"):
        txt2img.generate(engine, **{**SETTINGS, "steps": 6})
    with pytest.raises(InputError, match="width=72 is above the limit of 64"):
        txt2img.generate(engine, **SETTINGS, width=72, height=64)


def test_lcm_scheduler_only_with_lcm(sd_engine, replace_preset, tiny_presets):
    assert "LCM" not in sd_engine.scheduler_names
    with pytest.raises(InputError, match="LCM"):
        sd_engine.pipeline("txt2img", scheduler="LCM")
    lcm = replace_preset(tiny_presets["sd"], scheduler_names=("LCM", "DDIM"), default_scheduler="LCM")
    engine = Engine(lcm, device="cpu")
    result = txt2img.generate(engine, **{**SETTINGS, "guidance": 1.0, "steps": 2}, scheduler="LCM")
    assert result.params["scheduler"] == "LCM"


def test_nine_channel_model_does_txt2img(sd_inpaint_engine):
    assert sd_inpaint_engine.unet_in_channels == 9
    result = txt2img.generate(sd_inpaint_engine, **SETTINGS, width=64, height=64)
    assert result.images[0].size == (64, 64)
    with pytest.raises(InputError, match="img2img"):
        sd_inpaint_engine.pipeline("img2img")


def test_info_and_unknown_words(shapes_engine, sd_engine):
    info = shapes_engine.info()
    assert info["model"] == "tiny-shapes" and info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["controls"] == ["canny", "depth", "pose"] and "DPM++ 2M" in info["schedulers"]
    assert info["default_size"] == 64 and info["max_size"] == 128 and info["vae_scale_factor"] == 4
    assert "circle" in info["vocabulary"]
    assert shapes_engine.unknown_words("a red dragon left of a blue spaceship") == ["dragon", "spaceship"]
    assert sd_engine.unknown_words("a red dragon") == []  # CLIP's BPE knows every word
    assert sd_engine.info()["vae_scale_factor"] == 8


def test_two_threads_get_their_solo_results(shapes_engine):
    solo = {s: txt2img.generate(shapes_engine, **{**SETTINGS, "seed": s}).images[0].tobytes() for s in (1, 2)}
    results, errors = {}, []

    def work(seed):
        try:
            results[seed] = txt2img.generate(shapes_engine, **{**SETTINGS, "seed": seed}).images[0].tobytes()
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == solo


def test_half_precision_engine_stays_half(tiny_presets):
    # The CUDA default is fp16; CPU half kernels let the same code path run here. from_pipe casts shared
    # modules to the dtype it is given, so a view made without the engine's dtype would upcast everything.
    engine = Engine(tiny_presets["sd"], device="cpu", dtype="fp16")
    assert engine.torch_dtype == torch.float16 and engine.info()["dtype"] == "float16"
    seen = []
    result = txt2img.generate(engine, **SETTINGS, on_step=lambda i, n, p: seen.append(p))
    for task in ("img2img", "inpaint"):
        assert engine.pipeline(task).unet.dtype == torch.float16
    assert engine.base.unet.dtype == engine.base.vae.dtype == engine.base.text_encoder.dtype == torch.float16
    assert result.images[0].size == (64, 64) and len(seen) == SETTINGS["steps"]
    assert engine.preview(torch.randn(1, 4, 40, 40, dtype=torch.float16)).size == (40, 40)


def test_device_and_dtype_choice():
    from pipelines.engine import pick_device

    assert pick_device("cpu", None, builtin=False) == ("cpu", torch.float32)
    assert pick_device("cuda", None, builtin=False) == ("cuda", torch.float16)
    assert pick_device("cuda", None, builtin=True) == ("cuda", torch.float32)
    assert pick_device("mps", None, builtin=False) == ("mps", torch.float16)
    assert pick_device("cuda", "fp32", builtin=False) == ("cuda", torch.float32)
    with pytest.raises(ValueError, match="dtype='fp8' is not one of"):
        pick_device("cpu", "fp8", builtin=False)


def test_lora_is_fused_once_and_enables_lcm(tiny_presets, tiny_paths, sd_engine, replace_preset):
    # The sd15-lcm path: a LoRA folded into the shared U-Net at load time, LCM scheduler offered.
    preset = replace_preset(tiny_presets["sd"], lora=str(tiny_paths["sd_lcm_lora"]), default_scheduler="LCM")
    engine = Engine(preset, device="cpu")
    assert engine.scheduler_names[0] == "LCM"
    lcm = txt2img.generate(engine, **{**SETTINGS, "guidance": 1.0}, scheduler="LCM")
    assert engine.pipeline("img2img", scheduler="LCM").unet is engine.base.unet
    plain = txt2img.generate(sd_engine, **{**SETTINGS, "guidance": 1.0}, scheduler="DDIM")
    with_lora = txt2img.generate(engine, **{**SETTINGS, "guidance": 1.0}, scheduler="DDIM")
    assert plain.images[0].tobytes() != with_lora.images[0].tobytes()  # the LoRA changed the U-Net
    assert lcm.images[0].size == (64, 64)


def test_unknown_word_check_leaves_the_tokenizers_shared_state_alone(shapes_engine):
    """The UI checks prompts for unknown words while a model run may be tokenizing on another thread; encoding
    would reset the fast tokenizer's padding/truncation (shared, in Rust), giving that run unpadded prompts."""
    tokenizer = shapes_engine.base.tokenizer
    tokenizer(["a red circle"], padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
    padding, truncation = tokenizer.backend_tokenizer.padding, tokenizer.backend_tokenizer.truncation
    assert padding is not None
    assert shapes_engine.unknown_words("a red zorblax circle") == ["zorblax"]
    assert tokenizer.backend_tokenizer.padding == padding and tokenizer.backend_tokenizer.truncation == truncation


def test_preload_loads_what_is_otherwise_loaded_on_first_use(tiny_presets):
    """ZeroGPU forks a worker per call from the app's process: what the app loads before, every worker has."""
    engine = Engine(tiny_presets["sd_inpaint_unet"], device="cpu")
    assert engine._inpaint_unet is None
    engine.preload()
    assert engine.inpaint_unet() is not None and engine._inpaint_unet is engine.inpaint_unet()
    shapes = Engine(replace(tiny_presets["shapes"], annotators=None), device="cpu")
    shapes.preload()  # no annotators: a warning, not a failure
    assert set(shapes._controlnets) == set(shapes.control_types) == {"canny", "depth", "pose"}
