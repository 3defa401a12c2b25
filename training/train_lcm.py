"""Distils the built-in U-Net into a latent consistency model (LCM): images in 1-4 steps with LCMScheduler.

    python -m training.train_lcm --base assets/models/shapes-ldm --out runs/lcm --max-steps 3000 --threads 2
    python -m training.train_lcm --out runs/lcm --export assets/models/shapes-lcm

Reads top to bottom: 1. the base pipeline, frozen: its U-Net is the teacher, its VAE and text encoder encode
the data; 2. the student, a full copy of the teacher U-Net that also takes the guidance scale (diffusers'
`time_cond_proj_dim`: an embedding of the scale added to the time embedding through a linear layer that starts
at zero, so at step 0 the student computes exactly what the teacher does); 3. a pool of training scenes encoded
once (train_ldm.encode_scenes); 4. consistency distillation: the teacher with classifier-free guidance at a scale
drawn from a range takes one DDIM step on a skipping schedule (SOLVER_STEPS of the 1000 training timesteps);
the student's consistency function at the start of that step is pulled towards the target network's (an EMA of
the student) at its end, with a pseudo-Huber loss; 5. every save, a sample grid at 1, 2 and 4 steps and an
exported pipeline folder that `StableDiffusionPipeline.from_pretrained` loads with its LCMScheduler.

Why a full student and not an LCM-LoRA: the U-Net has 1.87 M parameters, so a full copy costs nothing to store
or train, and a LoRA would have to be fused at load time (pipelines/adapters.py) for no saving; the guidance
embedding (the scale chosen at inference without a second, unconditional pass) needs the added layer anyway.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from training.common import (
    SHIPPED_BASE,
    Checkpoint,
    LossLog,
    due,
    folder_step,
    optimizer_step,
    repo_relative,
    save_grid,
    set_threads,
)
from training.text import tokenize
from training.train_ldm import LDMConfig, encode_scenes

# The teacher's DDIM solver takes steps of 1000 / SOLVER_STEPS timesteps. The exported LCMScheduler gets the same
# number as `original_inference_steps`, so that the timesteps it samples at are the ones the student learned.
SOLVER_STEPS = 50
# LCMScheduler's boundary scalings (c_skip, c_out) use `timestep_scaling`; training uses the scheduler's own
# function with this value and exports it, so the two never differ.
TIMESTEP_SCALING = 10.0
# The base scheduler's settings the LCMScheduler takes over. steps_offset does not move LCM's timesteps, but
# StableDiffusionPipeline warns about (and rewrites) a scheduler config without the base's value of 1.
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
                 "rescale_betas_zero_snr", "steps_offset")
GRID_PROMPTS = 8  # validation prompts in each sample grid (columns)
GRID_STEPS = (1, 2, 4)  # LCM step counts in each sample grid (rows)


@dataclass
class LCMConfig:
    pool_size: int = LDMConfig.train_scenes  # the base's own training scenes (seeds 0 .. pool_size - 1)
    batch_size: int = 64
    learning_rate: float = 1e-4  # the student starts trained: below the base's 5e-4 from scratch
    warmup_steps: int = 100
    # Classifier-free guidance scales the teacher is run at (the pipeline's `guidance_scale`, drawn uniformly per
    # example): around the built-in preset's 2.5, so the distilled model follows its guidance slider there.
    guidance_min: float = 1.5
    guidance_max: float = 4.0
    guidance_embedding_dim: int = 64  # `time_cond_proj_dim`: sinusoidal embedding of the scale
    ema_decay: float = 0.95  # the target network: an EMA of the student that follows it closely
    huber_c: float = 0.001  # pseudo-Huber loss: L2 for small errors, L1 for large ones (less weight on outliers)


# ----------------------------------------------------------------------------- models and the consistency step

def make_student(teacher, guidance_embedding_dim: int):
    """A copy of `teacher` that also takes the guidance embedding (`timestep_cond`). Its added layer
    (time_embedding.cond_proj) starts at zero, so the copy computes exactly what the teacher does."""
    from diffusers import UNet2DConditionModel

    config = dict(teacher.config)
    config["time_cond_proj_dim"] = guidance_embedding_dim
    student = UNet2DConditionModel.from_config(config)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if missing != ["time_embedding.cond_proj.weight"] or unexpected:
        raise RuntimeError(f"teacher and student differ beyond the guidance layer: {missing}, {unexpected}")
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.zero_()
    return student


def lcm_scheduler(base_scheduler_config):
    """The LCMScheduler of the distilled model: the base's noise schedule and prediction type. Only those keys are
    taken, so the exported config holds no settings of the base's own (multistep) scheduler."""
    from diffusers import LCMScheduler

    schedule = {key: base_scheduler_config[key] for key in SCHEDULE_KEYS if key in base_scheduler_config}
    return LCMScheduler(**schedule, original_inference_steps=SOLVER_STEPS, timestep_scaling=TIMESTEP_SCALING)


