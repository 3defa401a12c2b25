"""The Shapes world, the evaluation checker, the training scripts (2-step smoke runs) and the shipped model."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.world import text as world_text
from training import evaluate, shapes, text

REPO = Path(__file__).resolve().parent.parent
SHIPPED_MODEL = REPO / "assets" / "models" / "shapes-ldm"
CAPTIONS = [shapes.sample(seed).caption for seed in range(3000)]


def test_world_is_deterministic_per_seed():
    a, b = shapes.sample(1234), shapes.sample(1234)
    assert a.caption == b.caption
    for field in ("image", "depth", "keypoints", "canny", "depth_image", "pose_image"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert shapes.sample(1235).caption != a.caption or not np.array_equal(shapes.sample(1235).image, a.image)


def test_sample_carries_every_map_at_image_size():
    person_seed = next(s for s in range(200) if shapes.sample(s).scene.objects[0].kind == "person")
    sample = shapes.sample(person_seed)
    assert sample.image.shape == (64, 64, 3) and sample.image.dtype == np.uint8
    assert sample.depth.shape == (64, 64) and 0 <= sample.depth.min() and sample.depth.max() <= 1.1
    for control in (sample.canny, sample.depth_image, sample.pose_image):
        assert control.shape == (64, 64, 3) and control.dtype == np.uint8
    assert sample.keypoints.shape == (18, 3) and sample.keypoints[:, 2].all()
    assert sample.pose_image.sum() > 0 and sample.canny.sum() > 0
    assert sample.objects[0]["kind"] == "person" and len(sample.objects[0]["box"]) == 4


def test_captions_use_only_the_vocabulary():
    vocabulary = set(shapes.vocabulary())
    tokenizer = text.build_tokenizer()
    for caption in CAPTIONS:
        assert set(caption.split()) <= vocabulary, caption
        assert world_text.unknown_words(tokenizer, caption) == []
        assert len(tokenizer(caption).input_ids) <= tokenizer.model_max_length


@pytest.mark.parametrize("pattern", [
    r"^a red circle$", r"^a big \w+ \w+ on the left$", r"^a small \w+ \w+ in the center$",
    r"^an? \w+ \w+ in the top left$", r"^an? \w+ \w+ and an? \w+ \w+$", r"^an? \w+ \w+ left of an? \w+ \w+",
    r"^an? \w+ \w+ above an? \w+ \w+", r"^an? \w+ person waving", r"^an? \w+ person with arms up",
    r" in striped style", r" on grass$", r" at night$",
])
def test_grammar_has_the_required_forms(pattern):
    captions = CAPTIONS if pattern != r"^a red circle$" else [shapes.sample(s).caption for s in range(30000)]
    assert any(re.search(pattern, c) for c in captions), pattern


def test_held_out_pairs_and_unseen_styles_never_appear_in_training():
    for seed in range(3000):
        for obj in shapes.sample(seed).objects:
            assert (obj["colour"], obj["kind"]) not in shapes.HELD_OUT_PAIRS
            assert obj["style"] not in shapes.UNSEEN_STYLES
    assert "checkered" not in shapes.vocabulary()
    assert any(
        o["style"] == "checkered" for s in range(400) for o in shapes.sample(s, allow_unseen_styles=True).objects
    )


def test_unknown_words_are_reported_once_each_in_order():
    tokenizer = text.build_tokenizer()
    assert world_text.unknown_words(tokenizer, "A red DRAGON, a red dragon and a Unicorn!") == ["dragon", "unicorn"]
    assert world_text.unknown_words(tokenizer, "a red circle, on the left.") == []


def test_checker_is_right_on_ground_truth_renders():
    """Scenes rendered exactly as the held-out prompts ask must all pass, or the checker is wrong."""
    rng = np.random.default_rng(0)
    verdicts = []
    for expectation in evaluate.held_out_prompts(100, seed=77):
        if len(expectation.objects) == 1:
            position = expectation.position or str(rng.choice(list(shapes.POSITIONS)))
            centre = shapes.POSITIONS[position][1]
            objects = [shapes.SceneObject(expectation.objects[0][1], expectation.objects[0][0], "small", centre)]
        else:
            centres = {"left of": [(17, 30), (47, 30)], "above": [(30, 17), (30, 47)]}.get(
                expectation.relation, [(15, 15), (49, 49)]
            )
            objects = [shapes.SceneObject(s, c, "small", xy) for (c, s), xy in zip(expectation.objects, centres)]
        image = shapes.render(shapes.Scene(expectation.prompt, expectation.background, objects)).image
        verdicts.append(evaluate.judge(image, expectation))
    scores = evaluate.score(verdicts)
    assert all(value == 1.0 for value in scores.values()), scores


def test_half_contrast_shape_masks_survive_blur():
    """A decoder softens edges; the checker must still see a blurred star as a star (ground truth: the scene)."""
    accuracy = evaluate.checker_accuracy(count=120, blurs=(1.0,))
    assert accuracy["half-contrast, sharp"] >= 0.97 and accuracy["detection, sharp"] >= 0.97
    assert accuracy["half-contrast, blur 1 px"] >= 0.9
    assert accuracy["half-contrast, blur 1 px"] > accuracy["detection, blur 1 px"] + 0.03


def test_checker_rejects_wrong_images():
    expectation = evaluate.Expectation(
        "a red circle in the top left", "plain", [("red", "circle")], position="top left"
    )
    wrong_colour = shapes.render(
        shapes.Scene("", "plain", [shapes.SceneObject("circle", "blue", "small", (15, 15))])
    ).image
    wrong_shape = shapes.render(
        shapes.Scene("", "plain", [shapes.SceneObject("star", "red", "small", (15, 15))])
    ).image
    wrong_place = shapes.render(
        shapes.Scene("", "plain", [shapes.SceneObject("circle", "red", "small", (49, 49))])
    ).image
    empty = shapes.background_image("plain")[0].astype(np.uint8)
    assert evaluate.judge(wrong_colour, expectation)["colour"] is False
    assert evaluate.judge(wrong_shape, expectation)["shape"] is False
    assert evaluate.judge(wrong_place, expectation)["position"] is False
    assert evaluate.judge(empty, expectation)["count"] is False


def test_train_vae_and_ldm_smoke_runs_resume_and_export(tmp_path):
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    from training import train_ldm, train_vae

    vae_dir = tmp_path / "vae"
    train_vae.main(
        [
            "--out",
            str(vae_dir),
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--disc-start",
            "1",
            "--log-every",
            "1",
            "--save-every",
            "2",
        ]
    )
    train_vae.main(
        [
            "--out",
            str(vae_dir),
            "--max-steps",
            "3",
            "--batch-size",
            "4",
            "--disc-start",
            "1",
            "--log-every",
            "1",
            "--save-every",
            "1",
        ]
    )
    assert torch.load(vae_dir / "checkpoint.pt", weights_only=False)["step"] == 3  # resumed, not restarted
    vae = AutoencoderKL.from_pretrained(vae_dir / "vae")
    assert vae.config.scaling_factor > 0
    assert (vae_dir / "log.csv").read_text().count("\n") >= 4 and list((vae_dir / "samples").glob("*.png"))

    ldm_dir = tmp_path / "ldm"
    args = ["--vae", str(vae_dir / "vae"), "--out", str(ldm_dir), "--train-scenes", "16", "--batch-size", "4",
            "--log-every", "1", "--save-every", "2", "--eval-every", "0"]
    train_ldm.main(args + ["--max-steps", "2"])
    pipe = StableDiffusionPipeline.from_pretrained(ldm_dir / "pipeline")
    assert pipe.unet.config.addition_embed_type == "text" and pipe.unet.config.sample_size == 16
    image = pipe(
        "a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images[0]
    assert image.shape == (64, 64, 3)


def test_train_ldm_stop_at_branches_mid_schedule(tmp_path):
    """--stop-at ends a cosine run early with the learning rate it had there; a copied folder goes on from it."""
    import csv
    import shutil

    import torch

    from training import train_ldm, train_vae

    vae_dir = tmp_path / "vae"
    train_vae.main(["--out", str(vae_dir), "--max-steps", "1", "--batch-size", "4", "--log-every", "1"])
    common = ["--vae", str(vae_dir / "vae"), "--train-scenes", "16", "--batch-size", "4", "--log-every", "1",
              "--eval-every", "0", "--cosine-decay", "--max-steps", "4"]
    train_ldm.main(common + ["--out", str(tmp_path / "trunk"), "--stop-at", "2"])
    assert torch.load(tmp_path / "trunk" / "checkpoint.pt", weights_only=False)["step"] == 2
    assert (tmp_path / "trunk" / "pipeline" / "TRAINING_STEP").read_text().strip() == "2"
    shutil.copytree(tmp_path / "trunk", tmp_path / "branch")
    train_ldm.main(common + ["--out", str(tmp_path / "branch"), "--two-object-share", "0.85"])
    train_ldm.main(common + ["--out", str(tmp_path / "straight")])

    def learning_rates(run):
        with open(tmp_path / run / "log.csv") as f:
            return {int(row["step"]): float(row["lr"]) for row in csv.DictReader(f)}

    # the branch's steps 3 and 4 follow the trunk's schedule to --max-steps, not a new warm-up and cosine
    assert learning_rates("branch") == learning_rates("straight")
    assert (
        sorted(learning_rates("branch")) == [1, 2, 3, 4] and learning_rates("branch")[4] < learning_rates("branch")[3]
    )
    assert torch.load(tmp_path / "branch" / "checkpoint.pt", weights_only=False)["step"] == 4


@pytest.mark.skipif(not SHIPPED_MODEL.exists(), reason="assets/models/shapes-ldm is not built yet")
def test_train_ldm_goes_on_from_the_shipped_model_in_world_1_keeping_its_vocabulary(tmp_path):
    """The shipped model was packaged with world 2's generic word: trained on in world 1, it keeps that word (its
    text encoder and tokenizer unchanged), where a world-1 tokenizer would be one token short."""
    from transformers import CLIPTextModel

    from training import train_ldm
    from training.train_ldm import knows_generic_word

    assert knows_generic_word(SHIPPED_MODEL) and not knows_generic_word(tmp_path)
    out = tmp_path / "run"
    train_ldm.main(["--vae", str(SHIPPED_MODEL / "vae"), "--out", str(out), "--init-from", str(SHIPPED_MODEL),
                    "--attention-16x16-up", "--freeze-text-encoder", "--train-scenes", "8", "--batch-size", "4",
                    "--log-every", "1", "--eval-every", "0", "--max-steps", "42501"])
    assert knows_generic_word(out / "pipeline")
    assert (out / "pipeline" / "TRAINING_STEP").read_text().strip() == "42501"
    shipped = CLIPTextModel.from_pretrained(SHIPPED_MODEL / "text_encoder").state_dict()
    trained = CLIPTextModel.from_pretrained(out / "pipeline" / "text_encoder").state_dict()
    assert all(torch.equal(shipped[k], trained[k]) for k in shipped)


@pytest.mark.skipif(not SHIPPED_MODEL.exists(), reason="assets/models/shapes-ldm is not built yet")
def test_train_ldm_moves_every_kth_scene_off_the_worlds_places(tmp_path):
    from diffusers import AutoencoderKL

    from training import train_ldm
    from training.common import images_to_tensor
    from training.train_ldm import encode_scenes

    vae = AutoencoderKL.from_pretrained(SHIPPED_MODEL / "vae").eval()
    with torch.no_grad():
        mean, _, captions = encode_scenes(vae, 4, tmp_path / "latents.pt", moved_every=2)
        pictures = [shapes.sample(0).image, shapes.moved_sample(1).image, shapes.sample(2).image,
                    shapes.moved_sample(3).image]
        expected = vae.encode(images_to_tensor(np.stack(pictures))).latent_dist.mean
        plain, _, _ = encode_scenes(vae, 4, tmp_path / "latents.pt")  # another setting: encoded again
    assert torch.allclose(mean, expected, atol=1e-5) and captions == shapes.batch(range(4))[1]
    assert torch.allclose(plain[::2], mean[::2], atol=1e-5) and not torch.allclose(plain[1::2], mean[1::2], atol=1e-2)
    with pytest.raises(SystemExit):
        train_ldm.main(["--moved-every", "2", "--world", "2"])


@pytest.mark.skipif(not SHIPPED_MODEL.exists(), reason="assets/models/shapes-ldm is not built yet")
def test_shipped_model_loads_with_plain_diffusers_and_is_deterministic():
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED_MODEL)
    pipe.set_progress_bar_config(disable=True)
    runs = [
        pipe(
            "a red circle on the left",
            num_inference_steps=4,
            generator=torch.Generator().manual_seed(7),
            output_type="np",
        ).images[0]
        for _ in range(2)
    ]
    assert runs[0].shape == (64, 64, 3)
    np.testing.assert_array_equal(runs[0], runs[1])
    assert (SHIPPED_MODEL / "README.md").exists()


def test_a_wider_unet_starts_from_the_tensors_that_keep_their_shape():
    from training.train_ldm import LDMConfig, build_unet, load_matching

    narrow, wide = build_unet(LDMConfig()), build_unet(LDMConfig(block_out_channels=(64, 64, 64)))
    fresh = load_matching(wide, narrow.state_dict())
    wide_state, narrow_state = wide.state_dict(), narrow.state_dict()
    assert "conv_in.weight" in fresh  # 4 -> 64 channels now: cannot come from the 32-channel U-Net
    kept = [k for k in wide_state if k not in fresh]
    assert any(".attn2." in k for k in kept)  # the cross-attention levels keep their trained weights
    assert all(torch.equal(wide_state[k], narrow_state[k]) for k in kept)


def test_two_object_scenes_get_the_share_asked_for():
    from training.train_ldm import scene_weights

    captions = shapes.batch(range(400))[1]
    two = torch.tensor([sum(w in shapes.SHAPES for w in c.split()) == 2 for c in captions])
    assert 0.2 < two.float().mean() < 0.6  # the world's own share (two-object scenes are 40% of draws)
    assert scene_weights(captions, 0.0) is None  # uniform: drawn as without the option
    weights = scene_weights(captions, 0.7)
    assert abs(float(weights[two].sum() / weights.sum()) - 0.7) < 1e-5


def test_a_grown_vae_encodes_and_decodes_exactly_like_its_source():
    from diffusers import AutoencoderKL

    from training.train_decoder import grow

    torch.manual_seed(0)
    source = AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                           up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4).eval()
    grown = grow(source, 3).eval()
    assert len(grown.decoder.up_blocks[0].resnets) == 4 and len(grown.encoder.down_blocks[0].resnets) == 3
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        latents = source.encode(images).latent_dist.mode()
        assert torch.equal(grown.encode(images).latent_dist.mode(), latents)
        torch.testing.assert_close(grown.decode(latents).sample, source.decode(latents).sample, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="below the source"):
        grow(grown, 1)

    from training.package import same_encoder  # what lets `training.package` ship the grown decoder

    assert same_encoder(source, grown)
    with torch.no_grad():
        grown.encoder.down_blocks[0].resnets[1].conv2.bias.add_(0.01)  # an added block that is no identity
    assert not same_encoder(source, grown)


def test_train_decoder_smoke_run_keeps_the_encoder_and_resumes(tmp_path):
    from diffusers import AutoencoderKL

    from training import train_decoder, train_vae

    vae_dir = tmp_path / "vae"
    train_vae.main(["--out", str(vae_dir), "--max-steps", "1", "--batch-size", "2", "--log-every", "1"])
    out = tmp_path / "decoder"
    args = [
        "--vae",
        str(vae_dir / "vae"),
        "--out",
        str(out),
        "--layers-per-block",
        "2",
        "--batch-size",
        "2",
        "--log-every",
        "1",
    ]
    train_decoder.main(args + ["--max-steps", "2"])
    train_decoder.main(args + ["--max-steps", "3"])
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 3  # resumed, not restarted
    source, trained = AutoencoderKL.from_pretrained(vae_dir / "vae"), AutoencoderKL.from_pretrained(out / "vae")
    assert trained.config.layers_per_block == 2 and trained.config.scaling_factor == source.config.scaling_factor
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():  # the latent space the U-Net learnt is untouched
        assert torch.equal(trained.encode(images).latent_dist.mode(), source.encode(images).latent_dist.mode())
        assert not torch.equal(trained.decoder.conv_out.weight, source.decoder.conv_out.weight)


def test_train_decoder_with_an_encoder_anchor_trains_the_encoder_near_its_source(tmp_path):
    from diffusers import AutoencoderKL

    from training import train_decoder, train_vae

    vae_dir = tmp_path / "vae"
    train_vae.main(["--out", str(vae_dir), "--max-steps", "1", "--batch-size", "2", "--log-every", "1"])
    with pytest.raises(SystemExit):
        train_decoder.main(["--vae", str(vae_dir / "vae"), "--encoder-anchor", "-1"])
    source = AutoencoderKL.from_pretrained(vae_dir / "vae")
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    drift = {}
    for weight in (1e-3, 1e3):
        out = tmp_path / f"anchor-{weight:g}"
        train_decoder.main(["--vae", str(vae_dir / "vae"), "--out", str(out), "--layers-per-block", "1",
                            "--batch-size", "4", "--world2-share", "0.5", "--encoder-anchor", str(weight),
                            "--learning-rate", "1e-3", "--log-every", "4", "--max-steps", "4"])
        log = (out / "log.csv").read_text().splitlines()  # one row: each row costs two held-out round trips
        assert log[0].split(",")[4] == "anchor" and len(log) == 2
        trained = AutoencoderKL.from_pretrained(out / "vae")
        assert trained.config.scaling_factor == source.config.scaling_factor  # the U-Net's units stay
        with torch.no_grad():
            moved = trained.encode(images).latent_dist.mean - source.encode(images).latent_dist.mean
        drift[weight] = moved.abs().mean()
    assert drift[1e-3] > 0  # the encoder trained
    assert drift[1e3] < drift[1e-3]  # and the anchor held it nearer its source


def test_decoder_batches_mix_the_worlds_by_share():
    from training import shapes
    from training.train_decoder import DecoderConfig, training_images

    seeds = range(40, 44)
    world1 = shapes.batch(seeds, allow_unseen_styles=True)[0]
    world2 = shapes.batch(seeds, allow_unseen_styles=True, world=2)[0]
    assert (training_images(seeds, DecoderConfig())[0] == world1).all()  # the shipped decoder's data, unchanged
    half, captions = training_images(seeds, DecoderConfig(world2_share=0.5))
    assert (half[:2] == world2[:2]).all() and (half[2:] == world1[2:]).all()
    assert captions == shapes.batch(seeds[:2], allow_unseen_styles=True, world=2)[1] + shapes.batch(
        seeds[2:], allow_unseen_styles=True)[1]
    assert (training_images(seeds, DecoderConfig(world2_share=1.0))[0] == world2).all()
    assert not (world1 == world2).all()


def test_decoder_batches_move_shapes_off_the_worlds_places_by_share():
    from training import shapes
    from training.train_decoder import DecoderConfig, moved_count, training_images

    seeds = range(40, 48)
    world1 = shapes.batch(seeds, allow_unseen_styles=True)[0]
    pictures, captions = training_images(seeds, DecoderConfig(moved_share=0.5, unet_latents_share=0.25))
    assert moved_count(8, DecoderConfig(moved_share=0.5, unet_latents_share=0.25)) == 4
    assert moved_count(8, DecoderConfig(moved_share=1.0, unet_latents_share=0.25)) == 6  # not the U-Net's ones
    assert (pictures[4:] == world1[4:]).all() and captions == shapes.batch(seeds, allow_unseen_styles=True)[1]
    for seed, picture, original in zip(seeds[:4], pictures[:4], world1[:4]):
        moved = shapes.moved_sample(seed, allow_unseen_styles=True)
        assert (picture == moved.image).all() and not (picture == original).all()
        before = shapes.sample(seed, allow_unseen_styles=True).scene.objects
        for old, new in zip(before, moved.scene.objects):
            shift = np.abs(np.subtract(new.centre, old.centre))
            assert (shift <= shapes.MOVE_PX).all()
            assert (old.kind, old.colour, old.size) == (new.kind, new.colour, new.size)
            assert old.half_extent <= min(new.centre) and max(new.centre) <= shapes.IMAGE_SIZE - old.half_extent


def test_decoder_learns_from_what_the_unet_makes_of_its_latents(tmp_path):
    from diffusers import AutoencoderKL

    from training import train_decoder
    from training.train_decoder import DecoderConfig, UNetLatents, unet_latents_count

    assert unet_latents_count(8, DecoderConfig()) == 0  # off by default: the shipped decoder's recipe
    assert unet_latents_count(8, DecoderConfig(unet_latents_share=0.75)) == 6
    assert unet_latents_count(8, DecoderConfig(unet_latents_share=1.0, world2_share=0.5)) == 4  # world 1's only
    vae = AutoencoderKL.from_pretrained(SHIPPED_MODEL / "vae").eval()
    pictures, captions = shapes.batch(range(8))
    with torch.no_grad():
        latents = vae.encode(torch.from_numpy(pictures).permute(0, 3, 1, 2) / 127.5 - 1).latent_dist.mean
    scaling, generator = vae.config.scaling_factor, torch.Generator().manual_seed(0)
    near = UNetLatents(SHIPPED_MODEL, DecoderConfig(unet_latents_max_t=2))(latents, captions, scaling, generator)
    far = UNetLatents(SHIPPED_MODEL, DecoderConfig(unet_latents_max_t=999))(latents, captions, scaling, generator)
    assert near.shape == latents.shape
    # at t <= 2 the U-Net has little to redo; from up to t = 999 it draws the objects anew (the flat grounds it
    # predicts well from the caption alone, so the mean moves about 3x, not more)
    assert 0 < (near - latents).abs().mean() < 0.5 * (far - latents).abs().mean()
    out = tmp_path / "decoder"
    train_decoder.main(["--vae", str(SHIPPED_MODEL / "vae"), "--out", str(out), "--batch-size", "2",
                        "--unet-latents-share", "0.5", "--max-steps", "1", "--log-every", "1"])
    assert AutoencoderKL.from_pretrained(out / "vae").config.layers_per_block == vae.config.layers_per_block
    with pytest.raises(SystemExit):
        train_decoder.main(["--vae", str(SHIPPED_MODEL / "vae"), "--unet-latents-share", "1.5"])


@pytest.mark.skipif(not SHIPPED_MODEL.exists(), reason="assets/models/shapes-ldm is not built yet")
def test_vae_ceiling_scores_renders_and_their_round_trips():
    from diffusers import AutoencoderKL

    expectations, images = evaluate.held_out_renders(40)
    assert len(images) == 40 and {len(e.objects) for e in expectations} == {1, 2}
    assert all(e.relation in ("and", "left of", "above") for e in expectations if len(e.objects) == 2)
    ceiling = evaluate.vae_ceiling(AutoencoderKL.from_pretrained(SHIPPED_MODEL / "vae"), count=40)
    assert ceiling["renders_shape"] >= 0.95 and ceiling["renders_binding"] >= 0.9  # the checker on ground truth
    assert ceiling["vae_binding"] >= 0.5  # the shipped decoder keeps most two-object scenes recognisable


def test_attention_added_at_16x16_starts_as_an_identity():
    from training.train_ldm import LDMConfig, build_unet, load_matching, start_added_attention_as_identity

    torch.manual_seed(0)
    source, grown = build_unet(LDMConfig()).eval(), build_unet(LDMConfig(attention_16x16_up=True)).eval()
    assert grown.config.up_block_types[-1] == "CrossAttnUpBlock2D"
    fresh = load_matching(grown, source.state_dict())
    latents, timesteps, text = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 24, 128)
    with torch.no_grad():
        assert not torch.equal(grown(latents, timesteps, text).sample, source(latents, timesteps, text).sample)
        assert start_added_attention_as_identity(grown, fresh) == [
            "up_blocks.2.attentions.0",
            "up_blocks.2.attentions.1",
        ]
        assert torch.equal(grown(latents, timesteps, text).sample, source(latents, timesteps, text).sample)
    wider = build_unet(LDMConfig(block_out_channels=(64, 64, 64)))
    assert (
        start_added_attention_as_identity(wider, load_matching(wider, source.state_dict())) == []
    )  # not only attention


def test_a_second_transformer_layer_starts_as_an_identity():
    from training.train_ldm import LDMConfig, build_unet, load_matching, start_added_attention_as_identity

    torch.manual_seed(0)
    config = LDMConfig(attention_16x16_up=True)
    source = build_unet(config).eval()
    deeper = build_unet(LDMConfig(attention_16x16_up=True, transformer_layers=2)).eval()
    fresh = load_matching(deeper, source.state_dict())
    assert fresh and all(".transformer_blocks.1." in name for name in fresh)
    latents, timesteps, text = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 24, 128)
    with torch.no_grad():
        assert not torch.equal(deeper(latents, timesteps, text).sample, source(latents, timesteps, text).sample)
        added = start_added_attention_as_identity(deeper, fresh)
        assert added and all(name.endswith(".transformer_blocks.1") for name in added)
        assert len(added) == sum(1 for name, _ in source.named_modules() if name.endswith(".transformer_blocks.0"))
        assert torch.equal(deeper(latents, timesteps, text).sample, source(latents, timesteps, text).sample)
    # Trained on, the new layers are no longer zero: they carry gradient at once (the zeroed output layers do)
    deeper.train()
    deeper(latents, timesteps, text).sample.square().mean().backward()
    assert deeper.get_submodule(added[0] + ".ff.net.2").weight.grad.abs().sum() > 0


def test_a_widened_unet_computes_what_it_was_and_its_copies_grow_apart():
    from training.train_ldm import LDMConfig, build_unet, widen_unet

    torch.manual_seed(0)
    source = build_unet(LDMConfig(attention_16x16_up=True)).eval()
    wide = widen_unet(source, 2).eval()
    assert list(wide.config.block_out_channels) == [2 * c for c in source.config.block_out_channels]
    assert sum(p.numel() for p in wide.parameters()) > 3 * sum(p.numel() for p in source.parameters())
    latents, timesteps, text = torch.randn(3, 4, 16, 16), torch.tensor([3, 400, 990]), torch.randn(3, 24, 128)
    with torch.no_grad():
        before, after = source(latents, timesteps, text).sample, wide(latents, timesteps, text).sample
    assert (after - before).abs().max() < 1e-4 * before.abs().mean()  # the same function, to float rounding
    # the two copies of a channel start equal and get different gradients, so training tells them apart
    wide.train()
    wide(latents, timesteps, text).sample.square().mean().backward()
    rows = wide.conv_in.weight.grad
    assert torch.equal(wide.conv_in.weight[0], wide.conv_in.weight[1]) and not torch.allclose(rows[0], rows[1])
    shifted = build_unet(LDMConfig())
    shifted.register_to_config(freq_shift=1)
    with pytest.raises(SystemExit, match="freq_shift 0"):
        widen_unet(shifted, 2)


def test_curve_shows_a_branch_copied_from_its_trunk_once(tmp_path):
    from training.evaluate import curve_markdown

    header = "step,s_per_step,loss,lr,colour,shape,position,binding\n"
    trunk = header + "500,1,0.03,1e-4,0.9,0.8,1,0.2\n550,1,0.02,1e-4,nan,nan,nan,nan\n"
    (tmp_path / "trunk.csv").write_text(trunk)
    (tmp_path / "branch.csv").write_text(trunk + "1000,1,0.01,1e-5,0.95,0.9,1,0.3\n")
    (tmp_path / "other.csv").write_text(header + "500,1,0.05,1e-4,0.5,0.5,0.5,0\n")  # another run at the same step
    table = curve_markdown(
        [f"trunk={tmp_path / 'trunk.csv'}", f"branch={tmp_path / 'branch.csv'}", f"other={tmp_path / 'other.csv'}"]
    )
    assert [line.split(" | ")[:2] for line in table.splitlines() if line.startswith("| ") and "step" not in line] == [
        ["| trunk", "500"], ["| branch", "1000"], ["| other", "500"]]


def test_the_trainers_step_helper_is_the_usual_step_and_due_counts_steps():
    import copy

    from training.common import due, optimizer_step

    torch.manual_seed(0)
    x = torch.randn(4, 3)
    models = [torch.nn.Linear(3, 2)]
    models += [copy.deepcopy(models[0]), copy.deepcopy(models[0])]
    opts = [torch.optim.SGD(m.parameters(), lr=1.0) for m in models]
    optimizer_step(opts[0], (models[0](x) ** 2).sum() * 100, lr=0.1, clip=models[0].parameters())
    for i, clip in ((1, True), (2, False)):  # the same step written out, with and without clipping
        for group in opts[i].param_groups:
            group["lr"] = 0.1
        opts[i].zero_grad(set_to_none=True)
        ((models[i](x) ** 2).sum() * 100).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(models[i].parameters(), 1.0)
        opts[i].step()
    assert all(torch.equal(p, q) for p, q in zip(models[0].parameters(), models[1].parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(models[0].parameters(), models[2].parameters()))
    assert [s for s in range(1, 8) if due(s, 3, 7)] == [3, 6, 7]
    assert not any(due(s, 0, 7) for s in range(1, 8))
