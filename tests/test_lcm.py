"""Latent consistency distillation of the built-in U-Net (training/train_lcm.py): the student starts as the
teacher, and a 2-step run resumes and exports a pipeline that diffusers runs with LCMScheduler."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from training import train_lcm

BASE = Path(__file__).resolve().parent.parent / "assets" / "models" / "shapes-ldm"
pytestmark = pytest.mark.skipif(not (BASE / "model_index.json").is_file(), reason="the built-in model is missing")


def test_student_starts_as_the_teacher():
    pipe = train_lcm.load_base(BASE)
    config = train_lcm.LCMConfig()
    student = train_lcm.make_student(pipe.unet, config.guidance_embedding_dim)
    assert student.config.time_cond_proj_dim == config.guidance_embedding_dim
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(4, 4, 16, 16, generator=generator)
    timesteps = torch.tensor([19, 259, 639, 999])
    hidden = pipe.text_encoder(train_lcm.tokenize(pipe.tokenizer, ["a red circle"] * 4)).last_hidden_state
    distiller = train_lcm.Distiller(pipe, student, student, config)
    embedding = distiller.guidance_embedding(torch.tensor([1.5, 2.5, 3.0, 4.0]))
    with torch.no_grad():
        expected = pipe.unet(noisy, timesteps, hidden).sample
        got = student(noisy, timesteps, hidden, timestep_cond=embedding).sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_ddim_solver_is_the_lcm_schedule():
    from diffusers import LCMScheduler

    pipe = train_lcm.load_base(BASE)
    scheduler = train_lcm.lcm_scheduler(pipe.scheduler.config)
    assert isinstance(scheduler, LCMScheduler)
    assert scheduler.config.prediction_type == pipe.scheduler.config.prediction_type == "v_prediction"
    solver = train_lcm.DDIMSolver(scheduler.alphas_cumprod, train_lcm.SOLVER_STEPS)
    scheduler.set_timesteps(4)
    # every timestep LCMScheduler samples at is one the student was trained on
    assert set(scheduler.timesteps.tolist()) <= set(solver.timesteps.tolist())
    # v-prediction: the clean latents and noise recovered from v are the ones that made it
    alpha, sigma = torch.tensor(0.6), torch.tensor(0.8)
    clean, noise = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    got_clean, got_noise = train_lcm.clean_and_noise(alpha * noise - sigma * clean, alpha * clean + sigma * noise,
                                                     alpha, sigma, "v_prediction")
    torch.testing.assert_close(got_clean, clean)
    torch.testing.assert_close(got_noise, noise)


def test_two_steps_resume_and_export(tmp_path):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    out = tmp_path / "run"
    args = ["--base", str(BASE), "--out", str(out), "--pool-size", "32", "--batch-size", "4",
            "--log-every", "1", "--save-every", "2", "--threads", "1"]
    train_lcm.main(args + ["--max-steps", "2"])
    assert (out / "samples" / "step-000002.png").is_file()
    train_lcm.main(args + ["--max-steps", "3"])
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 3
    assert (out / "log.csv").read_text().splitlines()[-1].startswith("3,")

    folder = tmp_path / "exported"
    train_lcm.main(["--out", str(out), "--export", str(folder)])
    assert (folder / "TRAINING_STEP").read_text().strip() == "3"
    record = json.loads((folder / "training.json").read_text())
    assert record["step"] == 3 and "--max-steps 3" in record["command"] and "--pool-size 32" in record["command"]

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    # the folder's own scheduler is the LCMScheduler, with the teacher's prediction type
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.config.time_cond_proj_dim == train_lcm.LCMConfig.guidance_embedding_dim
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, guidance_scale=2.5, generator=torch.Generator().manual_seed(0),
                 output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_tiny_autoencoder_trains_resumes_exports_and_drops_in(tmp_path):
    """training/train_tiny_vae.py: 2 steps, resume to 3, export with its card; the folder is an AutoencoderTiny
    that a pipeline takes as its `vae` (it works on the U-Net's scaled latents)."""
    from diffusers import AutoencoderTiny, StableDiffusionPipeline

    from training import train_tiny_vae

    out = tmp_path / "run"
    args = ["--base", str(BASE), "--out", str(out), "--pool-size", "16", "--batch-size", "4", "--log-every", "1",
            "--save-every", "2", "--eval-scenes", "8", "--threads", "1"]
    train_tiny_vae.main(args + ["--max-steps", "2"])
    assert (out / "samples" / "step-000002.png").is_file() and (out / "images.npy").is_file()
    train_tiny_vae.main(args + ["--max-steps", "3"])
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 3
    folder = tmp_path / "tiny"
    train_tiny_vae.main(["--out", str(out), "--export", str(folder)])
    record = json.loads((folder / "training.json").read_text())
    assert record["step"] == 3 and "--max-steps 3" in record["command"]
    assert set(record["held_out"]) == {"psnr_base_decoder", "psnr_tiny_decoder", "psnr_tiny_vs_base_decoder",
                                       "psnr_tiny_round_trip"}
    card = (folder / "README.md").read_text()
    assert f"| tiny decoder vs the render | {record['held_out']['psnr_tiny_decoder']:.2f} dB |" in card
    tiny = AutoencoderTiny.from_pretrained(folder)
    assert tiny.config.scaling_factor == 1.0
    pipe = StableDiffusionPipeline.from_pretrained(BASE, vae=tiny, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 4
    image = pipe("a red circle", num_inference_steps=2, guidance_scale=2.5, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "models"


def test_the_shipped_distilled_card_is_what_its_writer_makes(tmp_path):
    """The distilled model's card, rewritten from its record and scores.json, is the shipped bytes."""
    import shutil

    from training import evaluate_lcm

    lcm = tmp_path / "shapes-lcm"
    shutil.copytree(SHIPPED / "shapes-lcm", lcm, ignore=shutil.ignore_patterns("*.safetensors"))
    scores = json.loads((lcm / "scores.json").read_text())
    evaluate_lcm.write_card(lcm, scores["test"], scores["validation"], "assets/models/shapes-lcm")
    assert (lcm / "README.md").read_text() == (SHIPPED / "shapes-lcm" / "README.md").read_text()
    assert (lcm / "scores.json").read_text() == (SHIPPED / "shapes-lcm" / "scores.json").read_text()
