"""Trains a tiny autoencoder (diffusers `AutoencoderTiny`, the TAESD architecture) for the built-in model's latent
space: the fast path's decoder.

    python -m training.train_tiny_vae --base assets/models/shapes-ldm --out runs/tiny-vae --max-steps 3000 --threads 1
    python -m training.train_tiny_vae --out runs/tiny-vae --export assets/models/shapes-tiny-vae

Why: at 64x64 a distilled 4-step image spends most of its time in the built-in VAE's decoder (64 channels of
3x3 convolutions at full resolution, ~1.6 GFLOP), not in the U-Net. A TAESD-style decoder with 32 channels and one
block at full resolution does the same job for ~0.24 GFLOP.

Reads top to bottom: 1. the frozen base VAE gives the latents of the training scenes (posterior mean and std,
train_ldm.encode_scenes, cached as latents.pt in the run folder: the same file train_ldm and train_lcm cache) and
the scenes are rendered once (images.npy); 2. the decoder learns scaled latents (sampled from the posterior, as the
U-Net sees them) -> the rendered scene, with an L1 + MSE loss; the encoder learns the scene -> the posterior mean,
scaled, with an MSE loss (so the folder is a whole autoencoder anyone can load as a pipeline's `vae`, as TAESD is
for Stable Diffusion; the app decodes with it and keeps encoding with the base VAE); 3. every save a checkpoint,
a grid (ground truth, base VAE decode, tiny decode), held-out PSNR beside the base VAE's, and `model/`, an
AutoencoderTiny folder.

`scaling_factor` is 1.0, as for TAESD: it takes and gives the latents the U-Net works on (the base VAE's scaled
latents), so `pipe.vae = AutoencoderTiny.from_pretrained(folder)` drops in.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training import shapes
from training.common import (
    HELD_OUT_SEED,
    Checkpoint,
    LossLog,
    due,
    images_to_tensor,
    optimizer_step,
    repo_relative,
    save_grid,
    set_threads,
    tensor_to_images,
)

DEFAULT_BASE = Path("assets/models/shapes-ldm")
EVAL_SCENES = 256  # held-out scenes (seeds from HELD_OUT_SEED) for the PSNR printed at every save


@dataclass
class TinyConfig:
    # TAESD's blocks at f = 4 (two down/up-samplings); its blocks keep one channel count through every level
    encoder_block_out_channels: tuple[int, ...] = (32, 32, 32)
    decoder_block_out_channels: tuple[int, ...] = (32, 32, 32)
    num_encoder_blocks: tuple[int, ...] = (1, 2, 2)
    num_decoder_blocks: tuple[int, ...] = (2, 2, 1)
    pool_size: int = 24000  # training scenes: train_ldm's own (seeds 0 .. pool_size - 1)
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    eval_scenes: int = EVAL_SCENES


def make_tiny(config: TinyConfig, latent_channels: int):
    from diffusers import AutoencoderTiny

    return AutoencoderTiny(
        encoder_block_out_channels=config.encoder_block_out_channels,
        decoder_block_out_channels=config.decoder_block_out_channels,
        num_encoder_blocks=config.num_encoder_blocks,
        num_decoder_blocks=config.num_decoder_blocks,
        latent_channels=latent_channels,
        scaling_factor=1.0,
    )


def load_base_vae(base: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(Path(base) / "vae").eval().requires_grad_(False)


def rendered_pool(count: int, cache: Path, chunk: int = 1000) -> np.ndarray:
    """(count, 64, 64, 3) uint8 renders of the training scenes 0 .. count - 1, cached."""
    if cache.exists():
        images = np.load(cache, mmap_mode="r")
        if images.shape[0] >= count:
            return np.asarray(images[:count])
    parts = [shapes.batch(range(first, min(first + chunk, count)))[0] for first in range(0, count, chunk)]
    images = np.concatenate(parts)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, images)
    return images


@torch.no_grad()
def held_out_scores(tiny, vae, count: int = EVAL_SCENES) -> dict:
    """PSNR against the held-out renders: tiny decoder vs base decoder (both from the base VAE's posterior mean),
    tiny decoder vs base decoder output, and a tiny-encoder round trip."""
    from training.train_vae import psnr

    truth, _ = shapes.batch(range(HELD_OUT_SEED, HELD_OUT_SEED + count))
    x = images_to_tensor(truth)
    scaled = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    base = tensor_to_images(vae.decode(scaled / vae.config.scaling_factor).sample)
    small = tensor_to_images(tiny.decode(scaled).sample)
    round_trip = tensor_to_images(tiny.decode(tiny.encode(x).latents).sample)
    return {"psnr_base_decoder": psnr(base, truth), "psnr_tiny_decoder": psnr(small, truth),
            "psnr_tiny_vs_base_decoder": psnr(small, base), "psnr_tiny_round_trip": psnr(round_trip, truth),
            "images": (truth[:8], base[:8], small[:8])}


def export_run(tiny, target: Path, *, step: int, base: Path, config: TinyConfig, scores: dict) -> None:
    if target.exists():
        shutil.rmtree(target)
    tiny.save_pretrained(target, safe_serialization=True)
    (target / "TRAINING_STEP").write_text(f"{step}\n")
    record = {"step": step, "base": repo_relative(Path(base)), "config": asdict(config),
              "held_out": {k: round(v, 2) for k, v in scores.items() if k.startswith("psnr")},
              "command": f"python -m training.train_tiny_vae --base {repo_relative(Path(base))} --max-steps {step}"}
    (target / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def write_card(folder: Path, shown_as: str | None = None) -> Path:
    """The model card of an exported folder, from its training.json alone (rewriting it gives the same bytes);
    `shown_as`: the folder's path in the card (default: relative to the repository)."""
    folder = Path(folder)
    shown = shown_as or repo_relative(folder)
    record = json.loads((folder / "training.json").read_text())
    config, held = record["config"], record["held_out"]
    lines = [
        "# Shapes tiny autoencoder (built-in fast decoder)",
        "",
        "A TAESD-style `AutoencoderTiny` for the latent space of the built-in model (`assets/models/shapes-ldm`'s "
        "VAE, f = 4): the decoder of the fast path (`--model shapes-lcm`, `pipelines/fast_backend.TinyDecoding`). "
        "It takes and gives the latents the U-Net works on (`scaling_factor` 1.0), so it also drops in as a "
        "pipeline's `vae`. Made by `training/train_tiny_vae.py`.",
        "",
        "## Architecture and training",
        "",
        "| | |",
        "|---|---|",
        f"| decoder | channels {tuple(config['decoder_block_out_channels'])}, blocks "
        f"{tuple(config['num_decoder_blocks'])} (coarse to fine) |",
        f"| encoder | channels {tuple(config['encoder_block_out_channels'])}, blocks "
        f"{tuple(config['num_encoder_blocks'])} |",
        f"| data | the base model's {config['pool_size']:,} training scenes: decoder from posterior samples to the "
        f"render (L1 + MSE), encoder from the render to the posterior mean (MSE) |",
        f"| steps | {record['step']:,} at batch {config['batch_size']}, learning rate {config['learning_rate']:g} |",
        f"| base | `{record['base']}` |",
        "",
        f"## Held-out reconstruction ({config.get('eval_scenes', EVAL_SCENES)} scenes from seed {HELD_OUT_SEED:,})",
        "",
        "| decode of the base VAE's latents | PSNR |",
        "|---|---|",
        f"| base VAE decoder vs the render | {held['psnr_base_decoder']:.2f} dB |",
        f"| tiny decoder vs the render | {held['psnr_tiny_decoder']:.2f} dB |",
        f"| tiny decoder vs the base VAE decoder | {held['psnr_tiny_vs_base_decoder']:.2f} dB |",
        f"| tiny encoder + tiny decoder vs the render | {held['psnr_tiny_round_trip']:.2f} dB |",
        "",
        "What it costs in prompt following, and what it saves in time, is measured with the distilled model it serves "
        "(`assets/models/shapes-lcm/README.md`; README, Performance: the fast path).",
        "",
        "## Limits",
        "",
        "- Softer than the base decoder: small objects lose their corners first. The app decodes with it only on the "
        "fast path, and Explain (which watches the VAE) always decodes with the base decoder.",
        "- The built-in latent space only: retraining the base VAE invalidates it.",
        "",
        "## Reproduce",
        "",
        "```bash",
        f"{record['command']} --threads 1",
        f"python -m training.train_tiny_vae --out runs/tiny-vae --export {shown}",
        "```",
        "",
    ]
    card = folder / "README.md"
    card.write_text("\n".join(lines))
    return card


def train(base: Path, out_dir: Path, max_steps: int, config: TinyConfig, *, log_every=50, save_every=250, seed=0):
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    # 1. The frozen base VAE, the latents and the renders of the training scenes
    vae = load_base_vae(base)
    from training.train_ldm import encode_scenes

    mean, std, _ = encode_scenes(vae, config.pool_size, out_dir / "latents.pt")
    images = rendered_pool(config.pool_size, out_dir / "images.npy")
    scaling = vae.config.scaling_factor
    tiny = make_tiny(config, int(vae.config.latent_channels)).train()
    opt = torch.optim.AdamW(tiny.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    step = 0
    checkpoint = Checkpoint(out_dir)
    state = checkpoint.load()
    if state is not None:
        tiny.load_state_dict(state["tiny"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        print(f"resumed from {checkpoint.path} at step {step}")
    log = LossLog(out_dir, ["decoder", "encoder", "lr"])
    generator = torch.Generator().manual_seed(seed + step)
    count = sum(p.numel() for p in tiny.decoder.parameters())
    print(f"tiny decoder {count / 1e3:.0f} k parameters, encoder "
          f"{sum(p.numel() for p in tiny.encoder.parameters()) / 1e3:.0f} k; {len(images)} scenes", flush=True)

    # 2. Decoder and encoder, each on its own target
    while step < max_steps:
        index = torch.randint(0, len(images), (config.batch_size,), generator=generator)
        target = images_to_tensor(images[index.numpy()])  # (B, 3, 64, 64) in [-1, 1]
        latents = (mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)) * scaling
        decoded = tiny.decode(latents).sample
        decoder_loss = F.l1_loss(decoded, target) + F.mse_loss(decoded, target)
        encoder_loss = F.mse_loss(tiny.encode(target).latents, mean[index] * scaling)
        lr = config.learning_rate * min(1.0, (step + 1) / config.warmup_steps)
        optimizer_step(opt, decoder_loss + encoder_loss, lr=lr, clip=tiny.parameters())
        step += 1
        if due(step, log_every, max_steps):
            log.write(step, decoder=decoder_loss.item(), encoder=encoder_loss.item(), lr=lr)
        if due(step, save_every, max_steps):
            checkpoint.save({"tiny": tiny.state_dict(), "opt": opt.state_dict(), "step": step,
                             "config": asdict(config)})
            tiny.eval()
            scores = held_out_scores(tiny, vae, config.eval_scenes)
            tiny.train()
            truth, decoded_base, decoded_tiny = scores.pop("images")
            grid = np.concatenate([truth, decoded_base, decoded_tiny])
            save_grid(grid, out_dir / "samples" / f"step-{step:06d}.png")
            print("held out: " + ", ".join(f"{k} {v:.2f} dB" for k, v in scores.items()), flush=True)
            export_run(tiny, out_dir / "model", step=step, base=base, config=config, scores=scores)
    return tiny


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE, help="the base pipeline folder (its VAE)")
    parser.add_argument("--out", type=Path, default=Path("runs/tiny-vae"),
                        help="run folder: latents, renders, checkpoint, log, samples, model/")
    parser.add_argument("--max-steps", type=int, default=3000, help="train until this step (resumes)")
    parser.add_argument("--pool-size", type=int, default=TinyConfig.pool_size)
    parser.add_argument("--batch-size", type=int, default=TinyConfig.batch_size)
    parser.add_argument("--learning-rate", type=float, default=TinyConfig.learning_rate)
    parser.add_argument("--eval-scenes", type=int, default=EVAL_SCENES, help="held-out scenes scored at every save")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--export", type=Path, default=None, metavar="FOLDER",
                        help="copy the run's model/ to FOLDER (e.g. assets/models/shapes-tiny-vae) and exit")
    args = parser.parse_args(argv)
    if args.export is not None:
        source = args.out / "model"
        if not (source / "config.json").is_file():
            raise SystemExit(f"{source} holds no exported model yet: train first")
        if args.export.exists():
            shutil.rmtree(args.export)
        shutil.copytree(source, args.export)
        print(f"exported {source} -> {args.export}; card {write_card(args.export)}")
        return
    set_threads(args.threads)
    config = TinyConfig(pool_size=args.pool_size, batch_size=args.batch_size, learning_rate=args.learning_rate,
                        eval_scenes=args.eval_scenes)
    started = time.time()
    train(args.base, args.out, args.max_steps, config, log_every=args.log_every, save_every=args.save_every)
    print(f"done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
