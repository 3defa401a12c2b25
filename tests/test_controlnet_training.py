"""ControlNet training for the Shapes LDM: the f=4 ControlNet build, a 2-step smoke run against a tiny
Shapes-like pipeline (export, resume), and the exported ControlNet in StableDiffusionControlNetPipeline."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training import shapes
from training.train_controlnet import ControlNetConfig, controlnet_from_unet, train, training_seeds


@pytest.fixture(scope="module")
def tiny_ldm(tmp_path_factory):
    """A random-weight pipeline with the Shapes LDM's layout (f=4 VAE, text-pooled U-Net), saved like the real one."""
    from tests.tiny_models import _save_pipeline, shapes_like_components

    return _save_pipeline(shapes_like_components(), tmp_path_factory.mktemp("tiny-ldm") / "pipeline")


@pytest.fixture(scope="module")
def smoke_run(tiny_ldm, tmp_path_factory):
    out = tmp_path_factory.mktemp("controlnet-canny")
    config = ControlNetConfig(train_scenes=8, batch_size=4, sample_count=2, sample_steps=2)
    train("canny", tiny_ldm, out, 2, config, log_every=1, save_every=2, eval_every=2)
    return out, config


def test_controlnet_from_unet_fits_the_f4_vae_and_keeps_the_text_heads():
    from tests.tiny_models import shapes_like_components

    unet = shapes_like_components()["unet"]
    controlnet = controlnet_from_unet(unet, (16, 32, 96))
    assert controlnet.config.addition_embed_type_num_heads == unet.config.addition_embed_type_num_heads == 4
    for name in ("conv_in", "time_embedding", "add_embedding", "down_blocks", "mid_block"):
        theirs = getattr(unet, name).state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in getattr(controlnet, name).state_dict().items()), name
    latents, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    text = torch.randn(1, 24, unet.config.cross_attention_dim)
    with torch.no_grad():
        down, mid = controlnet(
            latents, t, encoder_hidden_states=text, controlnet_cond=torch.rand(1, 3, 64, 64), return_dict=False
        )
        # Zero convs: a fresh ControlNet leaves the U-Net's prediction unchanged.
        plain = unet(latents, t, text).sample
        steered = unet(
            latents, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
    assert down[0].shape[-2:] == (16, 16) and torch.equal(plain, steered)


def test_pose_controlnets_train_on_scenes_with_a_person():
    seeds = training_seeds("pose", 4)
    assert all(shapes.sample(s).keypoints[:, 2].sum() > 0 for s in seeds)
    assert training_seeds("canny", 3) == [0, 1, 2]


def test_two_step_run_exports_a_diffusers_controlnet_and_resumes(smoke_run, tiny_ldm):
    out, config = smoke_run
    folder = out / "controlnet"
    assert (folder / "diffusion_pytorch_model.safetensors").is_file() and (folder / "config.json").is_file()
    info = json.loads((folder / "training.json").read_text())
    assert info["steps"] == 2 and info["control"] == "canny"
    assert json.loads((folder / "config.json").read_text())["conditioning_embedding_out_channels"] == [16, 32, 96]
    assert (out / "samples" / "step-000002.png").is_file() and (out / "dataset.pt").is_file()
    assert [line.split(",")[0] for line in (out / "log.csv").read_text().splitlines()] == ["step", "1", "2"]
    train("canny", tiny_ldm, out, 3, config, log_every=1, save_every=1, eval_every=0)
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 3
    assert (out / "log.csv").read_text().splitlines()[-1].startswith("3,")


def test_trained_controlnet_runs_in_the_controlnet_pipeline_with_the_shared_unet(smoke_run, tiny_ldm):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline

    base = StableDiffusionPipeline.from_pretrained(tiny_ldm)
    controlnet = ControlNetModel.from_pretrained(smoke_run[0] / "controlnet")
    pipe = StableDiffusionControlNetPipeline.from_pipe(base, controlnet=controlnet)
    assert pipe.unet is base.unet and pipe.vae is base.vae  # one U-Net in memory
    assert base.vae_scale_factor == 4
    pipe.set_progress_bar_config(disable=True)
    edges = shapes.sample(3).canny
    out = pipe(
        "a red circle",
        image=torch.from_numpy(edges).permute(2, 0, 1)[None].float() / 255,
        num_inference_steps=2,
        guidance_scale=4.0,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()


def test_control_following_scores_a_controlnet(smoke_run, tiny_ldm):
    from diffusers import ControlNetModel, StableDiffusionPipeline

    from training import evaluate

    base = StableDiffusionPipeline.from_pretrained(tiny_ldm)
    controlnet = ControlNetModel.from_pretrained(smoke_run[0] / "controlnet")
    result = evaluate.control_following(base, controlnet, "canny", count=2, steps=2, batch=2)
    scores = result["scores"]
    assert set(scores) >= {"edge_f1", "edge_f1_reference", "edge_f1_without_controlnet"}
    assert scores["edge_f1_reference"] == 1.0  # canny of the render is the control map itself
    assert result["images"].shape == (2, 64, 64, 3)
    from training import cards

    card = cards.write_controlnet_card(smoke_run[0] / "controlnet", "canny", scores).read_text()
    assert "edge_f1_without_controlnet" in card and "--control canny" in card and "(16, 32, 96)" in card


def test_controlnet_card_shows_world_2_figures_and_how_they_were_made(tmp_path):
    """A world-2 ControlNet's card: its data and caption mode, the world-2 table (this ControlNet, the one it
    replaced, none) from evaluate_v2 reports, and the commands that train and measure it again."""
    import json
    import shutil

    from training import cards
    from training.common import REPO

    folder = tmp_path / "shapes-controlnet-depth"
    shutil.copytree(REPO / "assets" / "models" / "shapes-controlnet-depth", folder,
                    ignore=shutil.ignore_patterns("*.safetensors"))
    record = json.loads((folder / "training.json").read_text())
    record["config"].update(world=2, captions="control")
    (folder / "training.json").write_text(json.dumps(record))

    def report(iou):
        return {"split": "test", **{f"silhouette depth {c}": {"iou": iou, "iou_without_controlnet": 0.25, "maps": 7}
                                    for c in ("form-free", "named")}}

    scores = cards.world2_scores("depth", report(0.8125), report(0.5))
    (folder / cards.WORLD2_SCORES).write_text(json.dumps(scores))
    card = cards.write_controlnet_card(folder, "depth", {"depth_pearson": 0.9}).read_text()
    assert "| form left to the map (\"a green shape\") | 7 | 0.812 | 0.500 | 0.250 |" in card
    assert "--world 2 --captions control" in card and "world-2 Shapes-world scenes" in card
    assert "python -m training.cards --world2 depth=" in card and "--measures silhouette" in card
