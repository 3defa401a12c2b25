"""Trains the Shapes LDM: a text-conditioned U-Net on frozen VAE latents, jointly with its text encoder.

    python -m training.train_ldm --vae runs/vae/vae --out runs/ldm --max-steps 6000

Reads top to bottom: 1. encode a fixed set of training scenes to latents once (the VAE is frozen),
2. tokenize their captions, 3. train eps-prediction with min-SNR weighting and 10% caption dropout
(the unconditional branch of classifier-free guidance), keeping an EMA of the weights,
4. every `--eval-every` steps generate held-out prompts and score them with the evaluation checker,
5. export a diffusers StableDiffusionPipeline folder (EMA weights) that `from_pretrained` loads.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

from training import shapes, text
from training.common import (
    STEP_FILE,
    TEXT_STEP_FILE,
    Checkpoint,
    LossLog,
    due,
    folder_step,
    images_to_tensor,
    optimizer_step,
    save_grid,
    set_threads,
)

# The noise schedule of Stable Diffusion: every diffusers scheduler then behaves as it does on SD,
# so the app's scheduler menu, img2img strength and ControlNet code need no special case.
SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
)


@dataclass
class LDMConfig:
    block_out_channels: tuple = (32, 64, 64)  # 16x16, 8x8, 4x4 latent levels
    attention_heads: int = 4
    text_hidden_size: int = 128  # width of the text encoder = cross-attention dim
    text_layers: int = 2
    train_scenes: int = 24_000  # scenes encoded once; each is seen ~16 times in 6000 steps of 64
    batch_size: int = 64
    learning_rate: float = 5e-4
    warmup_steps: int = 200
    cosine_decay: bool = (
        False  # decay the learning rate to 0 at --max-steps (for a final run that settles the weights)
    )
    caption_dropout: float = 0.1  # share of empty captions: the unconditional model for CFG
    min_snr_gamma: float = 5.0  # Hang et al. 2023: caps the weight of easy, low-noise steps
    # "v_prediction" (Salimans & Ho 2022): at high noise the U-Net predicts the clean latent itself,
    # where eps-prediction's loss is nearly blind to layout and text; see loss_weights.
    prediction_type: str = "v_prediction"
    ema_decay: float = 0.999
    # Share of each batch drawn from two-object scenes (0: as often as the data has them, 40%); binding is
    # learned only from those.
    two_object_share: float = 0.0
    # World 1: every k-th training scene with its objects moved up to shapes.MOVE_PX off the nine places the world
    # keeps them near (0: none). A U-Net trained only on those places draws forms best there; inpainting asks for
    # them anywhere.
    moved_every: int = 0
    # Cross-attention also in the last up block (16x16): without it the 16x16 level hears the prompt only
    # through the pooled text, which cannot say which of two small shapes is the star. ~60% slower steps.
    attention_16x16_up: bool = False
    # Transformer layers in every attention block (diffusers' transformer_layers_per_block). With --init-from a
    # one-layer model, the added layers start as identities (start_added_attention_as_identity): more capacity
    # where the prompt is read, the model computing exactly what its source did at the first step.
    transformer_layers: int = 1
    # World 2 (training/shapes.py, docs/MODEL_V2.md): its textures, free poses and generic word; its tokenizer
    # extends world 1's (old ids unchanged), and a world-1 text encoder grows to it (text.grow_text_encoder).
    world: int = 1
    # Canvas sizes (width, height) of world-2 scenes: each scene is drawn at shapes.canvas_of(seed, sizes) and
    # every batch comes from one size (a bucket), so a batch is one tensor. Empty: 64x64 only.
    sizes: tuple = ()
    # With several canvases: batch_size is the batch at 64x64 and a bucket's batch holds about as many pixels
    # (128x128: a quarter, at least MIN_BUCKET_BATCH), so every step costs about what a 64x64 step does. A
    # batch of 64 at 128x128 cost 7.5x the 64x64 step (docs/MODEL_V2.md, "Step time").
    pixel_budget: bool = False
    # With several canvases: the share of batches drawn at 64x64, the app's default canvas, from every training
    # scene drawn at 64x64 (a second cache); the rest come from the mixed canvases as before. 0: 64x64 gets only
    # its 1/25 of the canvases, and at that share a run from the shipped model lost 64x64 binding (62% -> 25%,
    # docs/MODEL_V2.md).
    base_canvas_share: float = 0.0
    # False: the text encoder stays as loaded (--init-from) and only the U-Net trains. The shipped ControlNets,
    # inpainting U-Net and their cards read the base's text states, so a base whose text encoder is unchanged
    # is a drop-in U-Net for them.
    train_text_encoder: bool = True


MIN_BUCKET_BATCH = 8  # the smallest batch a large canvas gets under pixel_budget


def build_unet(config: LDMConfig) -> UNet2DConditionModel:
    levels = len(config.block_out_channels)
    return UNet2DConditionModel(
        sample_size=shapes.IMAGE_SIZE // 4,  # latents of the f=4 VAE: (4, 16, 16)
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=1,
        # Cross-attention only at 8x8 and 4x4 (and optionally the last up block): attention at 16x16 in
        # every block quadruples the step time.
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1)
        + (("CrossAttnUpBlock2D",) if config.attention_16x16_up else ("UpBlock2D",)),
        transformer_layers_per_block=config.transformer_layers,
        cross_attention_dim=config.text_hidden_size,
        attention_head_dim=config.attention_heads,  # diffusers' legacy name: this is the head count
        # Pooled text added to the time embedding: global conditioning makes colour and shape learn
        # in hundreds rather than thousands of steps on this data, and SD pipelines run it unchanged.
        addition_embed_type="text",
        addition_embed_type_num_heads=config.attention_heads,
        norm_num_groups=32,
    )


@torch.no_grad()
def encode_scenes(
    vae: AutoencoderKL, count: int, cache: Path, chunk: int = 256, moved_every: int = 0
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Posterior (mean, std) of `count` training scenes, cached on disk; (N, 4, 16, 16) each. `moved_every` = k > 0:
    every k-th scene (seeds k - 1, 2k - 1, ...) with its objects moved off the world's places (shapes.moved_sample)."""
    if cache.exists():
        saved = torch.load(cache, weights_only=False)
        if saved["mean"].shape[0] >= count and saved.get("moved_every", 0) == moved_every:
            return saved["mean"][:count], saved["std"][:count], saved["captions"][:count]
    means, stds, captions = [], [], []
    started = time.time()
    for first in range(0, count, chunk):
        samples = [shapes.moved_sample(seed) if moved_every and seed % moved_every == moved_every - 1
                   else shapes.sample(seed) for seed in range(first, min(first + chunk, count))]
        images, batch_captions = np.stack([s.image for s in samples]), [s.caption for s in samples]
        posterior = vae.encode(images_to_tensor(images)).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
        captions += batch_captions
        print(f"encoded {first + len(images)}/{count} scenes ({time.time() - started:.0f} s)", flush=True)
    mean, std = torch.cat(means), torch.cat(stds)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"mean": mean, "std": std, "captions": captions, "moved_every": moved_every}, cache)
    return mean, std, captions


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights of an eps-prediction MSE (the clean-latent error weighted by min(SNR, gamma))."""
    alphas_cumprod = scheduler.alphas_cumprod[timesteps]
    snr = alphas_cumprod / (1 - alphas_cumprod)
    return torch.clamp(snr, max=gamma) / snr


def loss_weights(
    scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Per-sample weights of the MSE on the prediction target.

    In clean-latent terms an eps MSE weights the x0 error by SNR, which is ~0.005 at the noisiest steps:
    there the model decides layout and reads the prompt, yet barely learns (measured here: after 3,000
    eps steps the conditional and unconditional predictions at t=900 were almost equal). For
    v-prediction the x0 error gets min(SNR, gamma) + 1: weight 1 at high noise, capped at low noise.
    """
    if prediction_type == "epsilon":
        return min_snr_weights(scheduler, timesteps, gamma)
    alphas_cumprod = scheduler.alphas_cumprod[timesteps]
    snr = alphas_cumprod / (1 - alphas_cumprod)
    return (torch.clamp(snr, max=gamma) + 1) / (snr + 1)  # a v MSE weights the x0 error by SNR + 1


