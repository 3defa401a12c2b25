"""Trains a deeper decoder for a frozen VAE encoder, so the latent space the U-Net learnt stays valid.

The first decoder drew small stars as round blobs. A decoder can improve without touching the encoder, and so
without touching the latent space the U-Net and the ControlNets learnt; so this script keeps the encoder and
grows the decoder:

- Growing: `AutoencoderKL` takes one `layers_per_block` for both halves, so a deeper decoder also
  adds a residual block per encoder level. Each added block (encoder and decoder alike) starts with
  its last convolution at zero, which makes it an exact identity: the grown VAE encodes and decodes
  exactly like the source one before training. Only the decoder (and `post_quant_conv`) then train;
  the encoder's added blocks stay identities, so every latent is unchanged to the last bit.
- Data: whole 64x64 images, as the decoder sees them at inference (train_vae's 32x32 crops have borders
  that are not the frame's, and the sky and ground shading depends on the row).
- Loss: L1 + MSE (PSNR is an MSE measure). `--edge-weight` adds weight on pixels near edges, where a
  blob and a star differ. With whole images and no edge weight, held-out PSNR went from 28.3 to 29.7 dB
  within 50 steps; on 32x32 crops with edge weight 4 it fell over the first 150 steps.

    python -m training.train_decoder --vae runs/vae/vae --out runs/decoder --max-steps 1500
    python -m training.train_decoder --vae runs/decoder-w2/vae --out runs/vae-w2 --world2-share 0.5 \
        --encoder-anchor 1.0        # the encoder trains too; world-1 latents held in place
    python -m training.train_decoder --checkered assets/models/shapes-ldm/vae   # textures through a VAE, then stop

With a frozen encoder, world 2's dots and glows level off near 80% recognisable after a round trip. To tell
whether the encoder is what limits them, `--encoder-anchor W` trains the encoder as well, with W times the squared
distance between its latent means and the source encoder's on the batch's world-1 pictures (in the U-Net's units:
scaled by the scaling factor), plus the usual small KL term. World 1's latents, which every trained U-Net reads,
then stay where they were, while world 2's textures may take new codes. (It did not lift them: docs/MODEL_V2.md.)

`--unet-latents-share S` decodes a share S of each batch's world-1 pictures from what the base U-Net makes of their
latents (noised to a timestep up to `--unet-latents-max-t`, then its one-step prediction of the clean latents)
instead of the latents themselves, the target still the picture: the decoder learns to draw the forms a U-Net's
slightly-off latents stand for, where the encoder's own latents never show it those errors.

    python -m training.train_decoder --vae assets/models/shapes-ldm/vae --out runs/decoder-u \
        --unet-latents-share 0.75 --unet-latents-max-t 200 --max-steps 600

Exports `OUT/vae`, a plain diffusers `AutoencoderKL` folder with the source's scaling factor.
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from training import common, shapes, train_vae
from training.common import HELD_OUT_SEED, SHIPPED_BASE, Checkpoint, LossLog, images_to_tensor, save_grid, set_threads
from training.train_vae import psnr, reconstruct


@dataclass
class DecoderConfig:
    layers_per_block: int = 3
    batch_size: int = 8
    latent_crop: int = 16  # whole 16x16 latents = 64x64 images; 8 trains on 32x32 crops (4x cheaper)
    learning_rate: float = 1e-4
    mse_weight: float = 1.0
    edge_weight: float = 0.0  # extra weight on pixels within 1 px of an edge of the target
    all_styles: bool = True  # as the shipped decoder: the uncaptioned checkered texture must survive too
    # Share of each batch drawn from world 2 (its coarser textures: docs/MODEL_V2.md), the rest from world 1, whose
    # pictures every shipped model still makes
    world2_share: float = 0.0
    # 0: the encoder stays frozen (the latent space is the source's to the last bit). Above 0 the encoder trains
    # too, held to the source's latents on world-1 pictures with this weight
    encoder_anchor: float = 0.0
    kl_weight: float = 1e-6  # train_vae's (the LDM's KL-f4), used only when the encoder trains
    # Share of each batch's world-1 pictures decoded from what a U-Net makes of their latents instead of the
    # latents themselves: the U-Net's one-step prediction of the clean latents from the latents noised to a
    # timestep up to `unet_latents_max_t`. The decoder only ever sees latents a U-Net made, and those are a little
    # off where small forms are (a star's points, a square's corners): decoded as they are, the form comes out a
    # blob. Trained to draw the picture the latents came from, the decoder learns the world's forms back.
    unet_latents_share: float = 0.0
    unet_latents_max_t: int = 200
    # Share of each batch's world-1 pictures whose shapes are moved up to shapes.MOVE_PX off the nine places the
    # world's scenes keep them near (within 3 px). A shape's latents differ with where it falls on the 4-pixel
    # latent grid, and the round trip through a decoder that saw only the nine places keeps fewer stars moved than
    # at their places (an inpainted or generated object may sit anywhere).
    moved_share: float = 0.0


def grow(source: AutoencoderKL, layers_per_block: int) -> AutoencoderKL:
    """`source` with `layers_per_block` residual blocks per level; the added blocks are identities."""
    config = dict(source.config)
    if layers_per_block < config["layers_per_block"]:
        raise ValueError(f"layers_per_block {layers_per_block} is below the source's {config['layers_per_block']}")
    config["layers_per_block"] = layers_per_block
    grown = AutoencoderKL.from_config(config)
    missing, unexpected = grown.load_state_dict(source.state_dict(), strict=False)
    if unexpected:
        raise ValueError(f"source tensors with no place in the grown VAE: {unexpected[:4]}")
    old = source.config.layers_per_block
    added = [block.resnets[i] for block in grown.encoder.down_blocks for i in range(old, layers_per_block)]
    added += [block.resnets[i] for block in grown.decoder.up_blocks for i in range(old + 1, layers_per_block + 1)]
    added_names = {name for resnet in added for name, _ in _named_in(grown, resnet)}
    if set(missing) != added_names:
        raise ValueError(f"tensors left uninitialised: {sorted(set(missing) - added_names)[:4]}")
    with torch.no_grad():
        for resnet in added:  # out = x + conv2(...) / 1: a zero conv2 makes the block pass x through
            resnet.conv2.weight.zero_()
            resnet.conv2.bias.zero_()
    return grown


def _named_in(model: torch.nn.Module, module: torch.nn.Module):
    prefix = next(name for name, m in model.named_modules() if m is module)
    return [(f"{prefix}.{name}", p) for name, p in module.named_parameters()]


def decoder_parameters(vae: AutoencoderKL) -> list[torch.nn.Parameter]:
    return list(vae.decoder.parameters()) + (
        list(vae.post_quant_conv.parameters()) if vae.post_quant_conv is not None else []
    )


def encoder_parameters(vae: AutoencoderKL) -> list[torch.nn.Parameter]:
    return list(vae.encoder.parameters()) + (list(vae.quant_conv.parameters()) if vae.quant_conv is not None else [])


def edge_weights(target: torch.Tensor, extra: float) -> torch.Tensor:
    """1 everywhere, 1 + extra within one pixel of a colour edge of the target."""
    dx = (target[..., :, 1:] - target[..., :, :-1]).abs().amax(1, keepdim=True)
    dy = (target[..., 1:, :] - target[..., :-1, :]).abs().amax(1, keepdim=True)
    edges = (F.pad(dx, (0, 1, 0, 0)) + F.pad(dy, (0, 0, 0, 1)) > 0.1).float()
    return 1 + extra * F.max_pool2d(edges, 3, stride=1, padding=1)


def latent_crops(latents, images, crop, generator):
    """Aligned crops: `crop` x `crop` latents and the pixels they encode (f = 4)."""
    n, _, h, w = latents.shape
    ys = torch.randint(0, h - crop + 1, (n,), generator=generator)
    xs = torch.randint(0, w - crop + 1, (n,), generator=generator)
    z = torch.stack([lat[:, y:y + crop, x:x + crop] for lat, y, x in zip(latents, ys, xs)])
    f = images.shape[-1] // w
    x = torch.stack([im[:, y * f:(y + crop) * f, x_ * f:(x_ + crop) * f] for im, y, x_ in zip(images, ys, xs)])
    return z, x


def train(source: Path, out_dir: Path, max_steps: int, config: DecoderConfig, *, log_every: int = 50,
          save_every: int = 250, seed: int = 0, unet_from: Path = SHIPPED_BASE) -> AutoencoderKL:
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    predictor = UNetLatents(unet_from, config) if config.unet_latents_share else None
    vae = grow(AutoencoderKL.from_pretrained(source), config.layers_per_block)
    vae.requires_grad_(False)
    trainable = decoder_parameters(vae)
    anchor = None
    if config.encoder_anchor > 0:
        anchor = copy.deepcopy(vae).eval()  # the source's encoder, before any training (frozen: no grad)
        trainable += encoder_parameters(vae)
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.0)
    step, checkpoint = 0, Checkpoint(out_dir)
    state = checkpoint.load()
    if state is not None:
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        print(f"resumed from {checkpoint.path} at step {step}")
    log = LossLog(out_dir, ["l1", "mse"] + (["anchor"] if anchor is not None else []) + ["psnr"]
                  + (["psnr_world2"] if config.world2_share else []))
    held_out = shapes.batch(range(HELD_OUT_SEED, HELD_OUT_SEED + 64))[0]
    held_out_v2 = shapes.batch(range(HELD_OUT_SEED, HELD_OUT_SEED + 64), world=2)[0] if config.world2_share else None
    crop_generator = torch.Generator().manual_seed(seed + step)
    if anchor is None:
        vae.encoder.eval()  # frozen: no dropout or norm statistics to update, but say so
    first_world1 = world2_count(config.batch_size, config)  # training_images puts world 2 first
    made = unet_latents_count(config.batch_size, config)  # each batch's last `made` get a U-Net's latents

    while step < max_steps:
        seeds = range(step * config.batch_size, (step + 1) * config.batch_size)
        pictures, captions = training_images(seeds, config)
        images = images_to_tensor(pictures)
        extra = {}
        if anchor is None:
            with torch.no_grad():
                latents = vae.encode(images).latent_dist.sample()
            regulariser = 0.0
        else:
            posterior = vae.encode(images).latent_dist
            latents = posterior.sample()
            regulariser = config.kl_weight * posterior.kl().mean()
            if first_world1 < len(images):
                with torch.no_grad():
                    held_mean = anchor.encode(images[first_world1:]).latent_dist.mean
                drift = ((posterior.mean[first_world1:] - held_mean) * vae.config.scaling_factor).pow(2).mean()
                regulariser = regulariser + config.encoder_anchor * drift
                extra["anchor"] = drift.item()
        if made:
            made_latents = predictor(latents[-made:], captions[-made:], vae.config.scaling_factor, crop_generator)
            latents = torch.cat([latents[:-made], made_latents])
        z, x = latent_crops(latents, images, config.latent_crop, crop_generator)
        recon = vae.decode(z).sample
        weights = edge_weights(x, config.edge_weight)
        l1 = ((recon - x).abs() * weights).mean() / weights.mean()
        mse = (((recon - x) ** 2) * weights).mean() / weights.mean()
        loss = l1 + config.mse_weight * mse + regulariser
        common.optimizer_step(opt, loss)
        step += 1
        if common.due(step, log_every, max_steps):
            vae.eval()
            held = {"psnr": psnr(held_out, reconstruct(vae, held_out))}
            if held_out_v2 is not None:
                held["psnr_world2"] = psnr(held_out_v2, reconstruct(vae, held_out_v2))
            vae.decoder.train()
            if anchor is not None:
                vae.encoder.train()
            log.write(step, l1=l1.item(), mse=mse.item(), **extra, **held)
        if common.due(step, save_every, max_steps):
            checkpoint.save({"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step, "config": asdict(config)})
            save_grid(
                np.concatenate([held_out[:16], reconstruct(vae, held_out[:16])]),
                out_dir / "samples" / f"step-{step:06d}.png",
            )
    return vae.eval()


def training_images(seeds: range, config: DecoderConfig) -> tuple[np.ndarray, list[str]]:
    """(N, 64, 64, 3) uint8 and the captions: the batch's scenes, its first `world2_share` from world 2 (same seeds,
    that world's scenes), then `moved_share` from world 1 with their shapes moved, the rest from world 1."""
    second = world2_count(len(seeds), config)
    third = second + moved_count(len(seeds), config)
    parts = [shapes.batch(seeds[:second], allow_unseen_styles=config.all_styles, world=2)] if second else []
    if third > second:
        parts.append(shapes.batch(seeds[second:third], allow_unseen_styles=config.all_styles, moved=True))
    if third < len(seeds):
        parts.append(shapes.batch(seeds[third:], allow_unseen_styles=config.all_styles))
    return np.concatenate([images for images, _ in parts]), [c for _, captions in parts for c in captions]


