"""The ONNX Runtime U-Net backend (pipelines/fast_backend.py) on the real built-in model: the export equals eager
within a measured tolerance, a seed gives the same bytes within the backend, the export is cached, and every path
that needs the eager U-Net (Explain, prompt-to-prompt, LoRA, ControlNet, the 9-channel inpainting U-Net) makes
exactly what an eager engine makes."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import explain, txt2img
from pipelines.registry import resolve_preset

BUILTIN = resolve_preset("shapes")
pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(BUILTIN.base, "model_index.json")),
                                reason="the built-in model is not in assets/models/shapes-ldm")
ort = pytest.importorskip("onnxruntime")

# ONNX Runtime vs eager on one U-Net call of the built-in model: measured up to ~2e-6 on outputs of unit scale
# (other kernels, other rounding); the bound leaves room for other CPUs' vector widths.
UNET_TOLERANCE = 2e-5
# A whole 64x64 image: the per-step differences go through the sampler and the VAE; at 20 steps measured up to 1 level
# out of 255 in 0.01% of the pixels (README, Performance: Fast backend). The bound leaves room for other CPUs.
IMAGE_LEVELS = 4
SETTINGS = dict(prompt="a red circle left of a blue square", seed=7, steps=4, guidance=2.5, scheduler="DPM++ 2M")


def _engine(backend: str, cache_dir, preset=BUILTIN):
    from benchmarks.common import environment
    from pipelines.engine import Engine

    with environment(LDS_ONNX_CACHE=str(cache_dir)):
        return Engine(preset, device="cpu", threads=1, backend=backend)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def eager(cache_dir):
    return _engine("eager", cache_dir)


@pytest.fixture(scope="module")
def fast(cache_dir):
    return _engine("onnx", cache_dir)


def _bytes(result) -> list[bytes]:
    return [image.tobytes() for image in result.images]


def _onnx_calls(engine) -> int:
    return engine.fast_unet.calls["onnx"]


def _inputs(batch: int, height: int, width: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, height, width, generator=g), torch.tensor(451),
            torch.randn(batch, 77, 128, generator=g))


# --- the export ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch,height,width", [(2, 16, 16), (1, 16, 16), (8, 16, 16), (2, 32, 32), (4, 16, 32)])
def test_onnx_unet_equals_eager_within_tolerance(fast, batch, height, width):
    """CFG batch 2, one image without CFG, 4 images with CFG, the 128x128 limit, a wide picture: one graph."""
    sample, t, hidden = _inputs(batch, height, width)
    before = _onnx_calls(fast)
    with torch.inference_mode():
        got = fast.fast_unet(sample, t, encoder_hidden_states=hidden, return_dict=False)[0]
        want = fast.base.unet(sample, t, encoder_hidden_states=hidden, return_dict=False)[0]
    assert _onnx_calls(fast) == before + 1  # it ran ONNX Runtime, not the eager fallback
    assert got.shape == want.shape and got.dtype == want.dtype
    assert float((got - want).abs().max()) <= UNET_TOLERANCE


def test_the_common_call_runs_a_session_fixed_to_its_shape_and_others_the_general_one(fast, cache_dir):
    """The engine's most common U-Net call (CFG batch 2 at the default size, the prompt at the tokenizer's length)
    runs a session whose free dimensions are fixed (pipelines/fast_backend.common_call); any other shape opens the
    general session at its first call. Both equal eager within the tolerance, and each gives the same bytes again."""
    from pipelines import fast_backend

    tokens = fast.base.tokenizer.model_max_length
    assert fast.fast_unet.common == (2, 16, 16, tokens)
    fresh = fast_backend.build(fast.base.unet, threads=1, cache_dir=cache_dir,
                               common=fast_backend.common_call(fast.base.unet, 16, tokens))
    assert fresh._any_session is None  # not opened until a call needs it
    sample, t, _ = _inputs(2, 16, 16)
    hidden = torch.randn(2, tokens, 128, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = fast.base.unet(sample, t, encoder_hidden_states=hidden).sample
        common = fresh(sample, t, encoder_hidden_states=hidden).sample
        assert fresh._any_session is None
        assert torch.equal(fresh(sample, t, encoder_hidden_states=hidden).sample, common)
        other = fresh(sample[:1], t, encoder_hidden_states=hidden[:1]).sample  # batch 1: the general session
        assert fresh._any_session is not None
        general = torch.from_numpy(fresh.session.run(None, {
            "sample": sample.numpy(), "timestep": t.reshape(1).expand(2).float().numpy(),
            "encoder_hidden_states": hidden.numpy()})[0])
    assert fresh.calls == {"onnx": 3, "eager": 0}
    for got in (common, general):
        assert float((got - want).abs().max()) <= UNET_TOLERANCE
    assert float((other - want[:1]).abs().max()) <= UNET_TOLERANCE


def test_calls_the_export_does_not_cover_run_the_eager_unet_exactly(fast):
    """Latents not divisible by the U-Net's upsampling (a 72-pixel side), attention kwargs, a float64 sample:
    the eager U-Net's own output, bit for bit."""
    unet, eager = fast.fast_unet, fast.base.unet
    cases = [(_inputs(2, 18, 18), {}), (_inputs(2, 16, 16), {"cross_attention_kwargs": {"scale": 1.0}})]
    before = _onnx_calls(fast)
    with torch.inference_mode():
        for (sample, t, hidden), kwargs in cases:
            got = unet(sample, t, encoder_hidden_states=hidden, **kwargs).sample
            assert torch.equal(got, eager(sample, t, encoder_hidden_states=hidden, **kwargs).sample)
    assert _onnx_calls(fast) == before