def clean_and_noise(output, noisy, alpha, sigma, prediction_type: str):
    """(predicted clean latents, predicted noise) from a U-Net output at a noise level (alpha, sigma)."""
    if prediction_type == "v_prediction":  # v = alpha * eps - sigma * x0
        return alpha * noisy - sigma * output, alpha * output + sigma * noisy
    if prediction_type == "epsilon":
        return (noisy - sigma * output) / alpha, output
    raise ValueError(f"prediction_type={prediction_type!r}: epsilon or v_prediction")


class DDIMSolver:
    """DDIM steps on the skipping schedule: timesteps k-1, 2k-1, ..., 999 with k = 1000 / steps, the schedule
    LCMScheduler samples from (`original_inference_steps`)."""

    def __init__(self, alphas_cumprod: torch.Tensor, steps: int):
        self.skip = len(alphas_cumprod) // steps
        self.timesteps = torch.arange(1, steps + 1) * self.skip - 1
        # alpha-bar one skip earlier; for the first timestep that is the clean end (t = 0)
        self.alphas_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[self.timesteps[:-1]]])

    def step(self, clean, noise, index: torch.Tensor):
        alpha_prev = self.alphas_prev[index].view(-1, 1, 1, 1)
        return alpha_prev.sqrt() * clean + (1 - alpha_prev).sqrt() * noise


class Distiller:
    """The teacher (frozen), student and target U-Nets with what a consistency step needs."""

    def __init__(self, pipe, student, target, config: LCMConfig):
        self.pipe, self.teacher, self.student, self.target, self.config = pipe, pipe.unet, student, target, config
        self.prediction_type = pipe.scheduler.config.prediction_type
        self.scheduler = lcm_scheduler(pipe.scheduler.config)
        alphas_cumprod = self.scheduler.alphas_cumprod
        self.alpha, self.sigma = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
        self.solver = DDIMSolver(alphas_cumprod, SOLVER_STEPS)

    def guidance_embedding(self, scale: torch.Tensor) -> torch.Tensor:
        # The pipeline's own function, with the pipeline's convention (scale - 1), so training and inference match.
        return self.pipe.get_guidance_scale_embedding(scale - 1, embedding_dim=self.config.guidance_embedding_dim)

    def consistency(self, unet, noisy, timesteps, hidden, embedding):
        """The consistency function f(x_t, t) = c_skip(t) x_t + c_out(t) x0(x_t, t), as LCMScheduler.step forms it."""
        output = unet(noisy, timesteps, hidden, timestep_cond=embedding).sample
        view = (-1, 1, 1, 1)
        clean, _ = clean_and_noise(output, noisy, self.alpha[timesteps].view(view), self.sigma[timesteps].view(view),
                                   self.prediction_type)
        c_skip, c_out = self.scheduler.get_scalings_for_boundary_condition_discrete(timesteps.float())
        return c_skip.view(view) * noisy + c_out.view(view) * clean

    @torch.no_grad()
    def teacher_step(self, noisy, timesteps, index, hidden, empty, scale):
        """One DDIM step of the teacher under classifier-free guidance at `scale` (per example)."""
        view = (-1, 1, 1, 1)
        output = self.teacher(torch.cat([noisy, noisy]), torch.cat([timesteps, timesteps]),
                              torch.cat([hidden, empty.expand_as(hidden)])).sample
        alpha, sigma = self.alpha[timesteps].view(view), self.sigma[timesteps].view(view)
        cond, uncond = output.chunk(2)
        cond_clean, cond_noise = clean_and_noise(cond, noisy, alpha, sigma, self.prediction_type)
        uncond_clean, uncond_noise = clean_and_noise(uncond, noisy, alpha, sigma, self.prediction_type)
        scale = scale.view(view)
        clean = uncond_clean + scale * (cond_clean - uncond_clean)
        noise = uncond_noise + scale * (cond_noise - uncond_noise)
        return self.solver.step(clean, noise, index)

    def loss(self, latents, hidden, empty, generator: torch.Generator) -> torch.Tensor:
        batch = latents.shape[0]
        index = torch.randint(0, SOLVER_STEPS, (batch,), generator=generator)
        start = self.solver.timesteps[index]
        end = (start - self.solver.skip).clamp(min=0)
        noise = torch.randn(latents.shape, generator=generator)
        view = (-1, 1, 1, 1)
        noisy = self.alpha[start].view(view) * latents + self.sigma[start].view(view) * noise
        scale = self.config.guidance_min + (self.config.guidance_max - self.config.guidance_min) * torch.rand(
            batch, generator=generator
        )
        embedding = self.guidance_embedding(scale)
        prediction = self.consistency(self.student, noisy, start, hidden, embedding)
        with torch.no_grad():
            previous = self.teacher_step(noisy, start, index, hidden, empty, scale)
            target = self.consistency(self.target, previous, end, hidden, embedding)
        c = self.config.huber_c
        return (torch.sqrt((prediction - target) ** 2 + c * c) - c).mean()

    @torch.no_grad()
    def update_target(self) -> None:
        for t, s in zip(self.target.parameters(), self.student.parameters()):
            t.lerp_(s, 1 - self.config.ema_decay)