def assemble_pipeline(
    vae, text_encoder, tokenizer, unet, prediction_type: str = "v_prediction"
) -> StableDiffusionPipeline:
    scheduler = DPMSolverMultistepScheduler(
        **SCHEDULE, prediction_type=prediction_type, algorithm_type="dpmsolver++", solver_order=2
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def train(
    vae_path: Path,
    out_dir: Path,
    max_steps: int,
    config: LDMConfig,
    *,
    log_every=50,
    save_every=250,
    eval_every=500,
    seed=0,
    init_from: Path | None = None,
    stop_at: int | None = None,
) -> StableDiffusionPipeline:
    """Trains to `max_steps`; `stop_at` ends the run earlier (saved and exported there) while the learning-rate
    schedule still runs to `max_steps`, so a copy of the run folder can go on with other settings from a
    point mid-schedule."""
    out_dir = Path(out_dir)
    last_step = min(max_steps, stop_at) if stop_at is not None else max_steps
    torch.manual_seed(seed)
    # 1. Frozen VAE and the cached latents of the training scenes.
    vae = AutoencoderKL.from_pretrained(vae_path).eval().requires_grad_(False)
    buckets = None
    if config.world == 1 and not config.sizes:
        mean, std, captions = encode_scenes(vae, config.train_scenes, out_dir / "latents.pt",
                                            moved_every=config.moved_every)
    else:
        buckets = encode_buckets(vae, config, out_dir / f"latents-world{config.world}.pt")
        if config.base_canvas_share > 0:
            base = encode_buckets(vae, replace(config, sizes=()), out_dir / f"latents-world{config.world}-64x64.pt")
            buckets += [{**bucket, "share": config.base_canvas_share} for bucket in base]
        captions = [c for bucket in buckets for c in bucket["captions"]]
    scaling = vae.config.scaling_factor

    # 2. Tokenizer and captions as ids, once.
    # World 2's vocabulary adds the generic word; a model that has it (e.g. the shipped one, packaged with it) keeps it
    # when trained on in world 1
    larger = config.world == 2 or (init_from is not None and knows_generic_word(Path(init_from)))
    tokenizer = text.build_tokenizer(shapes.vocabulary_v2() if larger else None)
    ids = text.tokenize(tokenizer, captions)
    empty_ids = text.tokenize(tokenizer, [""])

    # 3. Models, optimiser, EMA; resume if a checkpoint exists.
    text_encoder = text.build_text_encoder(tokenizer, hidden_size=config.text_hidden_size, layers=config.text_layers)
    unet = build_unet(config)
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if config.train_text_encoder else [])
    text_encoder.requires_grad_(config.train_text_encoder)
    opt = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=1e-2)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    noise_scheduler = DDPMScheduler(**SCHEDULE, prediction_type=config.prediction_type)
    step = first_step = 0  # first_step: where this run's warm-ups (learning rate, EMA) started
    text_step = None  # with a frozen text encoder: the step it was trained to (its source's), kept in the export
    checkpoint = Checkpoint(out_dir)
    state = checkpoint.load()
    if state is not None:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        first_step = state.get("first_step", 0)
        text_step = state.get("text_step")
        print(f"resumed from {checkpoint.path} at step {step}")
    elif init_from is not None:
        # A new run that starts from another run's weights (e.g. a change of prediction type): the
        # optimiser starts fresh and warms up again, the step count goes on for one continuous curve.
        # The source's EMA weights become the live weights and the new EMA's starting point.
        source = load_source(init_from)
        for module in (text_encoder, ema_text):
            load_text_encoder(module, source["ema_text"], tokenizer)
        fresh = []
        for module in (unet, ema_unet):
            fresh = load_matching(module, source["ema_unet"])
            added = start_added_attention_as_identity(module, fresh)
        if fresh and added:
            # Only attention blocks were added, each starting as an identity: the U-Net computes exactly
            # what the source did, so its curve goes on.
            step = first_step = source["step"]
            print(
                f"initialised from {init_from} (step {step}); "
                f"added attention blocks start as identities: {', '.join(added)}"
            )
        elif fresh:
            # A wider U-Net: every tensor whose shape is unchanged (the text encoder, the cross-attention
            # levels) starts trained, the rest from scratch; its curve starts again at step 0.
            print(f"initialised from {init_from}: {len(fresh)} U-Net tensors of a new shape start fresh, "
                  f"e.g. {', '.join(fresh[:4])}")
        else:
            step = first_step = source["step"]
            print(f"initialised from {init_from} (step {step}, {source['config'].get('prediction_type', 'epsilon')})")
    if state is None and init_from is not None and not config.train_text_encoder:
        text_step = source["step"] if source.get("text_step") is None else source["text_step"]
    n_unet = sum(p.numel() for p in unet.parameters())
    n_text = sum(p.numel() for p in text_encoder.parameters())
    print(f"U-Net {n_unet / 1e6:.2f} M parameters, text encoder {n_text / 1e6:.2f} M, {len(captions)} scenes")
    sampling_weights = scene_weights(captions, config.two_object_share) if buckets is None else None
    if buckets is not None:
        for bucket in buckets:
            bucket["ids"] = text.tokenize(tokenizer, bucket["captions"])
            bucket["weights"] = scene_weights(bucket["captions"], config.two_object_share)
    log = LossLog(out_dir, ["loss", "lr", "colour", "shape", "position", "binding"])
    generator = torch.Generator().manual_seed(seed + step)
    scores: dict[str, float] = {}

    while step < last_step:
        # 4. A batch: sample latents from the posterior, drop 10% of captions.
        if buckets is not None:  # world 2 / several canvases: one bucket (one size) per batch
            latents, batch_ids = bucket_batch(buckets, config.batch_size, generator, config.pixel_budget)
            latents = latents * scaling
        else:
            if sampling_weights is None:  # the default draws exactly as before the option existed
                index = torch.randint(0, len(captions), (config.batch_size,), generator=generator)
            else:
                index = torch.multinomial(sampling_weights, config.batch_size, replacement=True, generator=generator)
            latents = (
                mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)
            ) * scaling  # (B, 4, 16, 16)
            batch_ids = ids[index].clone()
        batch_size = len(latents)
        drop = torch.rand(batch_size, generator=generator) < config.caption_dropout
        batch_ids[drop] = empty_ids

        # 5. Noise at random timesteps and predict it.
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator
        )
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        with torch.set_grad_enabled(config.train_text_encoder):
            hidden = text_encoder(batch_ids).last_hidden_state  # (B, 24, 128)
        prediction = unet(noisy, timesteps, hidden).sample
        target = (
            noise if config.prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
        )
        per_sample = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
        loss = (
            per_sample * loss_weights(noise_scheduler, timesteps, config.min_snr_gamma, config.prediction_type)
        ).mean()

        lr = config.learning_rate * min(1.0, (step + 1 - first_step) / config.warmup_steps)
        if config.cosine_decay:
            lr *= 0.5 * (1 + math.cos(math.pi * (step - first_step) / max(1, max_steps - first_step)))
        optimizer_step(opt, loss, lr=lr, clip=params)
        step += 1

        # 6. EMA of the weights (warm-up: plain averaging early, so the EMA is not stuck at init).
        decay = min(config.ema_decay, (1 + step - first_step) / (10 + step - first_step))
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text, text_encoder)):
                for e, p in zip(ema.parameters(), live.parameters()):
                    e.lerp_(p, 1 - decay)

        if due(step, eval_every, last_step):
            scores = quick_scores(
                assemble_pipeline(vae, ema_text, tokenizer, ema_unet, config.prediction_type),
                out_dir / "samples" / f"step-{step:06d}.png",
            )
        if due(step, log_every, last_step):
            log.write(step, loss=loss.item(), lr=lr, **scores)
            scores = {}
        if due(step, save_every, last_step):
            checkpoint.save(
                {
                    "unet": unet.state_dict(),
                    "text_encoder": text_encoder.state_dict(),
                    "ema_unet": ema_unet.state_dict(),
                    "ema_text": ema_text.state_dict(),
                    "opt": opt.state_dict(),
                    "step": step,
                    "first_step": first_step,
                    "text_step": text_step,
                    "config": asdict(config),
                }
            )
            export(
                assemble_pipeline(vae, ema_text, tokenizer, ema_unet, config.prediction_type),
                out_dir / "pipeline",
                step,
                text_step,
            )
    return assemble_pipeline(vae, ema_text, tokenizer, ema_unet, config.prediction_type)


