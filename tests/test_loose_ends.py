"""The loose ends a careful user finds: the minimum-size message, restoring AUTOMATIC1111 parameters of the
current format, a kohya/A1111-format LoRA through the app's loader, and the memory flags really changing the
pipeline while the images stay within a stated tolerance of a plain run."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from pipelines import preprocess
from pipelines.common import NOTES_KEY, InputError, params_from_a1111

# --- the minimum size names the short side ---------------------------------------------------------------------


@pytest.mark.parametrize("size, message", [
    ((5000, 3), "the image is 5000x3 pixels: its height 3 is below the minimum of 8"),
    ((3, 5000), "the image is 3x5000 pixels: its width 3 is below the minimum of 8"),
    ((2, 7), "the image is 2x7 pixels: its width 2 and its height 7 are below the minimum of 8"),
])
def test_minimum_size_message_names_the_short_side(size, message):
    with pytest.raises(InputError) as error:
        preprocess.load_image(Image.new("RGB", size))
    assert str(error.value) == message
    preprocess.load_image(Image.new("RGB", (8, 5000)))  # both sides at least the minimum: accepted


# --- AUTOMATIC1111's parameters, as 1.10 writes them --------------------------------------------------------------

# What AUTOMATIC1111 v1.10.1 writes into a PNG's "parameters" chunk (txt2img with hires fix off)
A1111_PARAMETERS = (
    "a red circle left of a blue square, masterpiece\n"
    "Negative prompt: blurry, lowres\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1"
)


def _a1111_png(text: str) -> bytes:
    info = PngInfo()
    info.add_text("parameters", text)
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


@pytest.mark.parametrize("sampler, schedule, scheduler", [
    ("DPM++ 2M", "Karras", "DPM++ 2M Karras"),
    ("DPM++ 2M", "Automatic", "DPM++ 2M Karras"),  # A1111's default schedule for DPM++ 2M is Karras
    ("DPM++ 2M", "Uniform", "DPM++ 2M"),
    ("Euler a", "Automatic", "Euler a"),
    ("Euler a", "Uniform", "Euler a"),
    ("UniPC", "Automatic", "UniPC"),
    ("DDIM", "Uniform", "DDIM"),
    ("DPM++ 2M Karras", None, "DPM++ 2M Karras"),  # before 1.9 the schedule was part of the sampler's name
])
def test_a1111_sampler_and_schedule_type_map_to_the_apps_scheduler(sampler, schedule, scheduler):
    text = A1111_PARAMETERS.replace("Sampler: DPM++ 2M, Schedule type: Karras",
                                    f"Sampler: {sampler}" + (f", Schedule type: {schedule}" if schedule else ""))
    params = params_from_a1111(text)
    assert params["scheduler"] == scheduler and NOTES_KEY not in params
    assert (params["steps"], params["guidance"], params["seed"], params["width"], params["height"]) == (
        20, 7.0, 1234567890, 512, 768)
    assert params["prompt"] == "a red circle left of a blue square, masterpiece"
    assert params["negative_prompt"] == "blurry, lowres"


def test_every_mapped_scheduler_is_one_the_app_has():
    from pipelines.registry import COMMON_SCHEDULERS
    from pipelines.schedulers import SCHEDULERS

    for sampler in ("DPM++ 2M", "Euler a", "DDIM", "UniPC", "LCM"):
        for schedule in ("Automatic", "Uniform", "Karras"):
            params = params_from_a1111(f"x\nSteps: 20, Sampler: {sampler}, Schedule type: {schedule}")
            assert params["scheduler"] in SCHEDULERS, params
    assert set(COMMON_SCHEDULERS) <= set(SCHEDULERS)


@pytest.mark.parametrize("sampler, schedule, kept, note", [
    ("DPM++ 2M", "Exponential", "DPM++ 2M", "Schedule type 'Exponential' has no equivalent for DPM++ 2M"),
    ("DPM++ 2M", "SGM Uniform", "DPM++ 2M", "Schedule type 'SGM Uniform' has no equivalent"),
    ("Euler a", "Karras", "Euler a", "Schedule type 'Karras' has no equivalent for Euler a"),
    ("DPM++ SDE", "Karras", None, "Sampler 'DPM++ SDE' has no equivalent here"),
    ("Heun", "Automatic", None, "Sampler 'Heun' has no equivalent here"),
])
def test_a1111_values_without_an_equivalent_get_a_note_naming_them(sampler, schedule, kept, note):
    params = params_from_a1111(A1111_PARAMETERS.replace("Sampler: DPM++ 2M, Schedule type: Karras",
                                                        f"Sampler: {sampler}, Schedule type: {schedule}"))
    assert params.get("scheduler") == kept
    assert any(note in line for line in params[NOTES_KEY]), params[NOTES_KEY]


def test_restore_from_a_real_a1111_png_through_the_app(client, live_app, tmp_path):
    """/restore_params on the running app: the current A1111 format fills the scheduler; a sampler the app lacks
    and a scheduler this model does not offer come back as notes naming them."""
    from gradio_client import handle_file

    png = tmp_path / "a1111.png"
    png.write_bytes(_a1111_png(A1111_PARAMETERS))
    restored = client.predict(png=handle_file(str(png)), api_name="/restore_params")
    expected = "DPM++ 2M Karras"
    if expected in live_app.engine.scheduler_names:
        assert restored["scheduler"] == expected and NOTES_KEY not in restored
    else:
        assert f"Scheduler '{expected}' is not offered for this model" in " ".join(restored[NOTES_KEY])
    png.write_bytes(_a1111_png(A1111_PARAMETERS.replace("DPM++ 2M, Schedule type: Karras", "Heun")))
    restored = client.predict(png=handle_file(str(png)), api_name="/restore_params")
    assert "scheduler" not in restored and "Sampler 'Heun' has no equivalent here" in restored[NOTES_KEY][0]
    assert restored["seed"] == 1234567890
    png.write_bytes(_a1111_png(A1111_PARAMETERS.replace("DPM++ 2M, Schedule type: Karras", "LCM")))
    restored = client.predict(png=handle_file(str(png)), api_name="/restore_params")
    if "LCM" not in live_app.engine.scheduler_names:
        assert "Scheduler 'LCM' is not offered for this model" in " ".join(restored[NOTES_KEY])


# --- a kohya / A1111-format LoRA through the app's loader ----------------------------------------------------------

KOHYA_RANK = 4
KOHYA_ALPHA = 2.0


def _kohya_lora(unet, text_encoder, seed: int = 0) -> dict[str, torch.Tensor]:
    """A LoRA in kohya-ss / A1111 key names for every attention projection of the U-Net and the text encoder:
    lora_unet_<module path with _>.lora_down.weight / .lora_up.weight / .alpha, and lora_te_... likewise."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    parts = (("lora_unet_", unet, ("attn1", "attn2")), ("lora_te_", text_encoder, ("self_attn",)))
    for prefix, model, wanted in parts:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and any(w in name for w in wanted):
                key = prefix + name.replace(".", "_")
                tensors[f"{key}.lora_down.weight"] = torch.randn(KOHYA_RANK, module.in_features, generator=generator)
                tensors[f"{key}.lora_up.weight"] = torch.randn(module.out_features, KOHYA_RANK, generator=generator)
                tensors[f"{key}.alpha"] = torch.tensor(KOHYA_ALPHA)
    return tensors


