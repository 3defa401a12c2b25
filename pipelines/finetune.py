"""Fine-tuning: teach the shared LDM a style or subject from a few images (DreamBooth, LoRA or full U-Net).

    result = finetune(engine, images, FineTuneSettings(token="zqx"), captions=["a red circle in zqx style", ...])
    # prompts with "zqx" now use the adapter in every tab; result.adapter names it in engine.adapters

The DreamBooth recipe (Ruiz et al. 2022) on the LDM's own loss: the images are encoded to latents once, then
every step noises a batch of them at random timesteps and trains the U-Net to predict the scheduler's target
(eps or v) given the caption. With LoRA (Hu et al. 2021) only low-rank updates injected into the shared U-Net
train; with "full" a copy of the U-Net trains. A trigger word the tokenizer cannot spell (the built-in model's
word-level vocabulary) gets a new embedding that trains too, as in textual inversion. Prior preservation adds
the same loss on images the base model draws for the captions without the word, so the model keeps what the
plain captions meant.

Training shares the engine with everyone else: it holds `engine.lock` for one optimiser step at a time, so
generation requests run between steps; until it finishes nothing but the trainer uses the new adapter.
"""
from __future__ import annotations

import contextlib
import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from pipelines.adapters import Adapter, needs_new_word, plain_unet_copy, prompt_words
from pipelines.common import Cancelled, InputError, ModelError, check_choice, check_float, check_int, check_text
from pipelines.run import CancelEvent, run_pipeline
from pipelines.settings import FINETUNE_METHODS, LR_SCHEDULES, finetune_defaults
from pipelines.txt2img import txt2img_request

# LoRA on attention (what most SD LoRAs train) and on the ResNet convolutions: a texture lives in the
# convolutions at full latent resolution, where the built-in U-Net has no attention at all.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2"]
WORD_LEARNING_RATE = 5e-3  # textual-inversion rate for the new word's vector

OnTrainStep = Callable[[int, int, float], None]  # (step, total, loss)


@dataclass
class FineTuneSettings:
    token: str  # trigger word, e.g. "zqx": prompts containing it use the result
    method: str = "lora"  # "lora" (peft low-rank updates) or "full" (a copy of the whole U-Net)
    name: str = ""  # adapter name; "" -> the token
    steps: int = 0  # optimiser steps; 0 -> the model's default (settings.finetune_defaults)
    learning_rate: float = 0.0  # 0 -> the method's default for the model (settings.finetune_defaults)
    rank: int = 8  # LoRA rank (alpha = rank, so the update's scale is 1)
    batch_size: int = 0  # images per step (drawn with replacement from the set); 0 -> the model's default
    prior_preservation: bool = False
    prior_weight: float = 1.0  # weight of the class images' loss
    prior_images: int = 0  # 0 -> twice the training images
    instance_prompt: str = ""  # caption of images without their own ({token} is replaced); "" -> the model's default
    lr_schedule: str = ""  # "constant" or "cosine" (decays to 0 by the last step); "" -> the model's default
    seed: int = 0

    def resolved_learning_rate(self, builtin: bool) -> float:
        if self.learning_rate > 0:
            return self.learning_rate
        defaults = finetune_defaults(builtin)
        return defaults.learning_rate_full if self.method == "full" else defaults.learning_rate_lora


@dataclass
class FineTuneResult:
    adapter: str  # name in engine.adapters
    token: str
    losses: list[float]  # per step
    seconds: float
    steps_done: int
    info: dict[str, Any] = field(default_factory=dict)