# ----------------------------------------------------------------------------- pipeline, grid, export

def assemble_pipeline(pipe, unet):
    """The distilled model as a Stable Diffusion pipeline: the base's VAE, text encoder and tokenizer, `unet`,
    an LCMScheduler."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=unet,
        scheduler=lcm_scheduler(pipe.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def default_guidance() -> float:
    """The built-in preset's guidance scale: the distilled model is shown and judged where the app runs the base."""
    from pipelines.registry import PRESETS

    return PRESETS["shapes"].default_guidance


@torch.no_grad()
def sample_grid(pipe, path: Path, steps=GRID_STEPS, count: int = GRID_PROMPTS) -> None:
    """One row per step count, one column per validation prompt (never the reported test prompts), fixed seeds."""
    from training import splits

    pipe.set_progress_bar_config(disable=True)
    prompts = [e.prompt for e in splits.prompts("validation", count)]
    rows = []
    for n in steps:
        generators = [torch.Generator().manual_seed(i) for i in range(count)]
        out = pipe(prompts, num_inference_steps=n, guidance_scale=default_guidance(), generator=generators,
                   output_type="np").images
        rows.append(np.round(out * 255).astype(np.uint8))
    save_grid(np.concatenate(rows), path, columns=count)


def export_run(pipe, unet, target: Path, *, step: int, base: Path, config: LCMConfig, out_dir: Path) -> None:
    """A pipeline folder (safetensors) plus TRAINING_STEP and training.json (what made it, and the command)."""
    assemble_pipeline(pipe, unet).save_pretrained(target, safe_serialization=True)
    (Path(target) / "TRAINING_STEP").write_text(f"{step}\n")
    record = {
        "base": repo_relative(base),
        "base_step": folder_step(base),
        "step": step,
        "out": repo_relative(out_dir),
        **asdict(config),
    }
    record["command"] = command(record)
    (Path(target) / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def command(record: dict) -> str:
    """The train_lcm command line that makes the run `record` (a training.json) describes."""
    return (
        f"python -m training.train_lcm --base {record['base']} --out {record['out']} "
        f"--pool-size {record['pool_size']} --batch-size {record['batch_size']} "
        f"--learning-rate {record['learning_rate']:g} --guidance-min {record['guidance_min']:g} "
        f"--guidance-max {record['guidance_max']:g} --max-steps {record['step']}"
    )


def export(out_dir: Path, target: Path) -> None:
    """Copies a run's exported pipeline folder (out/pipeline) to `target`."""
    source = Path(out_dir) / "pipeline"
    if not (source / "model_index.json").is_file():
        raise SystemExit(f"{source} holds no exported pipeline yet: train first")
    shutil.copytree(source, target, dirs_exist_ok=True)
    print(f"exported {source} -> {target}")


# ----------------------------------------------------------------------------- training

def load_base(base: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    for module in (pipe.vae, pipe.text_encoder, pipe.unet):
        module.eval().requires_grad_(False)
    return pipe


def train(
    base: Path,
    out_dir: Path,
    max_steps: int,
    config: LCMConfig,
    *,
    log_every=50,
    save_every=250,
    seed=0,
):
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    # 1-2. Teacher, student, target; resume if a checkpoint exists.
    pipe = load_base(base)
    student = make_student(pipe.unet, config.guidance_embedding_dim).train()
    target = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=config.learning_rate, weight_decay=1e-2)
    step = 0
    checkpoint = Checkpoint(out_dir)
    state = checkpoint.load()
    if state is not None:
        student.load_state_dict(state["student"])
        target.load_state_dict(state["target"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        print(f"resumed from {checkpoint.path} at step {step}")
    distiller = Distiller(pipe, student, target, config)

    # 3. The pool: latent posteriors of the training scenes and their captions' ids, once.
    mean, std, captions = encode_scenes(pipe.vae, config.pool_size, out_dir / "latents.pt")
    ids = tokenize(pipe.tokenizer, captions)
    with torch.no_grad():
        empty = pipe.text_encoder(tokenize(pipe.tokenizer, [""])).last_hidden_state  # the unconditional branch
    scaling = pipe.vae.config.scaling_factor
    log = LossLog(out_dir, ["loss", "lr"])
    generator = torch.Generator().manual_seed(seed + step)
    print(f"student U-Net {sum(p.numel() for p in student.parameters()) / 1e6:.2f} M parameters from {base}, "
          f"{len(captions)} scenes", flush=True)

    # 4. Consistency distillation.
    while step < max_steps:
        index = torch.randint(0, len(captions), (config.batch_size,), generator=generator)
        latents = (mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)) * scaling
        with torch.no_grad():
            hidden = pipe.text_encoder(ids[index]).last_hidden_state  # (B, 24, 128)
        loss = distiller.loss(latents, hidden, empty, generator)
        lr = config.learning_rate * min(1.0, (step + 1) / config.warmup_steps)
        optimizer_step(opt, loss, lr=lr, clip=student.parameters())
        distiller.update_target()
        step += 1

        if due(step, log_every, max_steps):
            log.write(step, loss=loss.item(), lr=lr)
        if due(step, save_every, max_steps):
            checkpoint.save({"student": student.state_dict(), "target": target.state_dict(),
                             "opt": opt.state_dict(), "step": step, "config": asdict(config)})
            # 5. The target (the EMA) is exported: the smoother of the two, and what the consistency loss aims at.
            export_run(pipe, target, out_dir / "pipeline", step=step, base=base, config=config, out_dir=out_dir)
            sample_grid(assemble_pipeline(pipe, target), out_dir / "samples" / f"step-{step:06d}.png")
    return target


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=SHIPPED_BASE, help="the base pipeline folder (the teacher)")
    parser.add_argument("--out", type=Path, default=Path("runs/lcm"),
                        help="run folder: latents, checkpoint, log, samples, pipeline/")
    parser.add_argument("--max-steps", type=int, default=3000,
                        help="train until this step (resumes from the checkpoint)")
    parser.add_argument("--pool-size", type=int, default=LCMConfig.pool_size, help="training scenes encoded once")
    parser.add_argument("--batch-size", type=int, default=LCMConfig.batch_size)
    parser.add_argument("--learning-rate", type=float, default=LCMConfig.learning_rate)
    parser.add_argument("--guidance-min", type=float, default=LCMConfig.guidance_min,
                        help="lowest classifier-free guidance scale the teacher is distilled at")
    parser.add_argument("--guidance-max", type=float, default=LCMConfig.guidance_max)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--export", type=Path, default=None, metavar="FOLDER",
                        help="copy the run's exported pipeline to FOLDER (e.g. assets/models/shapes-lcm) and exit")
    args = parser.parse_args(argv)
    if args.export:
        export(args.out, args.export)
        return
    set_threads(args.threads)
    config = LCMConfig(pool_size=args.pool_size, batch_size=args.batch_size, learning_rate=args.learning_rate,
                       guidance_min=args.guidance_min, guidance_max=args.guidance_max)
    train(args.base, args.out, args.max_steps, config, log_every=args.log_every, save_every=args.save_every)


if __name__ == "__main__":
    main()