def _lora_layers(model) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in model.named_modules() if hasattr(module, "lora_A") and module.lora_A}


def test_kohya_format_lora_loads_through_the_apps_loader_and_changes_the_output(tiny_presets, tmp_path):
    from safetensors.torch import save_file

    from pipelines import txt2img
    from pipelines.engine import Engine

    engine = Engine(tiny_presets["sd"], device="cpu")
    unet, text_encoder = engine.base.unet, engine.base.text_encoder
    tensors = _kohya_lora(unet, text_encoder)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)
    path = tmp_path / "kohya_style.safetensors"
    save_file({k: v * 0.05 if k.endswith("weight") else v for k, v in tensors.items()}, str(path))
    settings = dict(negative_prompt="", seed=1, steps=2, guidance=1.0, scheduler="DDIM")
    base = txt2img.generate(engine, prompt="a cat kohyastyle", **settings).images[0].tobytes()

    adapter = engine.adapters.load_file(path, token="kohyastyle")  # the Fine-tune tab's "Load" and --adapter
    assert adapter.kind == "lora" and adapter.token == "kohyastyle"
    # every kohya module became a LoRA layer of its model, with kohya's scale alpha / rank
    unet_layers, text_layers = _lora_layers(unet), _lora_layers(text_encoder)
    kohya_unet = {k.removesuffix(".alpha") for k in tensors if k.startswith("lora_unet_") and k.endswith(".alpha")}
    kohya_text = {k.removesuffix(".alpha") for k in tensors if k.startswith("lora_te_") and k.endswith(".alpha")}
    assert len(unet_layers) == len(kohya_unet) > 0 and len(text_layers) == len(kohya_text) > 0
    for layers, prefix in ((unet_layers, "lora_unet_"), (text_layers, "lora_te_")):
        name, layer = next(iter(layers.items()))
        key = prefix + name.replace(".", "_")
        assert torch.allclose(layer.lora_A[adapter.name].weight, tensors[f"{key}.lora_down.weight"] * 0.05)
        assert torch.allclose(layer.lora_B[adapter.name].weight, tensors[f"{key}.lora_up.weight"] * 0.05)
        assert layer.scaling[adapter.name] == pytest.approx(KOHYA_ALPHA / KOHYA_RANK)

    with_word = txt2img.generate(engine, prompt="a cat kohyastyle", **settings).images[0].tobytes()
    assert with_word != base  # the LoRA changes the image of a prompt with its word
    without_word = txt2img.generate(engine, prompt="a cat", **settings).images[0].tobytes()
    engine.adapters.remove(adapter.name)
    assert txt2img.generate(engine, prompt="a cat", **settings).images[0].tobytes() == without_word