# ----------------------------------------------------------------------------- world 2 and canvas buckets

def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """"64x64,128x64" -> ((64, 64), (128, 64)); "all" -> every world-2 canvas; each checked by shapes.check_canvas."""
    if text.strip() == "all":
        return tuple(shapes.canvases())
    sizes = []
    for item in text.split(","):
        try:
            width, height = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--sizes: {item!r} is not WIDTHxHEIGHT (e.g. 128x64)") from None
        try:
            sizes.append(shapes.check_canvas(width, height))
        except ValueError as error:
            raise SystemExit(f"--sizes: {error}") from None
    return tuple(sizes)


@torch.no_grad()
def encode_buckets(vae: AutoencoderKL, config: LDMConfig, cache: Path, chunk: int = 128) -> list[dict]:
    """World-`config.world` training scenes (seeds 0 .. train_scenes - 1) grouped by canvas, each scene drawn at
    shapes.canvas_of(seed, sizes); per bucket the posterior mean and std (n, 4, h / 4, w / 4) and captions.
    Cached on disk with the settings it was made with (a cache of other settings is made again)."""
    sizes = list(config.sizes) or [(shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)]
    settings = {"world": config.world, "sizes": sizes, "train_scenes": config.train_scenes}
    if cache.exists():
        saved = torch.load(cache, weights_only=False)
        if saved["settings"] == settings:
            return saved["buckets"]
    seeds: dict[tuple[int, int], list[int]] = {size: [] for size in sizes}
    for seed in range(config.train_scenes):
        seeds[shapes.canvas_of(seed, sizes) if len(sizes) > 1 else sizes[0]].append(seed)
    buckets, started, done = [], time.time(), 0
    for size, bucket_seeds in seeds.items():
        means, stds, captions = [], [], []
        for first in range(0, len(bucket_seeds), chunk):
            images, batch_captions = shapes.batch(bucket_seeds[first:first + chunk], world=config.world, size=size)
            posterior = vae.encode(images_to_tensor(images)).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
            captions += batch_captions
            done += len(images)
            print(f"encoded {done}/{config.train_scenes} scenes ({time.time() - started:.0f} s)", flush=True)
        if captions:
            buckets.append({"size": size, "mean": torch.cat(means), "std": torch.cat(stds), "captions": captions})
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"settings": settings, "buckets": buckets}, cache)
    return buckets


