"""Derives the built-in inpainting U-Net from the shipped base U-Net (the Stable Diffusion inpainting recipe).

    python -m training.train_inpaint --base assets/models/shapes-ldm --out runs/inpaint --max-steps 3000
    python -m training.train_inpaint --out runs/inpaint --export assets/models/shapes-inpaint

Reads top to bottom: 1. a 9-channel U-Net (noisy latents, the mask, the masked image's latents) initialised
from the base U-Net, its five added input channels at zero, so at step 0 it computes what the base does;
2. a pool of inpainting examples from the Shapes world (training/inpaint_data.py: masks like people paint,
captions that name the whole scene, only the masked part or nothing) encoded once by the frozen VAE;
3. v-prediction with the base's min-SNR weights and an EMA, the text encoder frozen (the engine shares the
base's); 4. an export that the engine loads as the preset's `inpaint_model` (its `unet/` folder).
Re-run it after the base U-Net is retrained: it always starts from the base folder it is given.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training import inpaint_data
from training.common import (
    HELD_OUT_SEED,
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
from training.train_ldm import SCHEDULE, loss_weights, widen_unet

POOL_CHUNK = 1024  # examples per pool file: the pool is built (and resumed) a chunk at a time
GRID_EXAMPLES = 16  # validation examples drawn in each sample grid
VALIDATION_SEED = HELD_OUT_SEED + 500_000  # sample-grid scenes: outside the trainer's and the test split's seeds
CANVAS_SEED_FIRST = 100_000_000  # scene and mask seeds of the canvas pools: training seeds, apart from the 64x64 ones


@dataclass
class InpaintConfig:
    pool_size: int = 24_576  # examples encoded once; each is seen ~8 times in 3000 steps of 64
    batch_size: int = 64
    learning_rate: float = 2e-4
    warmup_steps: int = 100
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0  # the base's weighting (train_ldm.loss_weights)
    # conv_in learns at this multiple of the learning rate: its 5 added channels start at zero and carry all
    # the U-Net knows of the picture around the hole, while every other weight starts trained
    conv_in_lr_scale: float = 1.0
    # conv_in's four original (noisy-latent) input channels learn at this multiple instead; None: as the added
    # ones. Every layer after conv_in reads their features, so a fast rate there rewrites what the whole U-Net
    # was trained on (at x10 they moved by half their norm, and the U-Net drew fewer shapes whole).
    base_channels_lr_scale: float | None = None
    # Share of each batch replaced by whole-image examples (everything masked, a caption of the whole scene)
    # whose target is the base U-Net's own prediction: with nothing to copy, the 9-channel U-Net should compute
    # what the base does, which keeps the base's drawing while the rest of the batch teaches the mask.
    teacher_share: float = 0.0
    # Share of each batch drawn from examples whose caption names an object that only the mask's area can hold
    # (add / replace: the rarest lesson, and the one that needs the prompt); 0: as often as the pool has them
    add_share: float = 0.0
    masks: str = "compose"  # the mask recipe (inpaint_data.MASK_RECIPES)
    # Loss weight of the masked area's latents relative to the rest. Outside the hole the U-Net only copies the
    # masked image's latents; a hole of a few latent cells otherwise carries a small share of each example's loss
    # although it is all the model has to draw.
    mask_loss_weight: float = 1.0
    # Channels of every block as a multiple of the base's. Above the start's width, the start is widened so
    # that it first computes what it computed before (train_ldm.widen_unet); the added width is capacity for
    # drawing small forms into a scene, which the base's width leaves underfitted.
    widen: int = 1
    # Share of batches drawn from canvases that are not 64x64 (inpaint_data.CANVAS_SIZES: world 2's scenes on
    # the canvases the app works at, one canvas per batch, batch size scaled to the same number of pixels): the
    # U-Net otherwise only ever sees square canvases and continues wide and tall pictures poorly.
    canvas_share: float = 0.0
    canvas_pool_size: int = 4096  # examples over all those canvases, split evenly
    canvas_masks: str = "canvas"  # their mask recipe (inpaint_data.MASK_RECIPES)


def inflate_unet(base_unet):
    """A 9-channel copy of `base_unet`: conv_in takes (latents 4, mask 1, masked-image latents 4); the five
    added channels' weights start at zero, so the copy computes exactly what the base does."""
    from diffusers import UNet2DConditionModel

    config = dict(base_unet.config)
    config["in_channels"] = 9
    unet = UNet2DConditionModel.from_config(config)
    state = base_unet.state_dict()
    weight = state["conv_in.weight"]  # (C, 4, 3, 3)
    state["conv_in.weight"] = torch.cat([weight, torch.zeros(weight.shape[0], 5, *weight.shape[2:])], dim=1)
    unet.load_state_dict(state)
    return unet