def test_the_stand_in_reads_like_the_unet(fast):
    unet = fast.fast_unet
    assert unet.config is fast.base.unet.config and unet.config.in_channels == 4
    assert unet.add_embedding is fast.base.unet.add_embedding  # anything else: read from the eager U-Net
    assert unet.dtype == torch.float32 and unet.device.type == "cpu"
    assert list(unet.parameters()) == []  # the shared U-Net is not a submodule: .to() on a view cannot move it
    view = fast.pipeline("txt2img")
    assert view.unet is unet and fast.base.unet is not unet  # views get it, the shared base pipeline keeps eager


def test_a_distilled_unet_exports_its_guidance_embedding_and_runs_eager_without_it(fast, tmp_path):
    """An LCM student (`time_cond_proj_dim`) takes the guidance scale's embedding as a fourth input; with a
    non-zero projection the embedding changes the output, and ONNX follows eager; a call without it runs eager."""
    from pipelines import fast_backend
    from training.train_lcm import make_student

    student = make_student(fast.base.unet, 16).eval()
    with torch.no_grad():
        torch.nn.init.normal_(student.time_embedding.cond_proj.weight, std=0.5)  # zero-init would hide the input
    onnx = fast_backend.build(student, threads=1, cache_dir=tmp_path)
    sample, t, hidden = _inputs(1, 16, 16)
    with torch.inference_mode():
        outputs = []
        for scale in (1.5, 4.0):
            cond = torch.randn(1, 16, generator=torch.Generator().manual_seed(int(scale * 10)))
            got = onnx(sample, t, encoder_hidden_states=hidden, timestep_cond=cond).sample
            want = student(sample, t, encoder_hidden_states=hidden, timestep_cond=cond).sample
            assert float((got - want).abs().max()) <= UNET_TOLERANCE
            outputs.append(got)
        assert float((outputs[0] - outputs[1]).abs().max()) > 1e-3  # the input is not ignored
        assert onnx.calls == {"onnx": 2, "eager": 0}
        plain = onnx(sample, t, encoder_hidden_states=hidden).sample
        assert torch.equal(plain, student(sample, t, encoder_hidden_states=hidden).sample)
    assert onnx.calls["eager"] == 1


@pytest.mark.parametrize("height,width", [(16, 16), (32, 32), (16, 32)])
def test_onnx_vae_decoder_equals_eager_within_tolerance(fast, height, width):
    latents = torch.randn(2, 4, height, width, generator=torch.Generator().manual_seed(height + width))
    before = fast.fast_vae.calls["onnx"]
    with torch.inference_mode():
        got = fast.fast_vae.decode(latents, return_dict=False)[0]
        want = fast.base.vae.decode(latents, return_dict=False)[0]
    assert fast.fast_vae.calls["onnx"] == before + 1
    assert got.shape == want.shape == (2, 3, height * 4, width * 4)
    assert float((got - want).abs().max()) <= UNET_TOLERANCE


# int8 decoder vs the float decoder on pictures of the built-in world: measured 43.9 dB PSNR over 256 held-out scenes
# (README, Fast backend); the bound leaves room for other CPUs' int8 kernels.
INT8_MIN_PSNR = 38.0