def bucket_batch(
    buckets: list[dict], batch_size: int, generator: torch.Generator, pixel_budget: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents sampled from the posterior, caption ids) of one batch from one bucket, the bucket drawn in
    proportion to its scenes; within it uniformly, or by its two-object weights. `pixel_budget`: `batch_size`
    is the batch at 64x64, and a bucket's batch holds about as many pixels (LDMConfig.pixel_budget). A bucket
    with a "share" is drawn that share of the time, the others in proportion to their scenes in the rest."""
    counts = torch.tensor([len(b["captions"]) for b in buckets], dtype=torch.float)
    shared = torch.tensor(["share" in b for b in buckets])
    draw = counts / counts[~shared].sum() * (1 - sum(b.get("share", 0.0) for b in buckets))
    draw[shared] = torch.tensor([b["share"] for b in buckets if "share" in b], dtype=torch.float)
    bucket = buckets[int(torch.multinomial(draw, 1, generator=generator))]
    if pixel_budget:
        width, height = bucket["size"]
        batch_size = bucket_batch_size(batch_size, width, height)
    if bucket.get("weights") is None:
        index = torch.randint(0, len(bucket["captions"]), (batch_size,), generator=generator)
    else:
        index = torch.multinomial(bucket["weights"], batch_size, replacement=True, generator=generator)
    mean, std = bucket["mean"][index], bucket["std"][index]
    return mean + std * torch.randn(mean.shape, generator=generator), bucket["ids"][index].clone()


def bucket_batch_size(batch_size: int, width: int, height: int) -> int:
    """The batch at a `width` x `height` canvas holding about the pixels of `batch_size` 64x64 scenes."""
    side = shapes.IMAGE_SIZE
    return max(MIN_BUCKET_BATCH, min(batch_size, round(batch_size * side * side / (width * height))))


def load_source(init_from: Path) -> dict:
    """A run's checkpoint.pt, or an exported pipeline folder (e.g. assets/models/shapes-ldm) read as one: its
    U-Net and text encoder stand for the EMA weights, its TRAINING_STEP for the step."""
    init_from = Path(init_from)
    if not init_from.is_dir():
        return torch.load(init_from, map_location="cpu", weights_only=False)
    from transformers import CLIPTextModel

    step = folder_step(init_from)
    return {
        "ema_unet": UNet2DConditionModel.from_pretrained(init_from / "unet").state_dict(),
        "ema_text": CLIPTextModel.from_pretrained(init_from / "text_encoder").state_dict(),
        "step": int(step) if step != "?" else 0,
        "text_step": int(folder_step(init_from, text=True)) if step != "?" else 0,
        "config": {"prediction_type": json.loads((init_from / "scheduler" / "scheduler_config.json").read_text())
                   .get("prediction_type", "epsilon")},
    }


def knows_generic_word(source: Path) -> bool:
    """Whether a pipeline folder's tokenizer has world 2's generic word (a checkpoint file: no)."""
    vocabulary = source / "tokenizer" / "tokenizer.json"
    return vocabulary.is_file() and shapes.GENERIC_WORD in json.loads(vocabulary.read_text())["model"]["vocab"]


def load_text_encoder(module, state: dict, tokenizer) -> None:
    """Loads a source run's text encoder; a world-1 one into a world-2 encoder grows its table to the larger
    vocabulary first (old rows bit for bit, new words from related ones: text.grow_text_encoder)."""
    rows = next(v for k, v in state.items() if k.endswith("embeddings.token_embedding.weight")).shape[0]
    own = module.get_input_embeddings().weight.shape[0]
    if rows == own:
        module.load_state_dict(state)
        return
    module.resize_token_embeddings(rows, mean_resizing=False)
    module.load_state_dict(state)
    added = text.grow_text_encoder(module, tokenizer)
    print(f"text encoder grown from {rows} to {own} tokens: {', '.join(added)}")


def scene_weights(captions: list[str], two_object_share: float) -> torch.Tensor | None:
    """Sampling weight per training scene: two-object scenes get `two_object_share` of the total; None for
    uniform sampling (a share of 0, or scenes of one kind only)."""
    if not two_object_share:
        return None
    two = torch.tensor([sum(word in shapes.SHAPES for word in c.split()) == 2 for c in captions])
    if two.all() or not two.any():
        return None
    return torch.where(two, two_object_share / two.sum(), (1 - two_object_share) / (~two).sum())


def load_matching(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Load the tensors of `state` whose name and shape match; the names left at their fresh init."""
    own = module.state_dict()
    matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    module.load_state_dict(matching, strict=False)
    return [k for k in own if k not in matching]