def check_settings(
    engine, settings: FineTuneSettings, images: list, captions: list[str] | None
) -> tuple[FineTuneSettings, list[str]]:
    """Validated settings and one caption per image (each containing the trigger word)."""
    limits = engine.limits
    adapters = engine.adapters
    token = adapters.check_token(settings.token)
    if token is None:
        raise InputError("the trigger word is empty: choose a new word such as 'zqx'")
    name = adapters.check_name(settings.name or token)
    adapters.check_room()  # before training, not after minutes of it
    defaults = finetune_defaults(engine.preset.is_builtin)
    method = check_choice("method", settings.method, FINETUNE_METHODS)
    if not 1 <= len(images) <= limits.max_finetune_images:
        raise InputError(
            f"{len(images)} training images given; use 1 to {limits.max_finetune_images} (3-10 work well)"
        )
    steps = check_int("steps", settings.steps or defaults.steps, 1, limits.max_finetune_steps)
    rank = check_int("rank", settings.rank, 1, 128)
    batch_size = check_int("batch_size", settings.batch_size or defaults.batch_size, 1, 16)
    learning_rate = check_float("learning_rate", settings.learning_rate, 0.0, 0.1)
    prior_weight = check_float("prior_weight", settings.prior_weight, 0.0, 10.0)
    prior_images = check_int("prior_images", settings.prior_images, 0, 4 * limits.max_finetune_images)
    seed = check_int("seed", settings.seed, 0, limits.max_seed)
    lr_schedule = check_choice("lr_schedule", settings.lr_schedule or defaults.lr_schedule, LR_SCHEDULES)
    template = check_text("instance_prompt", settings.instance_prompt or defaults.instance_prompt,
                          limits.max_prompt_chars)
    captions = [c for c in (captions or []) if c is not None]
    if captions and len(captions) != len(images):
        raise InputError(f"{len(captions)} captions for {len(images)} images: give one caption per image, or none")
    if not captions:
        if "{token}" not in template and token not in prompt_words(template):
            raise InputError(f"instance_prompt={template!r} must contain {{token}} or the word {token!r}")
        captions = [template.replace("{token}", token)] * len(images)
    cleaned = []
    for i, caption in enumerate(captions):
        caption = check_text(f"caption {i + 1}", caption, limits.max_prompt_chars).replace("{token}", token)
        if token not in prompt_words(caption):
            raise InputError(f"caption {i + 1} ({caption!r}) does not contain the trigger word {token!r}")
        cleaned.append(caption)
    return FineTuneSettings(
        **{
            **asdict(settings),
            "token": token,
            "name": name,
            "method": method,
            "steps": steps,
            "rank": rank,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "prior_weight": prior_weight,
            "prior_images": prior_images,
            "seed": seed,
            "lr_schedule": lr_schedule,
            "instance_prompt": template,
        }
    ), cleaned


def cosine_factor(step: int, total: int) -> float:
    """The learning rate's factor at `step` of `total` on a cosine to 0: the last steps of a tiny batch move the
    weights less, so the result is closer to an average of where training ended than to its last noisy step."""
    return 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


def without_token(caption: str, token: str) -> str:
    """The class prompt of a caption: "a red circle in zqx style" -> "a red circle"."""
    text = re.sub(rf"\bin {re.escape(token)} style\b", "", caption)
    text = re.sub(rf"\b{re.escape(token)}\b", "", text)
    return re.sub(r"\s+", " ", text).strip(" ,")


def prepare_images(images: list, size: int, max_pixels: int | None = None) -> list[Image.Image]:
    """Centre-cropped squares at the model's training size (DreamBooth trains at one resolution)."""
    from pipelines.preprocess import load_image

    return [ImageOps.fit(load_image(image, max_pixels=max_pixels), (size, size), Image.LANCZOS) for image in images]


def finetune(engine, images: list, settings: FineTuneSettings, *, captions: list[str] | None = None,
             on_step: OnTrainStep | None = None, cancel: CancelEvent | None = None) -> FineTuneResult:
    # 1. Check inputs (before any model work)
    settings, captions = check_settings(engine, settings, images, captions)
    adapters = engine.adapters
    if adapters.training.is_set():
        raise InputError("a fine-tune is already running on this server; try again when it has finished")
    adapters.training.set()
    try:
        return _finetune(
            engine,
            prepare_images(images, engine.preset.default_size, engine.limits.max_image_pixels),
            settings,
            captions,
            on_step,
            cancel,
        )
    finally:
        adapters.training.clear()