# --- the memory flags change the pipeline; images stay within tolerance --------------------------------------------

# Attention slicing computes the same attention in slices: only float rounding may differ. VAE tiling decodes
# overlapping tiles and blends their seams, so a 128x128 built-in image may differ a little near the seams.
SLICING_MAX_DIFF = 2  # levels of 255, any pixel
TILING_MEAN_DIFF = 3.0  # levels of 255, mean over the image
TILING_MIN_PSNR = 30.0  # dB


def _flagged_engine(**flags):
    import app as studio_app
    from tests.conftest import BUILTIN_MODEL

    model = "shapes" if (BUILTIN_MODEL / "model_index.json").is_file() else None
    if model is None:
        pytest.skip("the built-in model is not trained here")
    return studio_app.build_engine(model, device="cpu", threads=1, **flags)


def _image(engine, size: int) -> np.ndarray:
    from pipelines import txt2img

    result = txt2img.generate(engine, prompt="a red circle left of a blue square", negative_prompt="", seed=5,
                              steps=8, guidance=2.5, scheduler="DPM++ 2M", width=size, height=size)
    return np.asarray(result.images[0], dtype=np.int16)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b).astype(np.float64) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def test_memory_flags_reach_the_engine():
    import app as studio_app

    args = studio_app.parse_args(["--attention-slicing", "--vae-tiling", "--cpu-offload"])
    assert args.attention_slicing and args.vae_tiling and args.cpu_offload


@pytest.mark.slow
def test_attention_slicing_and_vae_tiling_change_the_pipeline_within_tolerance():
    from diffusers.models.attention_processor import SlicedAttnProcessor

    plain = _flagged_engine()
    sliced = _flagged_engine(attention_slicing=True)
    tiled = _flagged_engine(vae_tiling=True)
    processors = lambda engine: set(type(p) for p in engine.base.unet.attn_processors.values())  # noqa: E731
    assert SlicedAttnProcessor not in processors(plain) and processors(sliced) == {SlicedAttnProcessor}
    # task pipelines share the U-Net, so every tab slices
    assert processors(sliced) == set(type(p) for p in sliced.task_unet("img2img").attn_processors.values())
    assert not plain.base.vae.use_tiling and tiled.base.vae.use_tiling

    size = plain.preset.default_size
    assert np.abs(_image(sliced, size) - _image(plain, size)).max() <= SLICING_MAX_DIFF
    large = plain.limits.max_size  # tiles only above the VAE's tile size (its sample_size)
    assert large > tiled.base.vae.tile_sample_min_size
    a, b = _image(tiled, large), _image(plain, large)
    assert np.abs(a - b).mean() <= TILING_MEAN_DIFF and _psnr(a, b) >= TILING_MIN_PSNR, (
        np.abs(a - b).mean(), _psnr(a, b))
    assert not np.array_equal(a, b), "the tiled decode should differ somewhere: tiling did not happen"