def widen_unet(unet: UNet2DConditionModel, factor: int, *, noise: float = 0.05, seed: int = 0):
    """A U-Net with `factor` times the channels in every block that computes what `unet` computes.

    Net2WiderNet (Chen et al. 2016): each channel becomes `factor` adjacent copies. A layer that writes channels
    repeats its rows; a layer that reads them splits each column between the copies (1/factor each, plus noise
    that sums to zero over the copies, so the output is unchanged while the copies get different gradients and
    grow apart). Adjacent copies keep GroupNorm's groups (a group then holds the copies of the old group's
    channels: the same mean and variance) and LayerNorm's statistics. The attention heads keep their count and
    double their width, so each query is scaled by factor^-1/2 to keep the logits. The time embedding keeps its
    width (`time_embedding_dim`); its sinusoidal input widens with the first block, and with a frequency shift of
    0 every old frequency is one of the new ones, which is all linear_1 reads."""
    config = {k: v for k, v in unet.config.items() if k != "_use_default_values"}  # else from_config resets them
    old_time_dim = config["time_embedding_dim"] or config["block_out_channels"][0] * 4
    if config["time_embedding_type"] != "positional" or config["freq_shift"] != 0:
        raise SystemExit("widening needs the positional time embedding with freq_shift 0")
    config["block_out_channels"] = [c * factor for c in config["block_out_channels"]]
    config["time_embedding_dim"] = old_time_dim
    wide = UNet2DConditionModel.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    old, state = unet.state_dict(), {}
    for name, target in wide.state_dict().items():
        weight = old[name]
        if name == "time_embedding.linear_1.weight":  # columns: cos then sin of each frequency (flip_sin_to_cos)
            half = weight.shape[1] // 2
            state[name] = torch.zeros_like(target)
            state[name][:, 0 : 2 * half : factor] = weight[:, :half]
            state[name][:, 2 * half :: factor][:, :half] = weight[:, half:]
            continue
        for dim, (size, was) in enumerate(zip(target.shape, weight.shape)):
            if size == was:
                continue
            if size != was * factor or dim > 1:
                raise SystemExit(f"cannot widen {name}: {tuple(weight.shape)} -> {tuple(target.shape)}")
            weight = weight.repeat_interleave(factor, dim=dim)
            if dim == 1:  # reads widened channels: split between the copies, noise summing to zero over them
                jitter = torch.randn(weight.shape, generator=generator) * noise * weight.std() / factor
                grouped = jitter.unflatten(1, (-1, factor))
                jitter = (grouped - grouped.mean(dim=2, keepdim=True)).flatten(1, 2)
                weight = weight / factor + jitter
        if ".attn" in name and ".to_q." in name and weight.shape[0] != old[name].shape[0]:
            weight = weight * factor**-0.5  # head width x factor: logits q.k / sqrt(d) stay as they were
        state[name] = weight
    wide.load_state_dict(state)
    return wide


