"""The built-in inpainting U-Net: how it is derived, what it learns from, and what the tabs do with it."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import REPO
from training.common import folder_step

INPAINT_MODEL = REPO / "assets" / "models" / "shapes-inpaint"
needs_model = pytest.mark.skipif(
    not (INPAINT_MODEL / "unet" / "config.json").is_file(), reason="the built-in inpainting model is not trained yet"
)


# --- the data ------------------------------------------------------------------------------------------------


def test_examples_are_deterministic_and_follow_the_rule():
    from training import inpaint_data, shapes

    assert inpaint_data.training_example(5, 5).caption == inpaint_data.training_example(5, 5).caption
    seen_modes = set()
    for seed in range(200):
        example = inpaint_data.training_example(seed, seed)
        seen_modes.add(example.mode)
        scene = shapes.sample(seed).scene
        hidden = inpaint_data.hidden_objects(scene, example.mask)
        # Outside the mask the target is the picture the user starts from, whatever the mode
        assert np.array_equal(example.target[~example.mask], example.source[~example.mask]) or example.mode in (
            "remove",
            "empty",
        )
        if example.mode in ("remove", "empty") and hidden:
            # the hidden objects are gone: the target equals the scene rendered without them
            assert np.array_equal(example.target, inpaint_data.render_without(scene, hidden))
            for i in hidden:
                assert scene.objects[i].colour not in example.caption.split() or example.caption == scene.caption
        if example.mode == "part":
            named = {scene.objects[i].colour for i in hidden}
            assert named <= set(example.caption.split())
    assert seen_modes == set(inpaint_data.CAPTION_MODES)


@pytest.mark.parametrize("recipe", ["compose", "compose-free", "compose-centred"])
def test_compose_examples_put_the_named_new_object_inside_the_mask(recipe, monkeypatch):
    from training import inpaint_data, shapes
    from training.evaluate import EVAL_BACKGROUNDS, find_objects

    drawn = []  # the kind of every mask drawn around an object
    object_mask = inpaint_data.object_mask
    monkeypatch.setattr(inpaint_data, "object_mask", lambda kind, *a: drawn.append(kind) or object_mask(kind, *a))
    kinds = {}
    for seed in range(300):
        example = inpaint_data.training_example(seed, seed, recipe)
        kinds[example.mask_kind] = kinds.get(example.mask_kind, 0) + 1
        if example.mask_kind not in inpaint_data.NEW_OBJECT_KINDS:
            continue
        # Outside the mask nothing changes; inside it the new object, which the caption names
        assert np.array_equal(example.target[~example.mask], example.source[~example.mask])
        assert example.mode == "part" and example.hidden == 1
        words = example.caption.split()
        named = [(c, s) for c, s in zip(words, words[1:]) if c in shapes.COLOURS and s in shapes.SHAPES]
        assert len(named) == 1 and named[0] not in shapes.HELD_OUT_PAIRS, example.caption
        background = shapes.sample(seed).scene.background
        if "style" in words or background not in EVAL_BACKGROUNDS:
            continue  # the checker reads flat shapes on its evaluation backgrounds
        inside = [
            f
            for f in find_objects(example.target, background)
            if example.mask[int(round(f.centroid[1])), int(round(f.centroid[0]))]
        ]
        assert named[0] in {(f.colour, f.shape) for f in inside}, (seed, example.caption)
    # every kind of the recipe is drawn, new objects often: the lesson the world's own scenes never give
    assert set(kinds) == set(inpaint_data.MASK_RECIPES[recipe])
    assert kinds["add"] + kinds["swap"] >= 60
    # "compose-free" never draws a mask shaped like the object it holds (its outline would decide the new shape)
    assert ("object-shape" in drawn) == (recipe != "compose-free")
    # "compose-centred" draws every wide mask centred on its object, the others may put it anywhere inside
    assert ("object-around" in drawn) == (recipe == "compose-centred") != ("object-loose" in drawn)


def test_canvas_examples_are_world_2_scenes_on_the_canvases_the_app_works_at():
    """Examples on canvases that are not 64x64 follow the same rule as the 64x64 ones, on world 2's scenes drawn
    with world 1's textures and captioned in world 1's words; border bands reach half the canvas across."""
    from training import inpaint_data, shapes
    from training.evaluate import EVAL_BACKGROUNDS, find_objects

    sizes = inpaint_data.CANVAS_SIZES
    assert sizes and all(min(size) == 64 and size != (64, 64) for size in sizes)
    known = set(shapes.vocabulary())
    kinds, widest_band, added = {}, 0, 0
    for seed in range(160):
        width, height = size = inpaint_data.CANVAS_SIZES[seed % len(inpaint_data.CANVAS_SIZES)]
        example = inpaint_data.training_example(seed, seed, "canvas", size)
        kinds[example.mask_kind] = kinds.get(example.mask_kind, 0) + 1
        assert example.source.shape == example.target.shape == (height, width, 3)
        assert example.mask.shape == (height, width) and example.mask.any()
        assert set(example.caption.split()) <= known, example.caption
        sample = inpaint_data.canvas_sample(seed, size)
        assert sample.scene.world == 2 and sample.scene.style_params == shapes.STYLE_PARAMS_V1
        assert np.array_equal(example.source, sample.image)
        if example.mode not in ("remove", "empty"):
            assert np.array_equal(example.target[~example.mask], example.source[~example.mask])
        hidden = inpaint_data.hidden_objects(sample.scene, example.mask)
        if example.mode in ("remove", "empty") and hidden and example.mask_kind not in inpaint_data.NEW_OBJECT_KINDS:
            assert np.array_equal(example.target, inpaint_data.render_without(sample.scene, hidden))
        if example.mask_kind == "band" and width > height:
            columns = example.mask.all(axis=0)
            widest_band = max(widest_band, int(columns[: width // 2].sum()), int(columns[width // 2 :].sum()))
        if example.mask_kind == "add" and "style" not in example.caption.split() \
                and sample.scene.background in EVAL_BACKGROUNDS:
            words = example.caption.split()
            named = [(c, s) for c, s in zip(words, words[1:]) if c in shapes.COLOURS and s in shapes.SHAPES]
            inside = {(f.colour, f.shape) for f in find_objects(example.target, sample.scene.background)
                      if example.mask[int(round(f.centroid[1])), int(round(f.centroid[0]))]}
            assert named[0] in inside, (seed, example.caption)
            added += 1
    assert set(kinds) == {k for k, share in inpaint_data.MASK_RECIPES["canvas"].items() if share}
    assert widest_band > 32 and added >= 5


def test_masked_source_is_what_diffusers_shows_the_unet():
    from diffusers.image_processor import VaeImageProcessor

    from training import inpaint_data

    example = inpaint_data.training_example(7, 7)
    image = VaeImageProcessor(vae_scale_factor=4).preprocess(Image.fromarray(example.source))
    mask = VaeImageProcessor(
        vae_scale_factor=4, do_normalize=False, do_binarize=True, do_convert_grayscale=True
    ).preprocess(Image.fromarray(example.mask.astype(np.uint8) * 255))
    masked = (image * (mask < 0.5))[0].permute(1, 2, 0).numpy()  # StableDiffusionInpaintPipeline's masked_image
    assert np.allclose(masked, inpaint_data.masked_source(example.source, example.mask), atol=1e-6)


def test_evaluation_split_is_held_out():
    from training import evaluate_inpaint, inpaint_data
    from training.common import HELD_OUT_SEED

    cases = evaluate_inpaint.build_cases("validation", 2)
    test_cases = evaluate_inpaint.build_cases("test", 2)
    assert {c.task for c in cases} == set(evaluate_inpaint.TASKS)
    assert not {c.seed for c in cases} & {c.seed for c in test_cases}
    assert min(c.seed for c in cases + test_cases) >= HELD_OUT_SEED
    with pytest.raises(SystemExit, match="not held out"):
        evaluate_inpaint.check_split([5], [inpaint_data.HELD_OUT_MASK_SEED + 5], None)
    with pytest.raises(SystemExit, match="mixes"):
        evaluate_inpaint.check_split([c.seed for c in cases + test_cases], [inpaint_data.HELD_OUT_MASK_SEED] * 2, None)


def test_checker_scores_the_ground_truth():
    """The evaluation's judges pass the ground truth itself (a checker is trusted after it scores the truth)."""
    from training import evaluate_inpaint

    scores, _ = evaluate_inpaint.truth_scores(evaluate_inpaint.build_cases("validation", 5))
    for key in ("replace", "remove", "keep", "outpaint"):
        assert scores[key] == 1.0, (key, scores)
    assert 0.9 <= scores["seam_ratio"] <= 1.1