def test_an_int8_decoder_preset_decodes_with_quantized_convolutions_close_to_the_float_decoder(tmp_path):
    import dataclasses

    import onnx
    from PIL import Image

    from pipelines import fast_backend

    engine = _engine("onnx", tmp_path, dataclasses.replace(BUILTIN, int8_decoder=True))
    path = engine.fast_vae.info.path
    assert path.parent.name.startswith(fast_backend.INT8_DECODER + "-")
    assert "QLinearConv" in {node.op_type for node in onnx.load(str(path)).graph.node}
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # the float and prepared graphs removed
    examples = Path(__file__).resolve().parent.parent / "assets" / "examples"
    pictures = np.stack([np.asarray(Image.open(examples / f"scene_{k}.png").convert("RGB")) for k in "abcd"])
    x = torch.from_numpy(pictures).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.inference_mode():
        latents = engine.base.vae.encode(x).latent_dist.mean
        before = engine.fast_vae.calls["onnx"]
        got = engine.fast_vae.decode(latents).sample.clamp(-1, 1)
        want = engine.base.vae.decode(latents).sample.clamp(-1, 1)
    assert engine.fast_vae.calls["onnx"] == before + 1
    mse = float(((got - want) / 2).pow(2).mean())  # on [0, 1]
    assert 10 * np.log10(1 / mse) >= INT8_MIN_PSNR
    # the flag only chooses the ONNX decoder's graph: the eager backend decodes with the VAE itself
    assert _engine("eager", tmp_path, dataclasses.replace(BUILTIN, int8_decoder=True)).fast_vae is None


def test_the_vae_stand_in_encodes_eager_and_views_get_it(fast, eager):
    vae = fast.fast_vae
    assert vae.config is fast.base.vae.config and list(vae.parameters()) == []
    view = fast.pipeline("img2img")
    assert view.vae is vae and fast.base.vae is not vae and eager.pipeline("txt2img").vae is eager.base.vae
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        assert torch.equal(vae.encode(image).latent_dist.mode(), fast.base.vae.encode(image).latent_dist.mode())
        before = dict(vae.calls)
        fast.base.vae.enable_tiling()
        try:
            latents = torch.randn(1, 4, 16, 16)
            assert torch.equal(vae.decode(latents).sample, fast.base.vae.decode(latents).sample)
        finally:
            fast.base.vae.disable_tiling()
    assert vae.calls["eager"] == before["eager"] + 1  # tiling switched on: the eager VAE decides


# --- bytes ---------------------------------------------------------------------------------------------------------

def test_same_seed_same_bytes_within_the_onnx_backend(fast, eager):
    before = _onnx_calls(fast)
    first = _bytes(txt2img.generate(fast, **SETTINGS, batch_size=2))
    assert _onnx_calls(fast) > before
    assert _bytes(txt2img.generate(fast, **SETTINGS, batch_size=2)) == first
    reference = np.stack([np.asarray(i) for i in txt2img.generate(eager, **SETTINGS, batch_size=2).images])
    got = np.stack([np.frombuffer(b, np.uint8) for b in first]).reshape(reference.shape)
    assert np.abs(got.astype(int) - reference).max() <= IMAGE_LEVELS  # the same pictures, up to rounding


def test_the_cache_is_reused_by_a_second_engine(fast, cache_dir):
    path = fast.fast_unet.info.path
    assert path.is_file() and path.parent.parent == cache_dir
    mtime = path.stat().st_mtime_ns
    second = _engine("onnx", cache_dir)
    assert second.fast_unet.info.export_s is None and second.fast_unet.info.path == path  # loaded, not exported
    assert path.stat().st_mtime_ns == mtime
    assert second.fast_vae.info.export_s is None and second.fast_vae.info.path == fast.fast_vae.info.path
    # the U-Net's and the decoder's exports, no partial folder left behind
    folders = sorted([path.parent.name, fast.fast_vae.info.path.parent.name])
    assert sorted(p.name for p in cache_dir.iterdir()) == folders
    assert fast.fast_vae.info.path.parent.name.startswith("vae-decoder-")
    assert _bytes(txt2img.generate(second, **SETTINGS)) == _bytes(txt2img.generate(fast, **SETTINGS))


def test_the_default_engine_decodes_on_every_core_and_a_seed_gives_the_same_bytes(fast, cache_dir, monkeypatch):
    """Threads not set: the U-Net on every core but one, the ONNX decode on all (pipelines/compute.py); an explicit
    count sets both. The decode's thread count changes no pixel: the same seed gives the same bytes as at 1 thread."""
    from benchmarks.common import environment
    from pipelines.engine import Engine

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    with environment(LDS_ONNX_CACHE=str(cache_dir)):
        default = Engine(BUILTIN, device="cpu", backend="onnx")
    assert (default.threads, default.decode_threads) == (1, 2) and fast.decode_threads == 1
    assert default.fast_vae.info.threads == 2 and default.fast_unet.info.threads == 1
    assert default.fast_vae.session.get_session_options().intra_op_num_threads == 2
    assert default.info()["decode_threads"] == 2
    before = default.fast_vae.calls["onnx"]
    first = _bytes(txt2img.generate(default, **SETTINGS))
    assert default.fast_vae.calls["onnx"] == before + 1
    assert _bytes(txt2img.generate(default, **SETTINGS)) == first == _bytes(txt2img.generate(fast, **SETTINGS))


