"""Trains a ControlNet (canny, depth or pose) for the Shapes LDM on Shapes-world (control map, caption, image) triples.

    python -m training.train_controlnet --control canny --ldm assets/models/shapes-ldm \
        --out runs/controlnet-canny --max-steps 2000 --threads 1

A ControlNet follows the U-Net it was trained against; training.json records that base's folder, step and (for
a committed folder) commit, and `--ldm-step` makes a run refuse a base at another step.

Reads top to bottom (Zhang et al. 2023, on the LDM of Rombach et al. 2022):
1. load the LDM from its diffusers folder and freeze its U-Net, VAE and text encoder;
2. make the ControlNet: a trainable copy of the U-Net's encoder (conv_in, time and text embeddings,
   down blocks, mid block) with zero-initialised output convs, so training starts from the LDM's own
   behaviour; its conditioning embedding has three entries because the VAE is f=4 (each entry after
   the first halves the map: 64 -> 16), and it takes the U-Net's `addition_embed_type_num_heads`,
   which diffusers' `from_unet` does not copy;
3. render the training scenes once and cache their VAE posteriors, control maps and caption embeddings
   (pose: only scenes with a person);
4. train the U-Net's own target (eps or v) through the frozen U-Net with the ControlNet's residuals added to its skips,
   min-SNR weighting and caption dropout (as train_ldm);
5. every `--eval-every` steps draw held-out control maps into a sample grid (control | output | reference)
   and export OUT/controlnet (save_pretrained, safetensors) with OUT/controlnet/training.json;
   resume from OUT/checkpoint.pt.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    ControlNetModel,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

from training import common, shapes
from training.annotators import person_seeds
from training.common import HELD_OUT_SEED, Checkpoint, LossLog, images_to_tensor, save_grid, set_threads
from training.text import tokenize
from training.train_ldm import SCHEDULE, loss_weights

CONTROLS = ("canny", "depth", "pose")
CONTROL_MAP = {"canny": "canny", "depth": "depth_image", "pose": "pose_image"}  # Sample attribute of each control map


@dataclass
class ControlNetConfig:
    # f=4 VAE: entries after the first are stride-2 stages, so 3 entries shrink 64x64 maps to 16x16 latents.
    conditioning_channels: tuple = (16, 32, 96)
    train_scenes: int = 12_000  # rendered and encoded once; pose: scenes with a person
    batch_size: int = 32
    learning_rate: float = 2e-4
    warmup_steps: int = 100
    caption_dropout: float = 0.1  # empty captions, so the ControlNet also works on CFG's unconditional branch
    min_snr_gamma: float = 5.0  # as train_ldm
    sample_count: int = 8  # held-out control maps in each sample grid
    sample_steps: int = 20
    sample_guidance: float = 4.0
    # World 2 (docs/MODEL_V2.md): its scenes; and which caption each scene is trained with: "caption" (the
    # scene's own), or "control" (the map decides what it shows: pose captions without pose words, depth and
    # canny captions with the generic word for the form; see training_caption).
    world: int = 1
    captions: str = "caption"


# ----------------------------------------------------------------------------- the model

def controlnet_from_unet(
    unet: UNet2DConditionModel, conditioning_channels=ControlNetConfig.conditioning_channels
) -> ControlNetModel:
    """A ControlNet that copies `unet`'s encoder, sized for the VAE's factor, with the U-Net's text-pooling heads.

    diffusers' `ControlNetModel.from_unet` does not pass `addition_embed_type_num_heads`; with the Shapes
    U-Net's addition_embed_type="text" the ControlNet would pool the text with 64 heads (default) while the
    U-Net uses its own count, and loading the U-Net's add_embedding would silently compute something else
    (or fail when 64 does not divide the width). So: take from_unet's config, add the head count,
    construct directly, and copy the encoder weights exactly as from_unet does.
    """
    template = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(conditioning_channels),
                                         load_weights_from_unet=False)
    # Direct construction: from_config would reset keys listed in the config's "_use_default_values".
    settings = {k: v for k, v in template.config.items() if not k.startswith("_")}
    settings["addition_embed_type_num_heads"] = unet.config.get("addition_embed_type_num_heads", 64)
    controlnet = ControlNetModel(**settings)
    controlnet.conv_in.load_state_dict(unet.conv_in.state_dict())
    controlnet.time_proj.load_state_dict(unet.time_proj.state_dict())
    controlnet.time_embedding.load_state_dict(unet.time_embedding.state_dict())
    if controlnet.class_embedding is not None:
        controlnet.class_embedding.load_state_dict(unet.class_embedding.state_dict())
    if getattr(controlnet, "add_embedding", None) is not None:
        controlnet.add_embedding.load_state_dict(unet.add_embedding.state_dict())
    controlnet.down_blocks.load_state_dict(unet.down_blocks.state_dict())
    controlnet.mid_block.load_state_dict(unet.mid_block.state_dict())
    return controlnet


# ----------------------------------------------------------------------------- data

def training_seeds(control: str, count: int, start: int = 0) -> list[int]:
    """Scene seeds for a control type: any scene for canny/depth, scenes with a person for pose."""
    return person_seeds(start, count) if control == "pose" else list(range(start, start + count))


def control_tensor(maps: np.ndarray) -> torch.Tensor:
    """(N, 64, 64, 3) uint8 -> (N, 3, 64, 64) float in [0, 1], as the ControlNet pipelines feed control images."""
    return torch.from_numpy(np.ascontiguousarray(maps)).permute(0, 3, 1, 2).float().div(255)


CAPTION_MODES = ("caption", "control")


def training_caption(sample: shapes.Sample, control: str, mode: str) -> str:
    """The caption a training scene is paired with (see ControlNetConfig.captions)."""
    if mode == "caption":
        return sample.caption
    if mode != "control":
        raise ValueError(f"captions={mode!r}; choose one of {CAPTION_MODES}")
    return shapes.caption_without_pose(sample) if control == "pose" else shapes.form_free_caption(sample)


@torch.no_grad()
def encode_dataset(
    control: str, seeds: list[int], vae, tokenizer, text_encoder, cache: Path, chunk: int = 256, *,
    world: int = 1, captions_mode: str = "caption",
) -> dict:
    """Cached training set: VAE posterior mean/std (N, 4, 16, 16), control maps (N, 64, 64, 3) uint8,
    caption index (N,) into unique caption embeddings (U, T, D), and the empty caption's embedding (1, T, D)."""
    if cache.exists():
        saved = torch.load(cache, weights_only=False)
        same_kind = (saved.get("world", 1), saved.get("captions_mode", "caption")) == (world, captions_mode)
        if same_kind and saved["seeds"][:len(seeds)] == list(seeds) and len(saved["seeds"]) >= len(seeds):
            n = len(seeds)
            # Caption embeddings are recomputed: they are cheap, and the cache then stays valid for a
            # later LDM whose text encoder trained on (the VAE encoder, and so the latents, is fixed).
            embeddings = torch.cat(
                [
                    embed(tokenizer, text_encoder, saved["captions"][i : i + 256])
                    for i in range(0, len(saved["captions"]), 256)
                ]
            )
            return {**saved, "mean": saved["mean"][:n], "std": saved["std"][:n], "maps": saved["maps"][:n],
                    "caption_index": saved["caption_index"][:n], "seeds": saved["seeds"][:n],
                    "embeddings": embeddings, "empty": embed(tokenizer, text_encoder, [""])}
    started = time.time()
    means, stds, maps, captions = [], [], [], []
    for first in range(0, len(seeds), chunk):
        samples = [shapes.sample(seed, world=world) for seed in seeds[first:first + chunk]]
        posterior = vae.encode(images_to_tensor(np.stack([s.image for s in samples]))).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
        maps.append(np.stack([getattr(s, CONTROL_MAP[control]) for s in samples]))
        captions += [training_caption(s, control, captions_mode) for s in samples]
        print(f"encoded {first + len(samples)}/{len(seeds)} scenes ({time.time() - started:.0f} s)", flush=True)
    unique = sorted(set(captions))
    position = {c: i for i, c in enumerate(unique)}
    embeddings = torch.cat([embed(tokenizer, text_encoder, unique[i:i + 256]) for i in range(0, len(unique), 256)])
    data = {
        "seeds": list(seeds),
        "mean": torch.cat(means),
        "std": torch.cat(stds),
        "maps": torch.from_numpy(np.concatenate(maps)),
        "caption_index": torch.tensor([position[c] for c in captions]),
        "embeddings": embeddings,
        "empty": embed(tokenizer, text_encoder, [""]),
        "captions": unique,
        "world": world,
        "captions_mode": captions_mode,
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, cache)
    print(f"{len(unique)} distinct captions embedded ({time.time() - started:.0f} s)", flush=True)
    return data