# --- the model ---------------------------------------------------------------------------------------------------


def test_inflated_unet_computes_what_the_base_does():
    from diffusers import UNet2DConditionModel

    from training.train_inpaint import inflate_unet

    base = UNet2DConditionModel.from_pretrained(REPO / "assets" / "models" / "shapes-ldm" / "unet").eval()
    nine = inflate_unet(base).eval()
    assert nine.config.in_channels == 9
    g = torch.Generator().manual_seed(0)
    latents, extra = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 5, 16, 16, generator=g)
    hidden = torch.randn(2, 24, base.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        expected = base(latents, 500, hidden).sample
        got = nine(torch.cat([latents, extra], 1), 500, hidden).sample
    assert torch.allclose(expected, got, atol=1e-5)


@pytest.mark.slow
def test_train_inpaint_runs_resumes_and_exports(tmp_path):
    from training import train_inpaint

    run = tmp_path / "run"
    common = [
        "--out",
        str(run),
        "--pool-size",
        "64",
        "--batch-size",
        "4",
        "--log-every",
        "1",
        "--save-every",
        "2",
        "--threads",
        "1",
    ]
    train_inpaint.main(common + ["--max-steps", "2"])
    train_inpaint.main(common + ["--max-steps", "3"])  # resumes at step 2
    log = (run / "log.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in log[1:]] == ["1", "2", "3"]
    record = json.loads((run / "model" / "training.json").read_text())
    assert record["step"] == 3 and record["base"] == "assets/models/shapes-ldm" and record["base_step"].isdigit()
    assert record["base_text_step"] == folder_step(REPO / "assets" / "models" / "shapes-ldm", text=True)
    assert (run / "samples" / "step-000002.png").is_file()
    train_inpaint.main(["--out", str(run), "--export", str(tmp_path / "shipped")])
    config = json.loads((tmp_path / "shipped" / "unet" / "config.json").read_text())
    assert config["in_channels"] == 9


def test_train_inpaint_trains_on_the_other_canvases(tmp_path, monkeypatch):
    """--canvas-share: batches from world-2 pools on the canvases that are not 64x64, one canvas per batch with as
    many pixels as a 64x64 batch; the setting reaches the record and the reproduce command."""
    from training import train_inpaint

    shapes_seen = []
    unet_class = train_inpaint.inflate_unet

    def inflate(base):
        unet = unet_class(base)
        unet.register_forward_pre_hook(lambda module, args: shapes_seen.append(tuple(args[0].shape)))
        return unet
    monkeypatch.setattr(train_inpaint, "inflate_unet", inflate)
    run = tmp_path / "run"
    train_inpaint.main(["--out", str(run), "--pool-size", "64", "--batch-size", "8", "--canvas-share", "0.9",
                        "--canvas-pool-size", "16", "--save-every", "8", "--threads", "1", "--max-steps", "8"])
    training_shapes = [s for s in shapes_seen if s[0] > 1][:8]  # the sample grid runs the U-Net on batch 1 or 2
    canvases = {(s[3] * 4, s[2] * 4) for s in training_shapes}
    assert canvases - {(64, 64)} and canvases <= {(64, 64), *train_inpaint.inpaint_data.CANVAS_SIZES}
    for batch, _, height, width in training_shapes:  # as many latent cells as 8 examples of 16x16
        assert batch == round(8 * 256 / (height * width)), (batch, height, width)
    assert len(list(run.glob("pool-*x*"))) == len(train_inpaint.inpaint_data.CANVAS_SIZES)
    record = json.loads((run / "model" / "training.json").read_text())
    assert record["canvas_share"] == 0.9
    assert "--canvas-share 0.9 --canvas-pool-size 16" in train_inpaint.command(record)



@pytest.mark.slow
def test_train_inpaint_goes_on_from_an_exported_model_with_the_hole_weighted(tmp_path):
    """--init-from takes a model folder (as shipped in assets/models/), not only a run folder: the shipped model
    is re-trained without its run; the mask loss weight and the SNR cap reach the record and the reproduce command."""
    from diffusers import UNet2DConditionModel

    from training import train_inpaint

    shipped = REPO / "assets" / "models" / "shapes-inpaint"
    state, step = train_inpaint.init_weights(shipped)
    assert step == int((shipped / "TRAINING_STEP").read_text())
    run = tmp_path / "run"
    args = ["--out", str(run), "--pool-size", "64", "--batch-size", "4", "--save-every", "1", "--threads", "1"]
    args += ["--init-from", str(shipped), "--mask-loss-weight", "4", "--min-snr-gamma", "50"]
    args += ["--max-steps", str(step + 1)]
    train_inpaint.main(args)
    record = json.loads((run / "model" / "training.json").read_text())
    assert record["step"] == step + 1 and record["mask_loss_weight"] == 4 and record["min_snr_gamma"] == 50
    assert record["parent"]["step"] == step  # the shipped model's own history goes on
    assert "--mask-loss-weight 4" in train_inpaint.command(record)
    assert "--min-snr-gamma 50" in train_inpaint.command(record)
    assert "--min-snr-gamma" not in train_inpaint.command(record["parent"])  # the base's weighting: no flag
    trained = UNet2DConditionModel.from_pretrained(run / "model", subfolder="unet").state_dict()
    moved = max(float((trained[k] - state[k]).abs().max()) for k in state)
    assert 0 < moved < 0.05  # one small step from the shipped weights, not from the base
    with pytest.raises(SystemExit, match="neither a run folder"):
        train_inpaint.init_weights(tmp_path)


def test_rebase_adds_what_the_base_moved_and_keeps_the_added_channels():
    from training.train_inpaint import rebase

    def weights(conv_in, bias, out):
        return {"conv_in.weight": conv_in, "conv_in.bias": bias, "out.weight": out}

    old = weights(torch.zeros(2, 4, 3, 3), torch.zeros(2), torch.ones(3))
    new = weights(torch.full((2, 4, 3, 3), 0.5), torch.ones(2), torch.zeros(3))
    state = weights(torch.full((2, 9, 3, 3), 2.0), torch.ones(2), torch.ones(3))
    moved = rebase(state, old=old, new=new)
    assert torch.equal(moved["conv_in.weight"][:, :4], torch.full((2, 4, 3, 3), 2.5))
    assert torch.equal(moved["conv_in.weight"][:, 4:], state["conv_in.weight"][:, 4:])  # mask and masked latents
    assert torch.equal(moved["conv_in.bias"], torch.full((2,), 2.0))
    assert torch.equal(moved["out.weight"], torch.zeros(3))
    assert torch.equal(state["conv_in.weight"], torch.full((2, 9, 3, 3), 2.0))  # the start is not changed in place
    with pytest.raises(SystemExit, match="no weight extra"):
        rebase({**state, "extra": torch.zeros(1)}, old=old, new=new)
    with pytest.raises(SystemExit, match="out.weight is"):
        rebase({**state, "out.weight": torch.ones(4)}, old=old, new={**new, "out.weight": torch.zeros(3)})


@pytest.mark.slow
def test_train_inpaint_widens_the_shipped_model_and_resumes_wide(tmp_path):
    from diffusers import UNet2DConditionModel

    from training import train_inpaint

    shipped = REPO / "assets" / "models" / "shapes-inpaint"
    step = int((shipped / "TRAINING_STEP").read_text())
    run = tmp_path / "run"
    args = ["--out", str(run), "--pool-size", "64", "--batch-size", "4", "--save-every", "1", "--threads", "1",
            "--init-from", str(shipped), "--widen", "2", "--learning-rate", "0"]
    train_inpaint.main(args + ["--max-steps", str(step + 1)])
    train_inpaint.main(args + ["--max-steps", str(step + 2)])  # resumes the wide checkpoint
    record = json.loads((run / "model" / "training.json").read_text())
    assert record["step"] == step + 2 and record["widen"] == 2 and "--widen 2 " in train_inpaint.command(record)
    narrow = UNet2DConditionModel.from_pretrained(shipped, subfolder="unet").eval()
    wide = UNet2DConditionModel.from_pretrained(run / "model", subfolder="unet").eval()
    assert list(wide.config.block_out_channels) == [2 * c for c in narrow.config.block_out_channels]
    inputs = torch.randn(2, 9, 16, 16), torch.tensor([20, 700]), torch.randn(2, 24, 128)
    with torch.no_grad():  # at learning rate 0 the widened model is the shipped one, exported in the new shape
        assert torch.allclose(wide(*inputs).sample, narrow(*inputs).sample, atol=1e-4)
    narrow_args = [a for a in args if a not in ("--widen", "2")]
    with pytest.raises(SystemExit, match="resume with that"):  # the run's checkpoint is wide
        train_inpaint.main(narrow_args + ["--max-steps", str(step + 3)])
    with pytest.raises(SystemExit, match="--widen 3"):
        train_inpaint.main(["--out", str(tmp_path / "again"), "--pool-size", "64", "--batch-size", "4",
                            "--init-from", str(run), "--widen", "3", "--max-steps", str(step + 3)])


@needs_model
def test_train_inpaint_rebases_the_shipped_model_onto_a_later_base(tmp_path):
    """--rebase-from re-derives the inpainting U-Net after the base was trained on: the shipped model plus what the
    base U-Net moved (here onto the v2 model), exported as is when --max-steps is the start's step, with a
    record whose command makes it again."""
    from diffusers import UNet2DConditionModel

    from training import train_inpaint

    shipped_base = REPO / "assets" / "models" / "shapes-ldm"
    later = REPO / "assets" / "models" / "shapes-ldm-v2"
    step = int((INPAINT_MODEL / "TRAINING_STEP").read_text())
    run = tmp_path / "run"
    train_inpaint.main(["--base", str(later), "--out", str(run), "--init-from", str(INPAINT_MODEL),
                        "--rebase-from", str(shipped_base), "--max-steps", str(step), "--threads", "1"])
    load = lambda folder: UNet2DConditionModel.from_pretrained(folder, subfolder="unet").state_dict()  # noqa: E731
    made, inpaint, old, new = load(run / "model"), load(INPAINT_MODEL), load(shipped_base), load(later)
    name = "up_blocks.1.resnets.0.conv1.weight"
    assert not torch.equal(old[name], new[name])  # the bases differ, so the test can tell
    assert torch.allclose(made[name], inpaint[name] + new[name] - old[name])
    assert torch.equal(made["conv_in.weight"][:, 4:], inpaint["conv_in.weight"][:, 4:])
    record = json.loads((run / "model" / "training.json").read_text())
    assert record["step"] == step and record["base_step"] == (later / "TRAINING_STEP").read_text().strip()
    assert "--rebase-from assets/models/shapes-ldm " in train_inpaint.command(record)
    assert not (run / "pool").exists()  # nothing trained, so no examples were encoded
    with pytest.raises(SystemExit, match="give it with --init-from"):
        train_inpaint.main(["--base", str(later), "--out", str(tmp_path / "x"), "--rebase-from", str(shipped_base),
                            "--max-steps", "1"])


# --- the engine and the tabs' tasks -------------------------------------------------------------------------------


@needs_model
def test_builtin_preset_inpaints_with_the_nine_channel_unet():
    from pipelines.registry import resolve_preset

    preset = resolve_preset("shapes")
    assert preset.inpaint_model == str(INPAINT_MODEL)
    # It reads the base's text states at every step: the base's text encoder must be the one it was trained with
    # (a base U-Net trained on with its text encoder frozen keeps it; training.common.folder_step)
    record = json.loads((INPAINT_MODEL / "training.json").read_text())
    text_step = folder_step(REPO / "assets" / "models" / "shapes-ldm", text=True)
    assert record.get("base_text_step", record["base_step"]) == text_step, (
        "the inpainting model reads another text encoder than the base's: re-run train_inpaint"
    )


@pytest.fixture(scope="module")
def builtin_engines():
    from pipelines.engine import Engine
    from pipelines.registry import resolve_preset

    preset = resolve_preset("shapes")
    return Engine(preset, device="cpu", threads=1), Engine(
        replace(preset, inpaint_model=None), device="cpu", threads=1
    )


def _empty_corner_case():
    """A held-out test-split scene and a box over an empty area, with a prompt that does not say where."""
    from training import evaluate_inpaint

    return next(c for c in evaluate_inpaint.build_cases("test", 3) if c.task == "add")


@needs_model
def test_inpaint_draws_the_object_inside_the_mask(builtin_engines):
    """The Inpaint tab's first example (a mask over the empty ground, "a big green star"): the checker reads a green
    star inside the mask in at least 2 of 4 seeds with the inpainting U-Net (its stars are plump: the rest read as
    other shapes) and in more seeds than with latent blending; nothing changes outside the mask."""
    from pipelines.inpaint import inpaint
    from training import evaluate_inpaint, shapes

    examples = REPO / "assets" / "examples"
    picture = np.asarray(Image.open(examples / "scene_a.png").convert("RGB"))
    mask = np.asarray(Image.open(examples / "mask_add.png"))[..., 3] > 0
    case = evaluate_inpaint.Case("add", 3, shapes.sample(3).scene, picture, "a big green star", mask=mask,
                                 want=("green", "star"), truth=picture)
    found = {}
    for engine in builtin_engines:
        result = inpaint(engine, image=Image.fromarray(picture), mask=Image.fromarray(mask.astype(np.uint8) * 255),
                         prompt=case.prompt, seed=0, steps=20, guidance=engine.preset.default_guidance, batch_size=4)
        verdicts = [evaluate_inpaint.judge_inpaint(case, np.asarray(im)) for im in result.images]
        assert all(v["keep"] for v in verdicts)  # nothing outside the mask changed
        found[result.params["inpaint_unet"]] = sum(v["add"] for v in verdicts)
    assert found["9-channel"] >= 2 and found["9-channel"] > found["latent blending"], found


@needs_model
def test_latent_blending_fallback_says_so(builtin_engines):
    from pipelines.inpaint import inpaint
    from pipelines.outpaint import outpaint

    _, engine = builtin_engines
    case = _empty_corner_case()
    result = inpaint(
        engine,
        image=Image.fromarray(case.image),
        mask=Image.fromarray(case.mask.astype(np.uint8) * 255),
        prompt=case.prompt,
        seed=0,
        steps=2,
        guidance=2.5,
    )
    assert result.params["inpaint_unet"] == "latent blending"
    assert "no inpainting U-Net" in result.params["warnings"][0] and "4x4-pixel" in result.params["warnings"][0]
    result = outpaint(engine, image=Image.fromarray(case.image), left=8, prompt="", seed=0, steps=2, guidance=2.5)
    assert "no inpainting U-Net" in result.params["warnings"][0]


@needs_model
def test_outpaint_keeps_the_original_beyond_the_overlap_band(builtin_engines):
    from pipelines.outpaint import OVERLAP, outpaint
    from training import shapes

    engine, _ = builtin_engines
    original = shapes.sample(3).image
    result = outpaint(
        engine,
        image=Image.fromarray(original),
        left=16,
        top=8,
        prompt="a red circle on grass",
        seed=1,
        steps=4,
        guidance=2.5,
    )
    out = np.asarray(result.images[0])
    assert out.shape == (72, 80, 3) and result.params["inpaint_unet"] == "9-channel"
    inner = original[OVERLAP:, OVERLAP:]  # the band along the extended sides fades into the new area
    assert np.array_equal(out[8 + OVERLAP :, 16 + OVERLAP :], inner)


@needs_model
def test_explain_watches_the_inpainting_unet(builtin_engines):
    from pipelines.explain import explain_inpaint
    from pipelines.inpaint import inpaint

    engine, _ = builtin_engines
    case = _empty_corner_case()
    kwargs = dict(
        image=Image.fromarray(case.image),
        mask=Image.fromarray(case.mask.astype(np.uint8) * 255),
        prompt=case.prompt,
        seed=3,
        steps=6,
        guidance=2.5,
    )
    explained = explain_inpaint(engine, **kwargs)
    assert explained.params["inpaint_unet"] == "9-channel"
    assert explained.explanation.steps == 6 and len(explained.explanation.latents) == 6  # every U-Net call seen
    # the same image as the Inpaint tab's
    assert explained.images[0].tobytes() == inpaint(engine, **kwargs).images[0].tobytes()


def test_pictures_are_inpainted_at_the_scale_the_model_knows(builtin_engines):
    """The built-in model inpaints scenes 64 px tall: a 4x upload runs at 64 px, an outpainting canvas keeps the
    picture at 64 px and grows around it, a wide picture keeps its height of 64 px (brought there by its long side
    it would be 43 px tall, a height the model never saw) and a tall one comes down to it."""
    from pipelines.request import working_size

    engine, _ = builtin_engines
    assert engine.preset.picture_height == 64
    assert working_size(engine, (256, 256)) == (64, 64)
    assert working_size(engine, (64 + 2 * 32, 64), picture_size=(64, 64)) == (128, 64)
    assert working_size(engine, (256 + 2 * 64, 256), picture_size=(256, 256)) == (96, 64)
    assert working_size(engine, (128, 64)) == (128, 64)  # the widest picture the app makes, as it is
    assert working_size(engine, (300, 200)) == (96, 64)
    assert working_size(engine, (300 + 2 * 48, 200), picture_size=(300, 200)) == (128, 64)
    assert working_size(engine, (64, 128)) == (32, 64)
    assert working_size(engine, (400, 100)) == (128, 32)  # wider than the size limit allows at 64 px tall


def test_uploads_above_the_picture_height_keep_their_size(builtin_engines):
    from pipelines.inpaint import inpaint

    engine, _ = builtin_engines
    picture = Image.open(REPO / "assets" / "examples" / "scene_a_256.png")
    mask = Image.open(REPO / "assets" / "examples" / "mask_add_256.png")
    result = inpaint(engine, image=picture, mask=mask, prompt="a big green star", seed=0, steps=2, guidance=2.5)
    assert (result.params["width"], result.params["height"]) == (64, 64) and result.images[0].size == (256, 256)
    out, original = np.asarray(result.images[0]), np.asarray(picture.convert("RGB"))
    outside = np.asarray(mask)[..., 3] == 0
    assert np.array_equal(out[outside], original[outside])  # the upload's own pixels outside the mask, at 256 px


def test_from_truth_diagnosis_scores_the_finished_scene_and_each_method():
    """--from-truth: the finished scene passes its own judge, and each method is scored on the same cases started
    from it (at strength 0.05: one denoising step)."""
    from training import evaluate_inpaint

    scores = evaluate_inpaint.from_truth("validation", 3, 0.05)
    assert scores["finished scene"] == {"add": 1.0, "replace": 1.0}
    assert set(scores) == {"finished scene", "its VAE round trip", "inpainting U-Net, strength 0.05",
                           "latent blending, strength 0.05"}
    for row in scores.values():
        assert 0.0 <= row["add"] <= 1.0 and 0.0 <= row["replace"] <= 1.0


def test_one_step_diagnosis_scores_both_u_nets_at_each_timestep():
    from training import evaluate_inpaint

    scores = evaluate_inpaint.one_step_from_truth("validation", 3, [20, 400])
    assert set(scores) == {f"{name}, t = {t}" for name in ("inpainting U-Net", "base U-Net") for t in (20, 400)}
    for row in scores.values():
        assert 0.0 <= row["add"] <= 1.0 and 0.0 <= row["replace"] <= 1.0


def test_evaluation_engines_decode_through_another_vae_when_given_one(tmp_path):
    from diffusers import AutoencoderKL

    from training import evaluate_inpaint

    other = AutoencoderKL.from_pretrained(REPO / "assets" / "models" / "shapes-ldm" / "vae")
    with torch.no_grad():
        other.decoder.conv_out.bias.fill_(0.25)  # a decoder that differs in one visible place
    other.save_pretrained(tmp_path / "vae")
    engines = evaluate_inpaint.make_engines(None, 1, vae=str(tmp_path / "vae"))
    for engine in engines.values():  # both compared paths decode through it
        assert torch.equal(engine.base.vae.decoder.conv_out.bias, torch.full_like(other.decoder.conv_out.bias, 0.25))
    shipped = evaluate_inpaint.make_engines(None, 1)["inpainting U-Net"].base.vae.decoder.conv_out.bias
    assert not torch.equal(shipped, other.decoder.conv_out.bias)


def test_picture_sizes_measure_trusts_ground_truth_and_scores_each_rule():
    """--picture-sizes: the ground truth passes every outpaint and remove case, and each method is scored on the
    same wide and tall pictures, at their size and larger."""
    from training import evaluate_inpaint

    scores = evaluate_inpaint.picture_sizes("validation", 1)
    assert set(scores) == {"ground truth", "inpainting U-Net", "latent blending", "inpainting U-Net, long side at 64"}
    rows = {f"{orient} {w}x{h}{scale}: {task}" for orient, (w, h) in evaluate_inpaint.PICTURE_CANVASES.items()
            for scale in ("", f", {evaluate_inpaint.UPLOAD_SCALE}x upload") for task in ("outpaint", "remove")}
    assert rows <= set(scores["ground truth"])
    assert all(scores["ground truth"][row] == 1.0 for row in rows)
    for row in scores.values():
        assert all(0.0 <= value <= 1.0 for value in row.values())
    only = evaluate_inpaint.picture_sizes("validation", 1, only="latent blending")  # --only: one method and truth
    assert only == {name: scores[name] for name in ("ground truth", "latent blending")}


def test_card_keeps_the_curve_of_runs_whose_logs_are_gone_and_names_each_start_by_its_run(tmp_path):
    """A card rewritten after a later run keeps the loss rows of the runs before it (their run folders may be on
    another machine), and the reproduce command of a run that went on from the shipped folder names the run folder
    it went on from (the shipped folder then holds the later model)."""
    from training import evaluate_inpaint, train_inpaint

    card = tmp_path / "README.md"
    card.write_text("\n".join(["# card", "", *evaluate_inpaint.CURVE_HEADER, "| 500 | 0.0152 | 3.73e-04 | 0.982 |",
                               "| 1000 | 0.0146 | 3.00e-04 | 1.244 |", "| 1500 | 0.0091 | 2.00e-04 | 1.337 |", "",
                               "## next", "| 99 | not a curve row |"]))
    rows = evaluate_inpaint.earlier_curve_rows(card, 1001)
    assert [row.split("|")[1].strip() for row in rows] == ["500", "1000"]
    assert evaluate_inpaint.earlier_curve_rows(tmp_path / "missing.md", 1001) == []
    log = tmp_path / "log.csv"
    log.write_text("step,s_per_step,loss,lr\n1500,0.5,0.01,1e-4\n2000,0.5,0.02,1e-10\n")
    lines = evaluate_inpaint.curve([log], rows).splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["500", "1000", "1500", "2000"]
    record = {"base": "b", "out": "runs/later", "pool_size": 1, "learning_rate": 1e-4, "step": 2000,
              "init_from": "assets/models/shapes-inpaint", "parent": {"out": "runs/earlier", "step": 1000}}
    assert "--init-from runs/earlier" in train_inpaint.command(record)
    assert "--init-from assets/models/shapes-inpaint" in train_inpaint.command({**record, "parent": None})
    canvas = {**record, "canvas_share": 0.5, "canvas_pool_size": 64, "canvas_masks": "canvas-scene"}
    assert "--canvas-share 0.5 --canvas-pool-size 64 --canvas-masks canvas-scene" in train_inpaint.command(canvas)


def test_repeats_measure_trusts_ground_truth_and_counts_each_prompt_kind():
    """--repeats: the checker finds nothing in an empty new area (the ground truth), and each method is scored with
    the picture's prompt and its background words, on wide and tall canvases; validation prompts are not test's."""
    from training import evaluate_inpaint

    scores = evaluate_inpaint.repeats("validation", 1, only="inpainting U-Net")
    assert set(scores) == {"ground truth", "inpainting U-Net"}
    assert len(scores["ground truth"]) == 4 and set(scores["ground truth"].values()) == {0.0}
    assert all(value in (0.0, 1.0) for value in scores["inpainting U-Net"].values())
    assert not ({e.prompt for e in evaluate_inpaint.split_prompts("validation", 30)}
                & {e.prompt for e in evaluate_inpaint.split_prompts("test", 30)})


def test_canvas_scene_recipe_captions_most_bands_with_the_whole_scene():
    """"canvas-scene" draws more border bands and captions most of them with the whole scene (whose objects the
    picture mostly shows, so the target draws nothing new there); the other masks keep the usual caption modes."""
    from training import inpaint_data

    counts = {"canvas": [0, 0], "canvas-scene": [0, 0]}  # bands, bands captioned with the whole scene
    for recipe, tally in counts.items():
        for seed in range(200):
            size = inpaint_data.CANVAS_SIZES[seed % len(inpaint_data.CANVAS_SIZES)]
            example = inpaint_data.training_example(seed, seed, recipe, size)
            if example.mask_kind == "band":
                tally[0] += 1
                tally[1] += example.mode == "scene"
                if example.mode == "scene" and not example.hidden:
                    assert np.array_equal(example.target, example.source)  # named and shown: nothing drawn again
    assert counts["canvas-scene"][0] > counts["canvas"][0]
    assert counts["canvas-scene"][1] / counts["canvas-scene"][0] > 0.45 > counts["canvas"][1] / counts["canvas"][0]