# --- what must stay eager --------------------------------------------------------------------------------------

def test_explain_and_intervene_run_eager_and_match_an_eager_engine(fast, eager):
    settings = {**SETTINGS, "steps": 3}
    alone = dict(guidance_strip=(settings["guidance"],))  # the probed run alone, no extra strip runs
    before = _onnx_calls(fast)
    explained, reference = explain.explain(fast, **settings, **alone), explain.explain(eager, **settings, **alone)
    assert _bytes(explained) == _bytes(reference)
    for name in ("attention", "final_latent"):
        got, want = getattr(explained.explanation, name), getattr(reference.explanation, name)
        assert (got is None and want is None) or np.array_equal(got, want)
    # Explain promises txt2img's own image: the eager one (its probes need the eager U-Net)
    assert _bytes(explained) == _bytes(txt2img.generate(eager, **settings))
    edit = dict(target_prompt="a green circle left of a blue square", tau=0.5, weights="green=2")
    decodes = fast.fast_vae.calls["onnx"]
    assert _bytes(explain.intervene(fast, **settings, **edit)) == _bytes(explain.intervene(eager, **settings, **edit))
    assert _onnx_calls(fast) == before
    assert fast.fast_vae.calls["onnx"] == decodes  # the edited image too: the decoder the original went through
    # The guidance strip's other scales are plain Text to image runs, after the probes are gone: on the backend,
    # the very images the Text to image tab makes
    strip = dict(explain.explain(fast, **settings, guidance_strip=(1.0, settings["guidance"])).explanation.strip)
    assert _onnx_calls(fast) > before
    assert strip[1.0].tobytes() == txt2img.generate(fast, **{**settings, "guidance": 1.0}).images[0].tobytes()


def test_a_lora_runs_eager_and_requests_without_it_stay_on_onnx(fast, eager, tmp_path):
    from tests.tiny_models import build_lora

    lora = build_lora(tmp_path / "lora", BUILTIN.base) / "pytorch_lora_weights.safetensors"
    plain = _bytes(txt2img.generate(fast, **SETTINGS))
    try:
        for engine in (fast, eager):
            engine.adapters.load_file(lora, name="fast-test", token="zqx")
        with_word = {**SETTINGS, "prompt": SETTINGS["prompt"] + " zqx"}
        before = _onnx_calls(fast)
        assert _bytes(txt2img.generate(fast, **with_word)) == _bytes(txt2img.generate(eager, **with_word))
        assert _onnx_calls(fast) == before
        assert _bytes(txt2img.generate(fast, **SETTINGS)) == plain  # the LoRA is off for this prompt: ONNX, same bytes
        assert _onnx_calls(fast) > before
    finally:
        for engine in (fast, eager):
            if "fast-test" in [a["name"] for a in engine.adapters.describe()]:
                engine.adapters.remove("fast-test")


def test_controlnet_and_the_inpainting_unet_stay_eager(fast, eager):
    from pipelines import controlnet
    from tests.conftest import scene_image

    if "canny" not in fast.control_types:
        pytest.skip("the built-in canny ControlNet is not in assets/models")
    control = controlnet.preprocess(eager, image=scene_image(), control_type="canny")
    settings = dict(control_images=[control], control_types=["canny"], **{**SETTINGS, "steps": 3})
    before = _onnx_calls(fast)
    assert _bytes(controlnet.generate(fast, **settings)) == _bytes(controlnet.generate(eager, **settings))
    assert _onnx_calls(fast) == before  # ControlNet residuals: every call eager
    if fast.inpaint_unet() is not None:
        assert fast.pipeline("inpaint").unet is fast.inpaint_unet()  # the 9-channel U-Net is never wrapped


# --- settings ------------------------------------------------------------------------------------------------------

def test_a_bad_backend_is_refused_with_its_value_and_the_choices(monkeypatch):
    from pipelines.engine import Engine

    monkeypatch.setenv("LDS_BACKEND", "fastest")
    with pytest.raises(ValueError, match=r"LDS_BACKEND='fastest' is not a U-Net backend: use one of 'eager', 'onnx'"):
        Engine(BUILTIN, device="cpu")
    with pytest.raises(ValueError, match=r"backend='tensorrt' .*'eager', 'onnx'"):
        Engine(BUILTIN, device="cpu", backend="tensorrt")
    monkeypatch.setenv("LDS_BACKEND", "onnx")
    with pytest.raises(ValueError, match="runs the U-Net on the CPU in fp32; this engine runs on cpu in bfloat16"):
        Engine(BUILTIN, device="cpu", dtype="bf16")