def start_added_attention_as_identity(unet: torch.nn.Module, fresh: list[str]) -> list[str]:
    """Makes the attention that `fresh` holds pass its input through: whole new attention blocks and new
    transformer layers inside existing blocks.

    A `Transformer2DModel` adds its output to its input, so a zero `proj_out` makes a new block an identity; a
    `BasicTransformerBlock` adds each of its self-attention, cross-attention and feed-forward outputs to its
    input, so zero output layers there make a new layer one. Training grows them from there (as ControlNet's
    zero convolutions). Returns the blocks' and layers' names if every fresh tensor belongs to one, else [] (and
    touches nothing)."""
    blocks = sorted({name.split(".proj_out.")[0] for name in fresh if ".attentions." in name and ".proj_out." in name})
    layers = sorted(
        {
            name.split(".attn1.to_out.")[0]
            for name in fresh
            if ".transformer_blocks." in name and ".attn1.to_out." in name
            and not any(name.startswith(block + ".") for block in blocks)
        }
    )
    added = blocks + layers
    if not added or not all(any(name.startswith(part + ".") for part in added) for name in fresh):
        return []
    outputs = [block + ".proj_out" for block in blocks] + [
        layer + suffix for layer in layers for suffix in (".attn1.to_out.0", ".attn2.to_out.0", ".ff.net.2")
    ]
    with torch.no_grad():
        for name in outputs:
            projection = unet.get_submodule(name)
            projection.weight.zero_()
            projection.bias.zero_()
    return added