@torch.no_grad()
def embed(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    return text_encoder(tokenize(tokenizer, captions)).last_hidden_state  # (N, T, D)


def held_out_controls(control: str, count: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(control maps, captions, reference images) of held-out scenes (seeds from HELD_OUT_SEED up)."""
    samples = [shapes.sample(seed) for seed in training_seeds(control, count, start=HELD_OUT_SEED)]
    return (
        np.stack([getattr(s, CONTROL_MAP[control]) for s in samples]),
        [s.caption for s in samples],
        np.stack([s.image for s in samples]),
    )


def control_pipeline(base: StableDiffusionPipeline, controlnet: ControlNetModel) -> StableDiffusionControlNetPipeline:
    """A ControlNet pipeline view over the base pipeline's modules (shared, not copied), DPM-Solver++."""
    scheduler = DPMSolverMultistepScheduler.from_config(base.scheduler.config, algorithm_type="dpmsolver++")
    pipe = StableDiffusionControlNetPipeline.from_pipe(base, controlnet=controlnet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_grid(base, controlnet, control: str, path: Path, config: ControlNetConfig, seed: int = 0) -> None:
    """Rows of held-out control maps, generated images and the scenes the maps came from."""
    maps, captions, references = held_out_controls(control, config.sample_count)
    controlnet.eval()
    pipe = control_pipeline(base, controlnet)
    size = shapes.IMAGE_SIZE
    out = pipe(captions, image=[m for m in control_tensor(maps)], num_inference_steps=config.sample_steps,
               guidance_scale=config.sample_guidance, height=size, width=size, output_type="np",
               generator=[torch.Generator().manual_seed(seed + i) for i in range(len(captions))])
    controlnet.train()
    generated = np.round(out.images * 255).astype(np.uint8)
    save_grid(np.concatenate([maps, generated, references]), path, columns=len(captions))


# ----------------------------------------------------------------------------- training

def train(
    control: str,
    ldm_path: Path,
    out_dir: Path,
    max_steps: int,
    config: ControlNetConfig,
    *,
    log_every: int = 25,
    save_every: int = 250,
    eval_every: int = 500,
    seed: int = 0,
) -> ControlNetModel:
    if control not in CONTROLS:
        raise ValueError(f"control={control!r}; choose one of {CONTROLS}")
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    # 1. The frozen LDM.
    base = StableDiffusionPipeline.from_pretrained(ldm_path, safety_checker=None, requires_safety_checker=False)
    for module in (base.unet, base.vae, base.text_encoder):
        module.eval().requires_grad_(False)
    unet, scaling = base.unet, base.vae.config.scaling_factor

    # 2. The ControlNet (a trainable copy of the U-Net encoder) and its optimiser; resume if possible.
    controlnet = controlnet_from_unet(unet, config.conditioning_channels).train()
    opt = torch.optim.AdamW(controlnet.parameters(), lr=config.learning_rate, weight_decay=1e-2)
    step, seconds, checkpoint = 0, 0.0, Checkpoint(out_dir)
    state = checkpoint.load()
    if state is not None:
        controlnet.load_state_dict(state["controlnet"])
        opt.load_state_dict(state["opt"])
        step, seconds = state["step"], state["seconds"]
        print(f"resumed from {checkpoint.path} at step {step}")

    # 3. Cached training set.
    data = encode_dataset(control, training_seeds(control, config.train_scenes), base.vae, base.tokenizer,
                          base.text_encoder, out_dir / "dataset.pt", world=config.world, captions_mode=config.captions)
    n = len(data["seeds"])
    parameters = sum(p.numel() for p in controlnet.parameters())
    print(
        f"{control} ControlNet {parameters / 1e6:.2f} M parameters "
        f"(U-Net {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M, "
        f"frozen), {n} training scenes",
        flush=True,
    )
    # The ControlNet learns the U-Net's own target (eps or v), read from the LDM's scheduler config.
    prediction_type = base.scheduler.config.get("prediction_type", "epsilon")
    noise_scheduler = DDPMScheduler(**SCHEDULE, prediction_type=prediction_type)
    log = LossLog(out_dir, ["loss", "lr"])
    generator = torch.Generator().manual_seed(seed + step)
    last = time.time()

    while step < max_steps:
        # 4. A batch: latents from the posterior, control maps in [0, 1], 10% empty captions.
        index = torch.randint(0, n, (config.batch_size,), generator=generator)
        latents = (
            data["mean"][index] + data["std"][index] * torch.randn(data["mean"][index].shape, generator=generator)
        ) * scaling  # (B, 4, 16, 16)
        condition = data["maps"][index].permute(0, 3, 1, 2).float().div(255)  # (B, 3, 64, 64)
        hidden = data["embeddings"][data["caption_index"][index]].clone()  # (B, T, D)
        drop = torch.rand(config.batch_size, generator=generator) < config.caption_dropout
        hidden[drop] = data["empty"]

        # 5. Noise, ControlNet residuals into the frozen U-Net, min-SNR weighted eps loss.
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (config.batch_size,), generator=generator
        )
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        down, mid = controlnet(
            noisy, timesteps, encoder_hidden_states=hidden, controlnet_cond=condition, return_dict=False
        )
        prediction = unet(noisy, timesteps, encoder_hidden_states=hidden, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample
        target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
        per_sample = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * loss_weights(noise_scheduler, timesteps, config.min_snr_gamma, prediction_type)).mean()

        lr = config.learning_rate * min(1.0, (step + 1) / config.warmup_steps)
        common.optimizer_step(opt, loss, lr=lr, clip=controlnet.parameters())
        step += 1
        now = time.time()
        seconds += now - last
        last = now

        # 6. Log, sample grid, checkpoint and export.
        if common.due(step, log_every, max_steps):
            log.write(step, loss=loss.item(), lr=lr)
        if common.due(step, eval_every, max_steps):
            sample_grid(base, controlnet, control, out_dir / "samples" / f"step-{step:06d}.png", config)
        if common.due(step, save_every, max_steps):
            checkpoint.save({"controlnet": controlnet.state_dict(), "opt": opt.state_dict(), "step": step,
                             "seconds": seconds, "config": asdict(config)})
            export(controlnet, out_dir / "controlnet", control=control, step=step, seconds=seconds, ldm=ldm_path,
                   scenes=n, parameters=parameters, config=config)
        last = time.time()  # sampling and saving are not training time
    return controlnet


def ldm_step(ldm: Path) -> int | None:
    """The training step of an LDM folder (its TRAINING_STEP, written by train_ldm and training.package)."""
    path = Path(ldm) / "TRAINING_STEP"
    return int(path.read_text().strip()) if path.is_file() else None


def ldm_commit(ldm: Path) -> str | None:
    """The commit whose tree holds exactly this LDM folder, when it lies in this repository unchanged: a later
    run can take the same base weights back out of it (`git archive COMMIT FOLDER`), whatever the folder holds by
    then. None for a folder outside the repository or with changes not committed."""
    import subprocess

    folder = Path(ldm).resolve()
    repo = Path(__file__).resolve().parent.parent
    if not folder.is_relative_to(repo):
        return None
    relative = str(folder.relative_to(repo))

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()

    try:
        if git("status", "--porcelain", "--", relative) or not git("ls-files", "--", relative):
            return None
        return git("log", "-1", "--format=%h", "--", relative) or None
    except (OSError, subprocess.CalledProcessError):
        return None


def check_ldm_step(ldm: Path, expected: int | None) -> int | None:
    """The LDM folder's step; SystemExit when `expected` is given and the folder holds another step (a ControlNet
    follows the U-Net it was trained against: a Reproduce command must not train against another)."""
    step = ldm_step(ldm)
    if expected is not None and step != expected:
        raise SystemExit(f"--ldm {ldm} holds the LDM at step {step}, not at --ldm-step {expected}; take the base "
                         f"model at step {expected} (the ControlNet's card says where it is)")
    return step


def export(controlnet: ControlNetModel, target: Path, *, control: str, step: int, seconds: float, ldm: Path,
           scenes: int, parameters: int, config: ControlNetConfig) -> None:
    """save_pretrained (safetensors) plus training.json: what the model card and evaluation read. The base model
    is recorded by folder, training step and, where the folder is committed, the commit that holds it."""
    target = Path(target)
    controlnet.save_pretrained(target, safe_serialization=True)
    info = {
        "control": control,
        "steps": step,
        "train_seconds": round(seconds),
        "ldm": str(ldm),
        "ldm_step": ldm_step(ldm),
        "ldm_commit": ldm_commit(ldm),
        "train_scenes": scenes,
        "parameters": parameters,
        "config": asdict(config),
    }
    (target / "training.json").write_text(json.dumps(info, indent=2, default=list) + "\n")
    (target / "TRAINING_STEP").write_text(f"{step}\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--control", choices=CONTROLS, required=True)
    parser.add_argument(
        "--ldm", type=Path, default=Path("assets/models/shapes-ldm"), help="the Shapes LDM's diffusers pipeline folder"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="run folder (default runs/controlnet-CONTROL): checkpoint, log, samples, controlnet/",
    )
    parser.add_argument(
        "--max-steps", type=int, default=2000, help="train until this step (resumes from the checkpoint)"
    )
    parser.add_argument("--train-scenes", type=int, default=ControlNetConfig.train_scenes)
    parser.add_argument("--batch-size", type=int, default=ControlNetConfig.batch_size)
    parser.add_argument("--learning-rate", type=float, default=ControlNetConfig.learning_rate)
    parser.add_argument("--caption-dropout", type=float, default=ControlNetConfig.caption_dropout)
    parser.add_argument(
        "--sample-steps", type=int, default=ControlNetConfig.sample_steps, help="denoising steps of the sample grids"
    )
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument(
        "--eval-every", type=int, default=500, help="sample grid every N steps and at the end (0: no sample grids)"
    )
    parser.add_argument("--ldm-step", type=int, default=None,
                        help="refuse an --ldm folder whose TRAINING_STEP is not this (the base step to train against)")
    parser.add_argument("--world", type=int, choices=shapes.WORLDS, default=ControlNetConfig.world,
                        help="the Shapes world's version of the training scenes (2: docs/MODEL_V2.md)")
    parser.add_argument("--captions", choices=CAPTION_MODES, default=ControlNetConfig.captions,
                        help="control: pose captions without pose words, depth/canny captions with the generic word")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    check_ldm_step(args.ldm, args.ldm_step)
    set_threads(args.threads)
    config = ControlNetConfig(
        world=args.world,
        captions=args.captions,
        train_scenes=args.train_scenes,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        caption_dropout=args.caption_dropout,
        sample_steps=args.sample_steps,
    )
    train(args.control, args.ldm, args.out or Path(f"runs/controlnet-{args.control}"), args.max_steps, config,
          log_every=args.log_every, save_every=args.save_every, eval_every=args.eval_every)


if __name__ == "__main__":
    main()
