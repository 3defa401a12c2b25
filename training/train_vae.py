"""Trains the KL-VAE (f=4: 64x64x3 -> 16x16x4) of the Shapes LDM.

Loss, as in Rombach et al. (2022): L1 reconstruction + a small KL term + a patch-discriminator
hinge loss that switches on after a warm-up, with the LDM's adaptive weight (the ratio of the
reconstruction and adversarial gradient norms at the decoder's last layer). The perceptual (LPIPS)
term of the original is left out: it needs pretrained VGG weights, which are not available offline.

The VAE is fully convolutional, so it trains on random crops of the 64x64 scenes (4x cheaper per
step) and still encodes whole images.

    python -m training.train_vae --out runs/vae --max-steps 3000

At `disc_start` the run also exports `OUT/encoder-final/vae`: the VAE to train the U-Net on while
the decoder keeps training.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import AutoencoderKL

from training import common, shapes
from training.common import (
    HELD_OUT_SEED,
    Checkpoint,
    LossLog,
    images_to_tensor,
    save_grid,
    set_threads,
    tensor_to_images,
)


@dataclass
class VAEConfig:
    block_out_channels: tuple = (64, 64, 128)  # 3 levels -> 2 downsamplings -> f = 4
    latent_channels: int = 4  # as Stable Diffusion
    batch_size: int = 32
    crop: int = 32  # training crop; inference runs on whole 64x64 images
    learning_rate: float = 2e-4
    kl_weight: float = 1e-6  # the LDM's KL-f4 setting: a nearly deterministic, well-scaled latent
    disc_start: int = 1500  # steps of pure reconstruction before the adversarial term
    disc_weight: float = 0.1  # kept small: sharpness without trading away PSNR; 0: the decoder phase is L1 only
    disc_learning_rate: float = 1e-4
    # From disc_start on only the decoder trains: the latent space the U-Net learns stays fixed, so the
    # decoder can keep improving (here or in a later run) without retraining the U-Net.
    freeze_encoder_with_disc: bool = True
    # Also scenes in styles no caption names (shapes.UNSEEN_STYLES): the VAE never reads captions, and a
    # codec that cannot draw a texture would make it impossible to fine-tune the LDM on that texture later.
    all_styles: bool = False


def build_vae(config: VAEConfig) -> AutoencoderKL:
    levels = len(config.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=1,
        latent_channels=config.latent_channels,
        norm_num_groups=32,
        sample_size=shapes.IMAGE_SIZE,
    )


class PatchDiscriminator(nn.Module):
    """A small PatchGAN: one real/fake logit per overlapping ~14-px patch."""

    def __init__(self, channels: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(channels, channels * 2, 4, 2, 1), nn.GroupNorm(8, channels * 2), nn.LeakyReLU(0.2),
            nn.Conv2d(channels * 2, channels * 2, 3, 1, 1), nn.GroupNorm(8, channels * 2), nn.LeakyReLU(0.2),
            nn.Conv2d(channels * 2, 1, 3, 1, 1),
        )

    def forward(self, x):
        return self.net(x)


def random_crops(images: torch.Tensor, crop: int, generator: torch.Generator) -> torch.Tensor:
    if crop >= images.shape[-1]:
        return images
    n, _, h, w = images.shape
    ys = torch.randint(0, h - crop + 1, (n,), generator=generator)
    xs = torch.randint(0, w - crop + 1, (n,), generator=generator)
    return torch.stack([img[:, y:y + crop, x:x + crop] for img, y, x in zip(images, ys, xs)])


def adaptive_weight(rec_loss, gen_loss, last_layer) -> torch.Tensor:
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gen_grad = torch.autograd.grad(gen_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (gen_grad.norm() + 1e-4)).clamp(0, 1e4).detach()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-10)))


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: np.ndarray) -> np.ndarray:
    x = images_to_tensor(images)
    return tensor_to_images(vae.decode(vae.encode(x).latent_dist.mode()).sample)


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, seeds) -> float:
    """1 / std of the latents, so that scaled latents have unit variance as the diffusion assumes."""
    images, _ = shapes.batch(seeds)
    latents = vae.encode(images_to_tensor(images)).latent_dist.sample()
    return float(1.0 / latents.std())


def train(
    out_dir: Path, max_steps: int, config: VAEConfig, *, log_every: int = 50, save_every: int = 250, seed: int = 0
) -> AutoencoderKL:
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    vae, disc = build_vae(config), PatchDiscriminator()
    opt = torch.optim.AdamW(vae.parameters(), lr=config.learning_rate, weight_decay=0.0)
    opt_disc = torch.optim.AdamW(disc.parameters(), lr=config.disc_learning_rate, betas=(0.5, 0.9))
    step, checkpoint = 0, Checkpoint(out_dir)
    state = checkpoint.load()
    if state is not None:
        vae.load_state_dict(state["vae"])
        disc.load_state_dict(state["disc"])
        opt.load_state_dict(state["opt"])
        opt_disc.load_state_dict(state["opt_disc"])
        step = state["step"]
        print(f"resumed from {checkpoint.path} at step {step}")
    log = LossLog(out_dir, ["rec", "kl", "gen", "disc", "psnr"])
    held_out = shapes.batch(range(HELD_OUT_SEED, HELD_OUT_SEED + 64))[0]
    crop_generator = torch.Generator().manual_seed(seed + step)
    last_layer = vae.decoder.conv_out.weight

    while step < max_steps:
        # 1. A fresh batch of scenes: seeds advance with the step, so a resumed run sees new data.
        seeds = range(step * config.batch_size, (step + 1) * config.batch_size)
        scenes = shapes.batch(seeds, allow_unseen_styles=config.all_styles)[0]
        x = random_crops(images_to_tensor(scenes), config.crop, crop_generator)  # (B, 3, crop, crop)

        # 2. Autoencoder: reconstruction + KL (+ adversarial after warm-up).
        decoder_phase = step >= config.disc_start
        use_disc = decoder_phase and config.disc_weight > 0
        with torch.set_grad_enabled(not (decoder_phase and config.freeze_encoder_with_disc)):
            posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec_loss = (recon - x).abs().mean()
        # KL summed over the latent, per image pixel: the same ratio to the reconstruction term as the
        # LDM's summed losses, here with both divided by the pixel count.
        kl_loss = posterior.kl().mean() / x[0].numel()
        loss = rec_loss + config.kl_weight * kl_loss
        gen_loss = torch.zeros(())
        if use_disc:
            gen_loss = -disc(recon).mean()
            loss = loss + config.disc_weight * adaptive_weight(rec_loss, gen_loss, last_layer) * gen_loss
        common.optimizer_step(opt, loss)

        # 3. Discriminator: hinge loss on real crops vs reconstructions.
        disc_loss = torch.zeros(())
        if use_disc:
            disc_loss = 0.5 * (F.relu(1 - disc(x)).mean() + F.relu(1 + disc(recon.detach())).mean())
            common.optimizer_step(opt_disc, disc_loss)
        step += 1
        if config.freeze_encoder_with_disc and step == config.disc_start:
            # The encoder is final from here on: this is the VAE the U-Net is trained on.
            export(vae.eval(), out_dir / "encoder-final")
            vae.train()

        if common.due(step, log_every, max_steps):
            vae.eval()
            held_psnr = psnr(held_out[:16], reconstruct(vae, held_out[:16]))
            vae.train()
            log.write(
                step,
                rec=rec_loss.item(),
                kl=kl_loss.item(),
                gen=gen_loss.item(),
                disc=disc_loss.item(),
                psnr=held_psnr,
            )
        if common.due(step, save_every, max_steps):
            checkpoint.save({"vae": vae.state_dict(), "disc": disc.state_dict(), "opt": opt.state_dict(),
                             "opt_disc": opt_disc.state_dict(), "step": step, "config": asdict(config)})
            vae.eval()
            save_grid(
                np.concatenate([held_out[:16], reconstruct(vae, held_out[:16])]),
                out_dir / "samples" / f"step-{step:06d}.png",
            )
            vae.train()
    vae.eval()
    return vae


def export(vae: AutoencoderKL, out_dir: Path, *, measure_scaling: bool = True) -> Path:
    """Writes the diffusers folder `out_dir/vae` with scaling_factor measured on training scenes.

    The scaling factor depends only on the encoder, so every export after the encoder is frozen
    carries the same one, and `training.package` can pair a newer decoder with an older U-Net.
    `measure_scaling=False` keeps the VAE's own (train_decoder: the encoder is the source's, unchanged).
    """
    if measure_scaling:
        vae.register_to_config(scaling_factor=latent_scaling_factor(vae, range(0, 512)))
    target = Path(out_dir) / "vae"
    vae.save_pretrained(target, safe_serialization=True)
    print(f"exported {target} (scaling_factor={vae.config.scaling_factor:.4f})")
    return target


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", type=Path, default=Path("runs/vae"), help="run folder: checkpoint, log, samples, vae/"
    )
    parser.add_argument(
        "--max-steps", type=int, default=3000, help="train until this step (resumes from the checkpoint)"
    )
    parser.add_argument("--batch-size", type=int, default=VAEConfig.batch_size)
    parser.add_argument("--disc-start", type=int, default=VAEConfig.disc_start)
    parser.add_argument("--disc-weight", type=float, default=VAEConfig.disc_weight,
                        help="adversarial weight from --disc-start on; 0 trains the decoder on L1 alone")
    parser.add_argument(
        "--all-styles", action="store_true", help="train on every rendered style, also uncaptioned ones"
    )
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--export-only", action="store_true", help="export the checkpoint's VAE to OUT/vae and stop")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    config = VAEConfig(batch_size=args.batch_size, disc_start=args.disc_start, disc_weight=args.disc_weight,
                       all_styles=args.all_styles)
    if args.export_only:
        state = Checkpoint(args.out).load()
        if state is None:
            parser.error(f"no checkpoint in {args.out}")
        vae = build_vae(VAEConfig(**{**asdict(config), **state["config"]}))
        vae.load_state_dict(state["vae"])
        export(vae.eval(), args.out)
        print(f"(from the checkpoint at step {state['step']})")
        return
    vae = train(args.out, args.max_steps, config, log_every=args.log_every, save_every=args.save_every)
    export(vae, args.out)


if __name__ == "__main__":
    main()