def quick_scores(pipe: StableDiffusionPipeline, grid_path: Path, count: int = 48) -> dict[str, float]:
    """Prompt-following scores on the validation split (training/splits.py: never the reported test prompts),
    and a sample grid, during training."""
    from training import evaluate, splits

    result = evaluate.prompt_following(pipe, count=count, steps=20, guidance=5.0,
                                       expectations=splits.prompts("validation", count))
    save_grid(result["images"][:32], grid_path)
    return {k: result["scores"][k] for k in ("colour", "shape", "position", "binding")}


def export(pipe: StableDiffusionPipeline, target: Path, step: int, text_step: int | None = None) -> None:
    """The pipeline, its step and, when its text encoder last changed at an earlier step, that step."""
    pipe.save_pretrained(target, safe_serialization=True)
    (Path(target) / STEP_FILE).write_text(f"{step}\n")
    marker = Path(target) / TEXT_STEP_FILE
    if text_step is not None and text_step != step:
        marker.write_text(f"{text_step}\n")
    else:
        marker.unlink(missing_ok=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--vae", type=Path, default=Path("runs/vae/vae"), help="trained VAE folder (train_vae's export)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("runs/ldm"), help="run folder: checkpoint, log, samples, pipeline/"
    )
    parser.add_argument(
        "--max-steps", type=int, default=6000, help="train until this step (resumes from the checkpoint)"
    )
    parser.add_argument(
        "--stop-at",
        type=int,
        default=None,
        help="stop at this step, the schedule still running to --max-steps "
        "(to branch a run: copy its folder, go on with other settings)",
    )
    parser.add_argument("--train-scenes", type=int, default=LDMConfig.train_scenes)
    parser.add_argument("--batch-size", type=int, default=LDMConfig.batch_size)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--eval-every", type=int, default=500, help="0 turns the in-training evaluation off")
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=LDMConfig.prediction_type)
    parser.add_argument("--learning-rate", type=float, default=LDMConfig.learning_rate)
    parser.add_argument("--cosine-decay", action="store_true", help="decay the learning rate to 0 at --max-steps")
    parser.add_argument(
        "--init-from", type=Path, default=None,
        help="start a new run from another run's checkpoint.pt weights, or from an exported pipeline folder"
    )
    parser.add_argument("--channels", default=",".join(map(str, LDMConfig.block_out_channels)),
                        help="U-Net block_out_channels of the 16x16, 8x8 and 4x4 latent levels, e.g. 64,64,64")
    parser.add_argument("--two-object-share", type=float, default=LDMConfig.two_object_share,
                        help="share of each batch from two-object scenes (0: as in the data)")
    parser.add_argument("--moved-every", type=int, default=LDMConfig.moved_every,
                        help="world 1: every k-th training scene with its objects moved off the world's nine places "
                             "(0: none)")
    parser.add_argument(
        "--attention-16x16-up",
        action="store_true",
        help="cross-attention in the last up block too (16x16); with --init-from the new blocks start as identities",
    )
    parser.add_argument(
        "--transformer-layers",
        type=int,
        default=LDMConfig.transformer_layers,
        help="transformer layers per attention block; with --init-from a one-layer model the added layers start as "
        "identities",
    )
    parser.add_argument("--world", type=int, choices=shapes.WORLDS, default=LDMConfig.world,
                        help="the Shapes world's version (2: docs/MODEL_V2.md)")
    parser.add_argument("--sizes", default=None,
                        help="world-2 canvases WIDTHxHEIGHT,... (or 'all'); each batch from one size (default 64x64)")
    parser.add_argument("--pixel-budget", action="store_true",
                        help="with --sizes: --batch-size is the 64x64 batch; larger canvases get as many pixels")
    parser.add_argument("--base-canvas-share", type=float, default=LDMConfig.base_canvas_share,
                        help="with --sizes: share of batches at 64x64 from every training scene drawn at 64x64")
    parser.add_argument("--freeze-text-encoder", action="store_true",
                        help="train the U-Net only; the text encoder stays as --init-from has it")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    sizes = parse_sizes(args.sizes) if args.sizes else ()
    if sizes and args.world == 1:
        raise SystemExit("--sizes: world 1 is 64x64 only; add --world 2")
    config = LDMConfig(
        train_scenes=args.train_scenes,
        batch_size=args.batch_size,
        prediction_type=args.prediction_type,
        learning_rate=args.learning_rate,
        cosine_decay=args.cosine_decay,
        block_out_channels=tuple(int(c) for c in args.channels.split(",")),
        two_object_share=args.two_object_share,
        moved_every=args.moved_every,
        attention_16x16_up=args.attention_16x16_up,
        transformer_layers=args.transformer_layers,
        world=args.world,
        sizes=sizes,
        pixel_budget=args.pixel_budget,
        base_canvas_share=args.base_canvas_share,
        train_text_encoder=not args.freeze_text_encoder,
    )
    if config.moved_every < 0 or (config.moved_every and (args.world != 1 or sizes)):
        raise SystemExit(f"--moved-every {config.moved_every}: world 1's 64x64 scenes only, every k >= 1")
    if config.pixel_budget and not sizes:
        raise SystemExit("--pixel-budget: needs --sizes (one 64x64 canvas has nothing to budget)")
    if not 0 <= config.base_canvas_share < 1 or (config.base_canvas_share and not sizes):
        raise SystemExit(f"--base-canvas-share {config.base_canvas_share:g}: needs --sizes and a share in [0, 1)")
    train(args.vae, args.out, args.max_steps, config, log_every=args.log_every, save_every=args.save_every,
          eval_every=args.eval_every, init_from=args.init_from, stop_at=args.stop_at)


if __name__ == "__main__":
    main()