def unet_latents_count(batch: int, config: DecoderConfig) -> int:
    """How many of a batch's world-1 pictures (the last ones) are decoded from a U-Net's prediction."""
    return min(int(round(batch * config.unet_latents_share)), batch - world2_count(batch, config))


def moved_count(batch: int, config: DecoderConfig) -> int:
    """How many of a batch's world-1 pictures (the first ones, before any decoded from a U-Net's prediction) have
    their shapes moved."""
    return min(int(round(batch * config.moved_share)),
               batch - world2_count(batch, config) - unet_latents_count(batch, config))


class UNetLatents:
    """What a text-to-image U-Net makes of latents: noised to a random timestep up to `unet_latents_max_t`, then
    its one-step prediction of the clean latents, given the scenes' own captions (unscaled latents in and out)."""

    def __init__(self, folder: Path, config: DecoderConfig):
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, PreTrainedTokenizerFast

        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval().requires_grad_(False)
        self.text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(Path(folder) / "tokenizer")
        self.scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        self.max_t = config.unet_latents_max_t

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, captions: list[str], scaling: float,
                 generator: torch.Generator) -> torch.Tensor:
        from pipelines.explain import predict_x0
        from training.text import tokenize

        hidden = self.text_encoder(tokenize(self.tokenizer, captions)).last_hidden_state
        t = torch.randint(1, self.max_t + 1, (len(latents),), generator=generator)
        clean = latents * scaling
        noisy = self.scheduler.add_noise(clean, torch.randn(clean.shape, generator=generator), t)
        alpha_bar = self.scheduler.alphas_cumprod[t][:, None, None, None]
        x0 = predict_x0(noisy, self.unet(noisy, t, hidden).sample, alpha_bar, self.scheduler.config.prediction_type)
        return x0 / scaling