def test_the_backend_flag_reaches_the_engine(monkeypatch):
    import app

    monkeypatch.delenv("LDS_BACKEND", raising=False)
    assert app.parse_args([]).backend is None  # the engine then reads LDS_BACKEND, else the default
    assert app.parse_args(["--backend", "onnx"]).backend == "onnx"
    from pipelines.settings import DEFAULT_BACKEND, resolve_backend

    assert resolve_backend(None, {}) == DEFAULT_BACKEND == "eager"
    assert resolve_backend(None, {"LDS_BACKEND": "ONNX"}) == "onnx"
    assert resolve_backend("eager", {"LDS_BACKEND": "x"}) == "eager"  # the flag wins over the variable


# --- the tiny decoder (a preset's fast_decoder) -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """An AutoencoderTiny of the trainer's shape with random weights (what matters here is who decodes)."""
    from training.train_tiny_vae import TinyConfig, make_tiny

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-vae") / "model"
    make_tiny(TinyConfig(), 4).save_pretrained(folder)
    return folder


def _with_tiny(folder, backend: str, cache_dir):
    import dataclasses

    return _engine(backend, cache_dir, dataclasses.replace(BUILTIN, fast_decoder=str(folder)))


def test_a_fast_decoder_decodes_requests_and_explain_keeps_the_full_vae(tiny_folder, eager, cache_dir):
    from diffusers import AutoencoderTiny

    from pipelines.fast_backend import TinyDecoding

    engine = _with_tiny(tiny_folder, "eager", cache_dir)
    vae = engine.fast_vae
    assert isinstance(vae, TinyDecoding) and engine.pipeline("txt2img").vae is vae and engine.base.vae is not vae
    image = txt2img.generate(engine, **SETTINGS).images[0]
    assert vae.calls["tiny"] == 1
    # the same run's latents through the tiny model by hand: the very bytes
    view = engine.pipeline("txt2img")
    latents = engine.compute.run(lambda: view(
        SETTINGS["prompt"], num_inference_steps=SETTINGS["steps"], guidance_scale=SETTINGS["guidance"],
        generator=[torch.Generator().manual_seed(SETTINGS["seed"])], output_type="latent").images)
    tiny = AutoencoderTiny.from_pretrained(tiny_folder).eval()
    with torch.inference_mode():
        decoded = tiny.decode(latents).sample  # the tiny model takes the U-Net's (scaled) latents
    by_hand = view.image_processor.postprocess(decoded, output_type="pil")[0]
    assert by_hand.tobytes() == image.tobytes()
    assert image.tobytes() != txt2img.generate(eager, **SETTINGS).images[0].tobytes()  # not the full decoder
    # Explain watches the full VAE's decoder: it decodes with it, as an engine without the fast decoder does
    settings = {**SETTINGS, "steps": 3}
    alone = dict(guidance_strip=(settings["guidance"],))
    before = vae.calls["full"]
    assert _bytes(explain.explain(engine, **settings, **alone)) == _bytes(explain.explain(eager, **settings, **alone))
    assert vae.calls["full"] > before
    with torch.inference_mode():  # encoding is the full VAE's
        x = torch.zeros(1, 3, 64, 64)
        assert torch.equal(vae.encode(x).latent_dist.mean, engine.base.vae.encode(x).latent_dist.mean)


def test_the_onnx_backend_exports_the_fast_decoder(tiny_folder, cache_dir):
    from pipelines.fast_backend import OnnxDecoder, TinyDecoding

    engine = _with_tiny(tiny_folder, "onnx", cache_dir)
    assert isinstance(engine.fast_vae, OnnxDecoder) and isinstance(engine.fast_vae.eager, TinyDecoding)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        got = engine.fast_vae.decode(latents).sample
        want = engine.fast_vae.eager.decode(latents).sample
    assert engine.fast_vae.calls["onnx"] == 1
    assert float((got - want).abs().max()) <= UNET_TOLERANCE


def test_a_missing_fast_decoder_falls_back_to_the_vae(tmp_path, cache_dir):
    engine = _with_tiny(tmp_path / "nowhere", "eager", cache_dir)
    assert engine.fast_vae is None and engine.pipeline("txt2img").vae is engine.base.vae