def latent_mask(mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W) 0/1 -> (B, 1, h, w), as StableDiffusionInpaintPipeline.prepare_mask_latents resizes it."""
    return F.interpolate(mask, size=latent_size)


@torch.no_grad()
def build_pool(
    vae,
    tokenizer,
    out_dir: Path,
    size: int,
    chunk: int = 64,
    part: tuple[int, int] | None = None,
    recipe: str = "loose",
    canvas: tuple[int, int] | None = None,
):
    """Encodes `size` training examples (scene seed i, mask seed i) in chunk files; resumes where it stopped.
    `part=(k, n)` builds only every n-th chunk from the k-th (several processes share the work) and loads none.
    `canvas` (width, height): world-2 examples on that canvas (inpaint_data.canvas_sample), seeds from
    CANVAS_SEED_FIRST, in their own folder."""
    pool_dir = out_dir / ("pool" if canvas is None else f"pool-{'' if recipe == 'canvas' else recipe + '-'}"
                                                       f"{canvas[0]}x{canvas[1]}")
    first_seed = 0 if canvas is None else CANVAS_SEED_FIRST
    pool_dir.mkdir(parents=True, exist_ok=True)
    parts = []
    started = time.time()
    for first in range(0, size, POOL_CHUNK):
        path = pool_dir / f"chunk-{first // POOL_CHUNK:04d}.pt"
        if part is not None and (first // POOL_CHUNK) % part[1] != part[0]:
            continue
        if not path.exists():
            examples = [
                inpaint_data.training_example(first_seed + i, first_seed + i, recipe, canvas)
                for i in range(first, min(first + POOL_CHUNK, size))
            ]
            target_mean, target_std, masked_mean, masked_std = [], [], [], []
            for at in range(0, len(examples), chunk):
                group = examples[at : at + chunk]
                targets = torch.from_numpy(np.stack([e.target for e in group])).permute(0, 3, 1, 2).float() / 127.5 - 1
                masked = torch.from_numpy(
                    np.stack([inpaint_data.masked_source(e.source, e.mask) for e in group])
                ).permute(0, 3, 1, 2)
                t_post, m_post = vae.encode(targets).latent_dist, vae.encode(masked).latent_dist
                target_mean.append(t_post.mean)
                target_std.append(t_post.std)
                masked_mean.append(m_post.mean)
                masked_std.append(m_post.std)
            ids = tokenize(tokenizer, [e.caption for e in examples])
            torch.save(
                {
                    "target_mean": torch.cat(target_mean),
                    "target_std": torch.cat(target_std),
                    "masked_mean": torch.cat(masked_mean),
                    "masked_std": torch.cat(masked_std),
                    "mask": torch.from_numpy(np.stack([e.mask for e in examples]))[:, None],  # (N, 1, H, W) bool
                    "ids": ids,
                    "modes": [e.mode for e in examples],
                },
                path,
            )
            print(f"pool: {first + len(examples)}/{size} examples encoded ({time.time() - started:.0f} s)", flush=True)
        if part is None:
            parts.append(torch.load(path, weights_only=False))
    if part is not None:
        return None
    pool = {key: torch.cat([p[key] for p in parts]) for key in parts[0] if key != "modes"}
    pool["modes"] = [mode for p in parts for mode in p["modes"]]
    return pool


def validation_examples(count: int = GRID_EXAMPLES) -> list[inpaint_data.InpaintExample]:
    return [
        inpaint_data.training_example(VALIDATION_SEED + i, inpaint_data.HELD_OUT_MASK_SEED + VALIDATION_SEED + i)
        for i in range(count)
    ]


@torch.no_grad()
def sample_grid(pipe, unet, path: Path, steps: int = 20, guidance: float = 2.5) -> None:
    """Rows of (masked source, result) for validation examples: what the model does, at a glance."""
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image

    view = StableDiffusionInpaintPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=unet,
        scheduler=pipe.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    view.set_progress_bar_config(disable=True)
    tiles = []
    for i, example in enumerate(validation_examples()):
        out = view(
            prompt=example.caption,
            image=Image.fromarray(example.source),
            mask_image=Image.fromarray(example.mask.astype(np.uint8) * 255),
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(i),
            output_type="np",
        ).images[0]
        shown = example.source.copy()
        shown[example.mask] = 128
        tiles += [shown, (out * 255).round().astype(np.uint8)]
    save_grid(np.stack(tiles), path, columns=8)


def train(
    base: Path,
    out_dir: Path,
    max_steps: int,
    config: InpaintConfig,
    *,
    log_every=50,
    save_every=250,
    seed=0,
    threads: int | None = None,
    init_from: Path | None = None,
    pool_part: tuple[int, int] | None = None,
    rebase_from: Path | None = None,
):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    set_threads(threads)
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    # 1. The base pipeline (frozen VAE and text encoder) and the inflated U-Net.
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    vae, text_encoder, tokenizer = (
        m.eval().requires_grad_(False) if hasattr(m, "eval") else m
        for m in (pipe.vae, pipe.text_encoder, pipe.tokenizer)
    )
    teacher = pipe.unet.eval().requires_grad_(False)  # the base U-Net, for --teacher-share
    unet = inflate_unet(pipe.unet)
    step = first_step = 0  # first_step: where this run's warm-up and cosine started
    checkpoint = Checkpoint(out_dir)
    state = checkpoint.load()
    start = None
    if state is None and init_from is not None:
        # Go on from another run's weights with a fresh optimiser and schedule (e.g. another data mix); the
        # step count goes on, so the curve is one
        start, step = init_weights(Path(init_from))
        if rebase_from is not None:
            start = rebase(start, old=init_weights(Path(rebase_from))[0], new=teacher.state_dict())
        first_step = step
    if state is not None and state["config"].get("widen", 1) != config.widen:
        raise SystemExit(f"--widen {config.widen}: the checkpoint in {out_dir} is {state['config'].get('widen', 1)}x "
                         "the base's width; resume with that")
    # the start's width (a checkpoint's is this run's), then this run's: widening keeps what the start computes
    start_width = config.widen if state is not None else width_of(start, unet) if start is not None else 1
    if config.widen % start_width:
        raise SystemExit(f"--widen {config.widen}: the start is {start_width}x the base's width already")
    if start_width > 1:
        unet = widen_unet(unet, start_width)
    if start is not None:
        unet.load_state_dict(start)
    if config.widen > start_width:
        unet = widen_unet(unet, config.widen // start_width, seed=seed)
    unet.train()
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    conv_in = list(unet.conv_in.parameters())
    rest = [p for n, p in unet.named_parameters() if not n.startswith("conv_in.")]
    opt = torch.optim.AdamW(
        [{"params": rest, "scale": 1.0}, {"params": conv_in, "scale": config.conv_in_lr_scale}],
        lr=config.learning_rate,
        weight_decay=1e-2,
    )
    noise_scheduler = DDPMScheduler(**SCHEDULE, prediction_type=pipe.scheduler.config.prediction_type)
    if state is not None:
        unet.load_state_dict(state["unet"])
        ema_unet.load_state_dict(state["ema_unet"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        first_step = state.get("first_step", 0)
        print(f"resumed from {checkpoint.path} at step {step}")
    elif init_from is not None:
        rebased = f", rebased from {rebase_from}" if rebase_from else ""
        widened = f", widened {config.widen // start_width}x" if config.widen > start_width else ""
        print(f"initialised from {init_from} at step {step}{rebased}{widened}")
    elif rebase_from is not None:
        raise SystemExit("--rebase-from moves an inpainting model: give it with --init-from")
    base_step = folder_step(base)
    if step >= max_steps and init_from is not None:  # nothing to train: the (rebased) start is the model
        export_run(ema_unet, out_dir / "model", step=step, base=base, config=config, init_from=init_from,
                   rebase_from=rebase_from)
        return ema_unet

    # 2. The example pool, encoded once.
    if pool_part is not None:
        build_pool(vae, tokenizer, out_dir, config.pool_size, part=pool_part, recipe=config.masks)
        return None
    pool = build_pool(vae, tokenizer, out_dir, config.pool_size, recipe=config.masks)
    canvas_pools = {
        canvas: build_pool(vae, tokenizer, out_dir, config.canvas_pool_size // len(inpaint_data.CANVAS_SIZES),
                           recipe=config.canvas_masks, canvas=canvas)
        for canvas in (inpaint_data.CANVAS_SIZES if config.canvas_share else ())
    }
    scaling = vae.config.scaling_factor
    latent_size = tuple(pool["target_mean"].shape[-2:])
    weights = sampling_weights(len(pool["ids"]), config.add_share, config.masks)
    whole = whole_image_examples(vae, pool) if config.teacher_share else None
    log = LossLog(out_dir, ["loss", "lr"])
    generator = torch.Generator().manual_seed(seed + step)
    print(
        f"U-Net {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters from {base} (step {base_step}), "
        f"{len(pool['ids'])} examples" + (f", {sum(len(p['ids']) for p in canvas_pools.values())} on "
                                           f"{len(canvas_pools)} other canvases" if canvas_pools else ""),
        flush=True,
    )

    while step < max_steps:
        # 3. A batch: latents sampled from both posteriors, the mask at latent size, the captions encoded.
        # Canvas batches come from one canvas's pool, with as many pixels as a 64x64 batch.
        canvas = None
        if canvas_pools and torch.rand((), generator=generator) < config.canvas_share:
            canvas = list(canvas_pools)[int(torch.randint(0, len(canvas_pools), (), generator=generator))]
        source = pool if canvas is None else canvas_pools[canvas]
        cells = source["target_mean"].shape[-2] * source["target_mean"].shape[-1]  # latent positions per example
        batch_size = max(1, round(config.batch_size * latent_size[0] * latent_size[1] / cells))
        if weights is None or canvas is not None:
            index = torch.randint(0, len(source["ids"]), (batch_size,), generator=generator)
        else:
            index = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
        latents = scaled_sample(source["target_mean"][index], source["target_std"][index], scaling, generator)
        masked = scaled_sample(source["masked_mean"][index], source["masked_std"][index], scaling, generator)
        mask = latent_mask(source["mask"][index].float(), tuple(latents.shape[-2:]))  # (B, 1, h, w)
        # the batch's last `taught` are whole-image (64x64 batches only)
        taught = round(config.teacher_share * batch_size) if canvas is None else 0
        if taught:
            # a whole-scene caption over its own scene's latents, everything masked: nothing left to copy
            index[-taught:] = whole["index"][torch.randint(0, len(whole["index"]), (taught,), generator=generator)]
            latents[-taught:] = scaled_sample(
                pool["target_mean"][index[-taught:]], pool["target_std"][index[-taught:]], scaling, generator
            )
            grey = (taught, *whole["grey_mean"].shape)
            masked[-taught:] = scaled_sample(
                whole["grey_mean"].expand(grey), whole["grey_std"].expand(grey), scaling, generator
            )
            mask[-taught:] = 1.0
        with torch.no_grad():
            hidden = text_encoder(source["ids"][index]).last_hidden_state  # (B, 24, 128)

        # 4. Noise at random timesteps; the U-Net sees (noisy, mask, masked) and predicts v.
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(torch.cat([noisy, mask, masked], dim=1), timesteps, hidden).sample  # (B, 4, h, w)
        target = (
            noise
            if noise_scheduler.config.prediction_type == "epsilon"
            else noise_scheduler.get_velocity(latents, noise, timesteps)
        )
        if taught:
            with torch.no_grad():  # what the base predicts for the whole-image examples is their target
                target[-taught:] = teacher(noisy[-taught:], timesteps[-taught:], hidden[-taught:]).sample
        error = F.mse_loss(prediction, target, reduction="none")  # (B, 4, h, w)
        area = 1 + (config.mask_loss_weight - 1) * mask  # (B, 1, h, w): the hole at its weight
        per_sample = (error * area).mean(dim=(1, 2, 3)) / area.mean(dim=(1, 2, 3))
        loss = (
            per_sample
            * loss_weights(noise_scheduler, timesteps, config.min_snr_gamma, noise_scheduler.config.prediction_type)
        ).mean()

        lr = config.learning_rate * min(1.0, (step + 1 - first_step) / config.warmup_steps)
        lr *= 0.5 * (1 + math.cos(math.pi * (step - first_step) / max(1, max_steps - first_step)))
        for group in opt.param_groups:
            group["lr"] = lr * group["scale"]  # conv_in at its multiple: optimizer_step leaves the rates as they are
        own_rate = config.base_channels_lr_scale is not None
        base_channels = unet.conv_in.weight[:, :4].detach().clone() if own_rate else None
        optimizer_step(opt, loss, clip=unet.parameters())
        if own_rate:
            # Adam's update is element-wise, so scaling this step's change of the four original channels is
            # exactly a learning rate of their own
            with torch.no_grad():
                moved = unet.conv_in.weight[:, :4] - base_channels
                unet.conv_in.weight[:, :4] = base_channels + moved * (
                    config.base_channels_lr_scale / config.conv_in_lr_scale
                )
        step += 1
        decay = min(config.ema_decay, (1 + step - first_step) / (10 + step - first_step))
        with torch.no_grad():
            for e, p in zip(ema_unet.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)

        if due(step, log_every, max_steps):
            log.write(step, loss=loss.item(), lr=lr)
        if due(step, save_every, max_steps):
            checkpoint.save(
                {
                    "unet": unet.state_dict(),
                    "ema_unet": ema_unet.state_dict(),
                    "opt": opt.state_dict(),
                    "step": step,
                    "first_step": first_step,
                    "config": asdict(config),
                }
            )
            export_run(
                ema_unet,
                out_dir / "model",
                step=step,
                base=base,
                config=config,
                init_from=init_from,
                rebase_from=rebase_from,
            )
            sample_grid(pipe, ema_unet.eval(), out_dir / "samples" / f"step-{step:06d}.png")
    return ema_unet


def scaled_sample(mean: torch.Tensor, std: torch.Tensor, scaling: float, generator: torch.Generator) -> torch.Tensor:
    """Latents drawn from the VAE posteriors (mean, std), scaled as the U-Net sees them."""
    return (mean + std * torch.randn(mean.shape, generator=generator)) * scaling


@torch.no_grad()
def whole_image_examples(vae, pool: dict) -> dict:
    """For --teacher-share: the pool examples whose caption names their whole scene, and the posterior of an
    all-masked picture (mid grey), which is what the 9-channel U-Net is shown when everything is masked."""
    index = torch.tensor([i for i, mode in enumerate(pool["modes"]) if mode == "scene"])
    if not len(index):
        raise SystemExit("--teacher-share: the pool holds no example captioned with its whole scene")
    size = pool["mask"].shape[-1]
    grey = inpaint_data.masked_source(np.zeros((size, size, 3), np.uint8), np.ones((size, size), bool))
    posterior = vae.encode(torch.from_numpy(grey).permute(2, 0, 1)[None]).latent_dist
    return {"index": index, "grey_mean": posterior.mean[0], "grey_std": posterior.std[0]}


def rebase(state: dict, *, old: dict, new: dict) -> dict:
    """An inpainting U-Net derived from base U-Net `old`, moved onto base U-Net `new` (a later step of the same
    run): every weight gets what the base's moved by, conv_in's four original input channels included, so a
    re-derivation starts from what the inpainting run learnt rather than from the base alone; train on from it
    (the model card's Limits say what it gave)."""
    moved = {}
    for name, weight in state.items():
        if name not in old or name not in new:
            raise SystemExit(f"--rebase-from: the bases have no weight {name}: not the same U-Net")
        delta = new[name] - old[name]
        if weight.shape == delta.shape:
            moved[name] = weight + delta
        elif name == "conv_in.weight" and weight.shape[1] > delta.shape[1]:
            moved[name] = weight.clone()
            moved[name][:, : delta.shape[1]] += delta  # the added channels (mask, masked latents) are its own
        else:
            raise SystemExit(f"--rebase-from: {name} is {tuple(weight.shape)} here, {tuple(delta.shape)} there")
    return moved


def width_of(start: dict, unet) -> int:
    """How many times the channels of `unet` (the base's width) the U-Net weights `start` have."""
    return start["conv_in.weight"].shape[0] // unet.conv_in.weight.shape[0]


def init_weights(source: Path) -> tuple[dict, int]:
    """The U-Net weights (the EMA's) and step to go on from: a run folder (its checkpoint.pt) or an exported
    model folder (unet/ and TRAINING_STEP, e.g. the shipped assets/models/shapes-inpaint)."""
    if (source / "checkpoint.pt").is_file():
        state = torch.load(source / "checkpoint.pt", map_location="cpu", weights_only=False)
        return state["ema_unet"], int(state["step"])
    if (source / "unet" / "config.json").is_file():
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
        return unet.state_dict(), int((source / "TRAINING_STEP").read_text())
    raise SystemExit(f"--init-from {source}: neither a run folder (checkpoint.pt) nor a model folder (unet/)")


def sampling_weights(size: int, add_share: float, recipe: str = "loose") -> torch.Tensor | None:
    """Per-example sampling weight: examples whose caption names an object the mask hides get `add_share` of the
    total; None for uniform sampling."""
    if not add_share:
        return None
    adds = torch.tensor([names_hidden_object(inpaint_data.training_example(i, i, recipe)) for i in range(size)])
    if adds.all() or not adds.any():
        return None
    return torch.where(adds, add_share / adds.sum(), (1 - add_share) / (~adds).sum())


def names_hidden_object(example: inpaint_data.InpaintExample) -> bool:
    """The caption names an object that the mask hides whole: the U-Net must draw it there."""
    return example.mode in ("scene", "part") and example.hidden > 0


def export_run(
    unet,
    target: Path,
    *,
    step: int,
    base: Path,
    config: InpaintConfig,
    init_from: Path | None = None,
    rebase_from: Path | None = None,
) -> None:
    """`target/unet` (diffusers, safetensors) plus what made it: the step, the base folder, its step and its text
    encoder's (the text states this U-Net reads at every step)."""
    unet.save_pretrained(Path(target) / "unet", safe_serialization=True)
    (Path(target) / "TRAINING_STEP").write_text(f"{step}\n")
    record = {"base": repo_relative(base), "base_step": folder_step(base),
              "base_text_step": folder_step(base, text=True), "step": step, **asdict(config)}
    if init_from is not None:  # the run it went on from, with that run's own record: the whole history
        record["init_from"] = repo_relative(Path(init_from))
        parent = Path(init_from) / "model" / "training.json"  # a run folder's, else a model folder's own
        parent = parent if parent.is_file() else Path(init_from) / "training.json"
        if parent.is_file():
            record["parent"] = json.loads(parent.read_text())
    if rebase_from is not None:  # the base the parent was derived from, whose U-Net's moves were added
        record["rebase_from"] = repo_relative(Path(rebase_from))
    record["out"] = repo_relative(Path(target).parent)
    (Path(target) / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def command(record: dict) -> str:
    """The train_inpaint command line that makes the run `record` (a training.json) describes."""
    parts = [
        f"python -m training.train_inpaint --base {record['base']} --out {record.get('out', 'runs/inpaint')}",
        f"--masks {record.get('masks', 'tight')} --pool-size {record['pool_size']}",
        f"--learning-rate {record['learning_rate']:g} --conv-in-lr-scale {record.get('conv_in_lr_scale', 1):g}",
    ]
    if record.get("add_share"):
        parts.append(f"--add-share {record['add_share']:g}")
    if record.get("base_channels_lr_scale") is not None:
        parts.append(f"--base-channels-lr-scale {record['base_channels_lr_scale']:g}")
    if record.get("teacher_share"):
        parts.append(f"--teacher-share {record['teacher_share']:g}")
    if record.get("mask_loss_weight", 1) != 1:
        parts.append(f"--mask-loss-weight {record['mask_loss_weight']:g}")
    if record.get("min_snr_gamma", InpaintConfig.min_snr_gamma) != InpaintConfig.min_snr_gamma:
        parts.append(f"--min-snr-gamma {record['min_snr_gamma']:g}")
    if record.get("widen", 1) != 1:
        parts.append(f"--widen {record['widen']}")
    if record.get("canvas_share"):
        parts.append(f"--canvas-share {record['canvas_share']:g} --canvas-pool-size {record['canvas_pool_size']}")
        if record.get("canvas_masks", "canvas") != "canvas":
            parts.append(f"--canvas-masks {record['canvas_masks']}")
    if record.get("init_from"):
        # the run it went on from, by its run folder: an exported folder (assets/models/...) may hold a later model
        parts.append(f"--init-from {(record.get('parent') or {}).get('out') or record['init_from']}")
    if record.get("rebase_from"):
        parts.append(f"--rebase-from {record['rebase_from']}")
    parts.append(f"--max-steps {record['step']} --threads 1")
    return " ".join(parts)


def history(record: dict) -> list[dict]:
    """The records of a run and the runs it went on from, oldest first."""
    chain = []
    while record:
        chain.append(record)
        record = record.get("parent")
    return chain[::-1]


def export(out_dir: Path, target: Path) -> None:
    """Copies a run's exported model (unet/, TRAINING_STEP, training.json) to `target`, keeping its card."""
    source = Path(out_dir) / "model"
    if not (source / "unet" / "config.json").is_file():
        raise SystemExit(f"{source} holds no exported U-Net yet: train first")
    (Path(target) / "unet").mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copy2(source / "unet" / name, Path(target) / "unet" / name)
    for name in ("TRAINING_STEP", "training.json"):
        shutil.copy2(source / name, Path(target) / name)
    print(f"exported {source} -> {target}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--base", type=Path, default=SHIPPED_BASE, help="the base pipeline folder whose U-Net is inflated"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("runs/inpaint"), help="run folder: pool, checkpoint, log, samples, model/"
    )
    parser.add_argument(
        "--max-steps", type=int, default=3000, help="train until this step (resumes from the checkpoint)"
    )
    parser.add_argument("--pool-size", type=int, default=InpaintConfig.pool_size)
    parser.add_argument("--batch-size", type=int, default=InpaintConfig.batch_size)
    parser.add_argument("--learning-rate", type=float, default=InpaintConfig.learning_rate)
    parser.add_argument(
        "--conv-in-lr-scale",
        type=float,
        default=InpaintConfig.conv_in_lr_scale,
        help="learning-rate multiple for conv_in (whose added channels start at zero)",
    )
    parser.add_argument(
        "--base-channels-lr-scale",
        type=float,
        default=InpaintConfig.base_channels_lr_scale,
        help="learning-rate multiple for conv_in's four original input channels (default: --conv-in-lr-scale)",
    )
    parser.add_argument(
        "--teacher-share",
        type=float,
        default=InpaintConfig.teacher_share,
        help="share of each batch made whole-image examples whose target is the base U-Net's prediction",
    )
    parser.add_argument(
        "--add-share",
        type=float,
        default=InpaintConfig.add_share,
        help="share of each batch whose caption names an object the mask hides (0: as in the pool)",
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start from another run folder's or an exported model folder's weights (fresh optimiser and "
        "schedule; the steps go on)",
    )
    parser.add_argument(
        "--rebase-from",
        type=Path,
        default=None,
        help="the base folder the --init-from model was derived from: add what the U-Net moved from it to --base "
        "to the start (re-deriving after the base was trained on); --max-steps at the start's step exports it as is",
    )
    parser.add_argument(
        "--mask-loss-weight",
        type=float,
        default=InpaintConfig.mask_loss_weight,
        help="loss weight of the masked area's latents relative to the rest",
    )
    parser.add_argument(
        "--min-snr-gamma",
        type=float,
        default=InpaintConfig.min_snr_gamma,
        help="cap on the SNR that weights the clean-latent error (train_ldm.loss_weights); higher values weigh "
        "the last, low-noise steps more",
    )
    parser.add_argument(
        "--widen",
        type=int,
        default=InpaintConfig.widen,
        help="channels of every block as a multiple of the base's; a narrower start is widened keeping its function",
    )
    parser.add_argument(
        "--masks",
        choices=list(inpaint_data.MASK_RECIPES),
        default=InpaintConfig.masks,
        help="mask recipe of the pool (training/inpaint_data.py MASK_RECIPES)",
    )
    parser.add_argument(
        "--pool-part",
        default=None,
        metavar="K/N",
        help="only encode every N-th pool chunk from the K-th, then exit (run N of these side by side)",
    )
    parser.add_argument("--canvas-share", type=float, default=InpaintConfig.canvas_share,
                        help="share of batches from canvases that are not 64x64 (world 2's scenes, "
                             "inpaint_data.CANVAS_SIZES)")
    parser.add_argument("--canvas-pool-size", type=int, default=InpaintConfig.canvas_pool_size,
                        help="examples encoded over all those canvases")
    parser.add_argument("--canvas-masks", choices=[r for r in inpaint_data.MASK_RECIPES if r.startswith("canvas")],
                        default=InpaintConfig.canvas_masks, help="the mask recipe of those canvases' examples")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--export",
        type=Path,
        default=None,
        metavar="FOLDER",
        help="copy the run's exported model to FOLDER (e.g. assets/models/shapes-inpaint) and exit",
    )
    args = parser.parse_args(argv)
    if args.export:
        export(args.out, args.export)
        return
    config = InpaintConfig(
        pool_size=args.pool_size,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        conv_in_lr_scale=args.conv_in_lr_scale,
        base_channels_lr_scale=args.base_channels_lr_scale,
        teacher_share=args.teacher_share,
        add_share=args.add_share,
        masks=args.masks,
        mask_loss_weight=args.mask_loss_weight,
        min_snr_gamma=args.min_snr_gamma,
        widen=args.widen,
        canvas_share=args.canvas_share,
        canvas_pool_size=args.canvas_pool_size,
        canvas_masks=args.canvas_masks,
    )
    train(
        args.base,
        args.out,
        args.max_steps,
        config,
        log_every=args.log_every,
        save_every=args.save_every,
        threads=args.threads,
        init_from=args.init_from,
        rebase_from=args.rebase_from,
        pool_part=tuple(int(v) for v in args.pool_part.split("/")) if args.pool_part else None,
    )


if __name__ == "__main__":
    main()