def world2_count(batch: int, config: DecoderConfig) -> int:
    """How many of a batch's pictures come from world 2 (they come first)."""
    return int(round(batch * config.world2_share))


def export(vae: AutoencoderKL, out_dir: Path) -> Path:
    """The diffusers folder `out_dir/vae`; the scaling factor is the source's (the encoder is unchanged)."""
    return train_vae.export(vae, out_dir, measure_scaling=False)


def checkered_cases() -> list[tuple[str, str, str]]:
    """40 ground-truth checkered shapes: every colour of the world with every shape (big, near the centre), the
    backgrounds in turn."""
    backgrounds = list(shapes.BACKGROUNDS)
    pairs = [(colour, shape) for colour in shapes.COLOURS for shape in shapes.SHAPES]
    return [(colour, shape, backgrounds[i % len(backgrounds)]) for i, (colour, shape) in enumerate(pairs)]


def checkered_kept(vae) -> tuple[int, int, int]:
    """(shapes whose checkered pattern survives an encode-decode round trip of `vae`, renders the texture
    statistic finds checkered themselves, cases), judged by the Fine-tune evaluation's own statistic
    (`training.evaluate_finetune.is_checkered`): what a decoder lets a checkered fine-tune draw at best."""
    from training.evaluate import vae_round_trip
    from training.evaluate_finetune import is_checkered, render_styled

    cases = checkered_cases()
    renders = np.stack([render_styled(c, s, b, seed=HELD_OUT_SEED + i) for i, (c, s, b) in enumerate(cases)])
    decoded = vae_round_trip(vae, renders)
    truth = sum(is_checkered(image, b) for image, (_, _, b) in zip(renders, cases))
    kept = sum(is_checkered(image, b) for image, (_, _, b) in zip(decoded, cases))
    return kept, truth, len(cases)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", type=Path, default=None, help="the source VAE folder: its encoder is kept (required)")
    parser.add_argument("--out", type=Path, default=Path("runs/decoder"))
    parser.add_argument(
        "--max-steps", type=int, default=1500, help="train until this step (resumes from the checkpoint)"
    )
    parser.add_argument("--layers-per-block", type=int, default=DecoderConfig.layers_per_block)
    parser.add_argument("--batch-size", type=int, default=DecoderConfig.batch_size)
    parser.add_argument("--learning-rate", type=float, default=DecoderConfig.learning_rate)
    parser.add_argument("--edge-weight", type=float, default=DecoderConfig.edge_weight)
    parser.add_argument("--world2-share", type=float, default=DecoderConfig.world2_share,
                        help="share of each batch from world 2 (0-1; the rest from world 1)")
    parser.add_argument("--latent-crop", type=int, default=DecoderConfig.latent_crop,
                        help="training crop in latents (16 = whole 64x64 images)")
    parser.add_argument("--encoder-anchor", type=float, default=DecoderConfig.encoder_anchor,
                        help="train the encoder too, held to the source's world-1 latents with this weight "
                             "(0: encoder frozen)")
    parser.add_argument("--unet-latents-share", type=float, default=DecoderConfig.unet_latents_share,
                        help="share of each batch's world-1 pictures decoded from a U-Net's one-step prediction of "
                             "their noised latents (0-1)")
    parser.add_argument("--unet-latents-max-t", type=int, default=DecoderConfig.unet_latents_max_t,
                        help="the highest timestep those latents are noised to")
    parser.add_argument("--unet-from", type=Path, default=SHIPPED_BASE,
                        help="the pipeline folder whose U-Net, text encoder and scheduler make those latents")
    parser.add_argument("--moved-share", type=float, default=DecoderConfig.moved_share,
                        help="share of each batch's world-1 pictures with their shapes moved off the world's places "
                             "(0-1)")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--export-only", action="store_true", help="export the checkpoint's VAE to OUT/vae and stop")
    parser.add_argument("--checkered", type=Path, metavar="VAE", default=None,
                        help="print how many of 40 checkered shapes keep their pattern through this VAE, and stop")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    if args.checkered is not None:
        kept, truth, count = checkered_kept(AutoencoderKL.from_pretrained(args.checkered).eval())
        print(f"checkered shapes that keep their pattern through {args.checkered}: {kept} of {count} "
              f"(the renders themselves: {truth} of {count})")
        return
    if args.vae is None:
        parser.error("--vae is required (the source VAE folder) unless --checkered is given")
    config = DecoderConfig(layers_per_block=args.layers_per_block, batch_size=args.batch_size,
                           learning_rate=args.learning_rate, edge_weight=args.edge_weight,
                           latent_crop=args.latent_crop, world2_share=args.world2_share,
                           encoder_anchor=args.encoder_anchor, unet_latents_share=args.unet_latents_share,
                           unet_latents_max_t=args.unet_latents_max_t, moved_share=args.moved_share)
    if config.encoder_anchor < 0:
        parser.error(f"--encoder-anchor {config.encoder_anchor:g}: a weight of 0 or more")
    if not 0 <= config.unet_latents_share <= 1:
        parser.error(f"--unet-latents-share {config.unet_latents_share:g}: a share from 0 to 1")
    if not 0 <= config.world2_share <= 1:
        parser.error(f"--world2-share {config.world2_share:g}: a share from 0 to 1")
    if not 0 <= config.moved_share <= 1:
        parser.error(f"--moved-share {config.moved_share:g}: a share from 0 to 1")
    if args.export_only:
        state = Checkpoint(args.out).load()
        if state is None:
            parser.error(f"no checkpoint in {args.out}")
        vae = grow(AutoencoderKL.from_pretrained(args.vae), state["config"]["layers_per_block"])
        vae.load_state_dict(state["vae"])
        export(vae.eval(), args.out)
        print(f"(from the checkpoint at step {state['step']})")
        return
    vae = train(args.vae, args.out, args.max_steps, config, log_every=args.log_every, save_every=args.save_every,
                unet_from=args.unet_from)
    export(vae, args.out)


if __name__ == "__main__":
    main()