def _finetune(engine, images, settings, captions, on_step, cancel) -> FineTuneResult:
    started = time.perf_counter()
    base, adapters = engine.base, engine.adapters
    generator = torch.Generator().manual_seed(settings.seed)
    device = base.unet.device

    # 2. Latents of the training images (posterior mean and std, sampled every step), scaled as the U-Net expects
    mean, std = encode(engine, images)  # (N, 4, h, w) each
    word_id = None
    with engine.lock:
        if needs_new_word(base.tokenizer, settings.token):
            word_id = adapters.add_word(settings.token)
        ids = tokenize(engine, captions)  # (N, L); under the lock: encoding sets the tokenizer's shared padding state

    # 3. Prior preservation: the base model's own images for the captions without the word
    prior_mean = prior_std = prior_ids = None
    if settings.prior_preservation:
        class_prompts = [without_token(c, settings.token) for c in captions]
        count = settings.prior_images or 2 * len(images)
        prompts = [class_prompts[i % len(class_prompts)] for i in range(count)]
        prior = class_images(engine, prompts, seed=settings.seed, cancel=cancel)
        prior_mean, prior_std = encode(engine, prior)
        with engine.lock:
            prior_ids = tokenize(engine, prompts)

    # 4. What trains: LoRA layers in the shared U-Net, or a copy of the U-Net; plus the new word's vector
    unet, trainable = _trainable_unet(engine, settings)
    embeddings = base.text_encoder.get_input_embeddings()
    original_rows = embeddings.weight.detach().clone() if word_id is not None else None
    groups = [{"params": trainable, "lr": settings.resolved_learning_rate(engine.preset.is_builtin)}]
    if word_id is not None:
        groups.append({"params": [embeddings.weight], "lr": WORD_LEARNING_RATE, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, weight_decay=1e-2)
    schedule = (torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_factor(step, settings.steps))
                if settings.lr_schedule == "cosine" else None)
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(base.scheduler.config)
    losses: list[float] = []
    steps_done = 0
    try:
        for step in range(settings.steps):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"fine-tune cancelled after step {steps_done} of {settings.steps}")
            # 5.-6. A batch and one optimiser step, under the engine lock (generation requests run between
            # steps) and on the model thread, batch sampling included: one OpenMP pool (pipelines/compute.py)
            with engine.lock:
                if settings.method == "lora":
                    adapters.activate_for_training(settings.name)
                loss = engine.compute.run(_train_step, engine, unet, optimizer, noise_scheduler, generator, settings,
                                          mean, std, ids, prior_mean, prior_std, prior_ids, device,
                                          word_id=word_id, original_rows=original_rows)
            if schedule is not None:
                schedule.step()
            losses.append(loss)
            steps_done = step + 1
            if not math.isfinite(loss):
                raise ModelError(f"the loss became {loss} at step {steps_done}: lower the learning rate")
            if on_step is not None:
                on_step(steps_done, settings.steps, loss)
    except BaseException:
        _discard(engine, settings, word_id)
        raise

    # 7. Register the result: from now on prompts with the word use it, in every tab
    seconds = time.perf_counter() - started
    info = {
        "method": settings.method,
        "steps": steps_done,
        "images": len(images),
        "rank": settings.rank if settings.method == "lora" else None,
        "learning_rate": settings.resolved_learning_rate(engine.preset.is_builtin),
        "lr_schedule": settings.lr_schedule,
        "batch_size": settings.batch_size,
        "prior_preservation": settings.prior_preservation,
        "seconds": round(seconds, 1),
        "base": engine.preset.name,
        "final_loss": float(np.mean(losses[-20:])) if losses else None,
        "captions": sorted(set(captions))[:20],
    }
    token_embedding = embeddings.weight[word_id].detach().clone().float() if word_id is not None else None
    if settings.method == "full":
        unet = unet.to(engine.torch_dtype).eval().requires_grad_(False)
    adapter = Adapter(
        name=settings.name,
        kind=settings.method,
        token=settings.token,
        unet=unet if settings.method == "full" else None,
        token_embedding=token_embedding,
        info=info,
    )
    try:
        adapters.register(adapter)
    except BaseException:
        _discard(engine, settings, word_id)
        raise
    return FineTuneResult(adapter=settings.name, token=settings.token, losses=losses, seconds=seconds,
                          steps_done=steps_done, info=info)