def test_cpu_offload_needs_cuda():
    """On a CPU the flag is accepted and ignored (the engine says so); with CUDA, offload hooks go on every
    module of the base pipeline and the image matches a plain CUDA run."""
    if not torch.cuda.is_available():
        engine = _flagged_engine(cpu_offload=True)
        assert engine.cpu_offload is False and not hasattr(engine.base.unet, "_hf_hook")
        pytest.skip("offload hooks need a CUDA device and accelerate; checked only that the flag is ignored on CPU")
    import app as studio_app

    plain = studio_app.build_engine("shapes", device="cuda", threads=1)
    offloaded = studio_app.build_engine("shapes", device="cuda", threads=1, cpu_offload=True)
    assert offloaded.cpu_offload and all(hasattr(m, "_hf_hook") for m in (
        offloaded.base.unet, offloaded.base.vae, offloaded.base.text_encoder))
    size = plain.preset.default_size
    assert np.abs(_image(offloaded, size) - _image(plain, size)).max() <= SLICING_MAX_DIFF


# --- model cards written only by code, with Reproduce commands that rebuild the shipped weights ---------------------

MODELS = __import__("pathlib").Path(__file__).resolve().parent.parent / "assets" / "models"
CARD_FOLDERS = [*(f"shapes-controlnet-{c}" for c in ("canny", "depth", "pose")),
                *(f"shapes-annotators/{k}" for k in ("depth", "pose"))]


@pytest.mark.parametrize("folder", CARD_FOLDERS)
def test_shipped_cards_are_what_the_card_writer_makes_of_their_records(folder, tmp_path):
    """Rewriting a card from its records (training.json / config.json) and the scores it shows gives the shipped
    card byte for byte: no line of it is a hand edit that the next `--write-cards` would drop."""
    import shutil

    from training import cards

    copy = tmp_path / folder
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(MODELS / folder, copy, ignore=shutil.ignore_patterns("*.safetensors"))
    shipped = (MODELS / folder / "README.md").read_text()
    scores = cards.scores_from_card(copy / "README.md")
    assert scores, "the card shows no scores table"
    if folder.startswith("shapes-controlnet-"):
        cards.write_controlnet_card(copy, folder.rsplit("-", 1)[1], scores)
    else:
        cards.write_annotator_card(copy, folder.rsplit("/", 1)[1], scores)
    assert (copy / "README.md").read_text() == shipped


@pytest.mark.parametrize("control", ["canny", "depth", "pose"])
def test_controlnet_cards_reproduce_against_the_base_step_they_were_trained_on(control):
    """A ControlNet's card trains it again against the base it was trained on: that step, taken from the commit
    the record names (which holds the LDM at that step, when the history is here)."""
    import json
    import subprocess

    record = json.loads((MODELS / f"shapes-controlnet-{control}" / "training.json").read_text())
    card = (MODELS / f"shapes-controlnet-{control}" / "README.md").read_text()
    step, commit = record["ldm_step"], record["ldm_commit"]
    assert step and commit, record
    assert f"Trained against the Shapes LDM at step {step:,}" in card
    assert f"git archive {commit} assets/models/shapes-ldm" in card and f"--ldm-step {step}" in card
    assert "--ldm assets/models/shapes-ldm " not in card  # a fixed commit, not whatever the folder holds later
    shown = subprocess.run(["git", "show", f"{commit}:assets/models/shapes-ldm/TRAINING_STEP"],
                           cwd=MODELS.parent.parent, capture_output=True, text=True)
    if shown.returncode != 0:
        pytest.skip("the repository's history is not here (a shallow copy)")
    assert shown.stdout.strip() == str(step)


def test_controlnet_trainer_refuses_a_base_at_another_step(tmp_path):
    from training.train_controlnet import check_ldm_step

    (tmp_path / "TRAINING_STEP").write_text("42500\n")
    assert check_ldm_step(tmp_path, None) == 42500 and check_ldm_step(tmp_path, 42500) == 42500
    with pytest.raises(SystemExit, match="holds the LDM at step 42500, not at --ldm-step 7500"):
        check_ldm_step(tmp_path, 7500)


def test_pose_annotator_card_repeats_its_mid_run_schedule_change():
    from training.train_annotators import schedule_segments

    card = (MODELS / "shapes-annotators" / "pose" / "README.md").read_text()
    first = "--kind pose --out runs/annotator-pose --max-steps 3000 --stop-at 250 --threads 1"
    second = "--kind pose --out runs/annotator-pose --max-steps 1200 --threads 1"
    assert first in card and second in card and card.index(first) < card.index(second)
    # what train_annotators records as a run goes: 250 steps on a 3000-step cosine, then on a 1200-step one
    segments = []
    for max_steps, step in ((3000, 100), (3000, 250), (1200, 500), (1200, 1200)):
        segments = schedule_segments(segments, max_steps, step)
    assert segments == [{"max_steps": 3000, "until": 250}, {"max_steps": 1200, "until": 1200}]