@torch.no_grad()
def encode(engine, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior (mean, std) of images: (N, 4, H/f, W/f) each, on the CPU in float32."""
    vae = engine.base.vae
    x = torch.stack(
        [torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32)).permute(2, 0, 1) for im in images]
    )
    x = x / 127.5 - 1  # (N, 3, H, W) in [-1, 1]
    means, stds = [], []
    with engine.lock:
        for chunk in x.split(8):
            dist = engine.compute.run(lambda c: vae.encode(c.to(vae.device, vae.dtype)).latent_dist, chunk)
            means.append(dist.mean.float().cpu())
            stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def sample_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator, engine) -> torch.Tensor:
    return (mean + std * torch.randn(mean.shape, generator=generator)) * engine.base.vae.config.scaling_factor


def tokenize(engine, prompts: list[str]) -> torch.Tensor:
    tokenizer = engine.base.tokenizer
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def class_images(engine, prompts: list[str], *, seed: int, cancel: CancelEvent | None = None) -> list[Image.Image]:
    """What the base model draws for each class prompt (one seeded image each), at its defaults."""
    preset = engine.preset
    images = []
    for i, prompt in enumerate(prompts):
        request = txt2img_request(engine, prompt=prompt, seed=seed + i, steps=preset.default_steps,
                                  guidance=preset.default_guidance, width=preset.default_size,
                                  height=preset.default_size)
        with engine.lock:
            images += run_pipeline(engine, request, cancel=cancel)
    return images


def _trainable_unet(engine, settings: FineTuneSettings):
    with engine.lock:
        return engine.compute.run(_make_trainable, engine, settings)


def _make_trainable(engine, settings: FineTuneSettings):
    """(module to train, its trainable parameters); runs on the model thread under engine.lock."""
    base = engine.base
    if settings.method == "full":
        unet = plain_unet_copy(base.unet).float().train()  # from the base weights, not from other adapters
        unet.requires_grad_(True)
        return unet, [p for p in unet.parameters()]
    from peft import LoraConfig

    base.unet.requires_grad_(False)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.rank, init_lora_weights="gaussian",
                        target_modules=LORA_TARGETS)
    # peft draws the initial LoRA weights from torch's global generator; seeded here, the same settings
    # give the same adapter, and other requests' random state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        base.unet.add_adapter(config, adapter_name=settings.name)
    trainable = []
    for name, param in base.unet.named_parameters():
        if "lora_" in name and f".{settings.name}." in name:
            param.data = param.data.float()  # fp32 updates even when the base runs in fp16
            param.requires_grad_(True)
            trainable.append(param)
    if not trainable:
        raise ModelError(f"no LoRA layers were added to the U-Net (targets {LORA_TARGETS})")
    return base.unet, trainable


def _train_step(engine, unet, optimizer, noise_scheduler, generator, settings, mean, std, ids, prior_mean, prior_std,
                prior_ids, device, *, word_id, original_rows) -> float:
    """Draw a batch (images with replacement, class images alongside), noise it, take one optimiser step."""
    pick = torch.randint(0, len(mean), (settings.batch_size,), generator=generator)
    latents = sample_latents(mean[pick], std[pick], generator, engine)  # (B, 4, h, w)
    batch_ids = ids[pick]
    weights = torch.ones(len(pick))
    if prior_mean is not None:
        prior_pick = torch.randint(0, len(prior_mean), (settings.batch_size,), generator=generator)
        latents = torch.cat(
            [latents, sample_latents(prior_mean[prior_pick], prior_std[prior_pick], generator, engine)]
        )
        batch_ids = torch.cat([batch_ids, prior_ids[prior_pick]])
        weights = torch.cat([weights, torch.full((len(prior_pick),), settings.prior_weight)])
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return _step(engine, unet, optimizer, noisy, timesteps, batch_ids, target, weights, device,
                 word_id=word_id, original_rows=original_rows)


def _step(engine, unet, optimizer, noisy, timesteps, ids, target, weights, device, *, word_id, original_rows) -> float:
    """One optimiser step; the caller holds engine.lock. Returns the loss."""
    text_encoder = engine.base.text_encoder
    embeddings = text_encoder.get_input_embeddings()
    dtype = unet.dtype if unet is not engine.base.unet else engine.torch_dtype
    with torch.enable_grad():
        if word_id is not None:
            embeddings.weight.requires_grad_(True)
        hidden = text_encoder(ids.to(device)).last_hidden_state  # (B, L, D)
        autocast = (
            torch.autocast("cuda", dtype=torch.float16)
            if device.type == "cuda" and dtype == torch.float16
            else contextlib.nullcontext()
        )
        with autocast:
            prediction = unet(noisy.to(device, dtype), timesteps.to(device), hidden.to(dtype)).sample
        per_sample = F.mse_loss(prediction.float(), target.to(device).float(), reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * weights.to(device)).sum() / weights.sum().to(device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    if word_id is not None:
        with torch.no_grad():  # only the new word's row may change (textual inversion's rule)
            keep = torch.ones(len(original_rows), dtype=torch.bool)
            keep[word_id] = False
            embeddings.weight[keep] = original_rows[keep].to(embeddings.weight)
        embeddings.weight.requires_grad_(False)
        embeddings.weight.grad = None
    return float(loss.detach())


def _discard(engine, settings: FineTuneSettings, word_id: int | None) -> None:
    """Undo a fine-tune that did not finish: drop its LoRA layers and give the word back its old meaning."""
    with engine.lock:
        base = engine.base
        if settings.method == "lora" and settings.name not in engine.adapters:
            try:
                base.unet.delete_adapters(settings.name)
            except (ValueError, KeyError, AttributeError):
                pass
        if word_id is not None:
            engine.adapters.forget_word(settings.token)
        engine.adapters.invalidate()
