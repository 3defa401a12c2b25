"""Explain: watch latent diffusion happen, on the shared engine, without changing what it computes.

    result = explain(engine, prompt="a red circle", seed=1, steps=20, guidance=4.0)
    result.images[0]                       # exactly the image txt2img.generate makes with these settings
    e = result.explanation                 # everything recorded on the way, as numpy arrays and PIL images
    e.latents[i], e.x0_images[i]           # (4, h, w) z_t the U-Net saw at step i; x̂0 decoded
    e.attention[i]                         # (T, h, w) cross-attention per prompt token at step i (DAAM-style)
    e.eps_uncond[i], e.eps_cond[i]         # (4, h, w) the two noise predictions classifier-free guidance mixes

How it watches (all request-scoped, all undone in `finally` while holding engine.lock):
- a `Probe` wraps each cross-attention processor of the shared U-Net in `_AttentionProbe`, which calls the
  original processor (so the output is bit-identical) and then recomputes softmax(QK^T/sqrt(d)) for the
  conditional batch item; U-Net / text-encoder / VAE-decoder forward hooks record inputs, outputs and times;
- the run itself is txt2img's own request (`txt2img.txt2img_request` + `run_pipeline`),
  whose step-end callback (`capture=`) records the latents after every step;
- x̂0 = (z_t - sqrt(1 - ᾱ_t) ε̂) / sqrt(ᾱ_t), with ᾱ_t = 1 / (1 + σ_t²) from a reference copy of the request's
  scheduler (the σ it really used at that step; ᾱ from alphas_cumprod[t] for schedulers without σ).
"""
from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines import inpaint as inpaint_task
from pipelines import txt2img
from pipelines.common import GenerationResult, InputError, check_float
from pipelines.registry import REPO_ROOT
from pipelines.request import base_params
from pipelines.run import run_pipeline
from pipelines.schedulers import SCHEDULERS, make_scheduler
from pipelines.settings import DEFAULT_MASK_BLUR

GUIDANCE_STRIP = (1.0, 2.0, 4.0, 7.5)  # default guidance scales of the same-seed strip
MAX_STRIP = 6  # guidance strip images per request (each is a full run)
EXACT_DECODE_MAX_LATENT = 32 * 32  # latents up to this many positions: every side view is a real VAE decode
DECODE_CHUNK = 8  # latents per VAE decode call


# --- what a run leaves behind ------------------------------------------------------------------------------

@dataclass
class Explanation:
    """Everything recorded during one Explain run (first image of the batch; S steps, T prompt tokens)."""

    timesteps: np.ndarray  # (S,) t the U-Net got at each step
    sigmas: np.ndarray  # (S,) σ_t = sqrt((1 - ᾱ_t) / ᾱ_t): noise-to-signal ratio of z_t
    alpha_bars: np.ndarray  # (S,) ᾱ_t: share of signal power left in z_t
    latents: np.ndarray  # (S, 4, h, w) z_t as the U-Net saw it (variance-preserving scale)
    x0_latents: np.ndarray  # (S, 4, h, w) x̂0 predicted at each step
    x0_images: list[Image.Image]  # S decoded x̂0 at image size
    eps_cond: np.ndarray  # (S, 4, h, w) noise prediction with the prompt
    eps_uncond: np.ndarray | None  # (S, 4, h, w) with the negative / empty prompt; None without CFG (guidance <= 1)
    guidance: float
    x0_cond_images: list[Image.Image] = field(default_factory=list)  # x̂0 following the conditional ε only
    x0_uncond_images: list[Image.Image] = field(default_factory=list)  # ... the unconditional ε only
    exact_side_decodes: bool = True  # False: side views use the engine's linear latent->RGB preview
    final_latent: np.ndarray | None = None  # (4, h, w) z_0 after the last step (what the VAE decodes)
    tokens: list[str] = field(default_factory=list)  # the prompt's tokens (no start/end markers)
    attention: np.ndarray | None = None  # (S, T, h, w) cross-attention per token, heads and layers summed
    attention_layers: int = 0  # cross-attention layers summed per step
    strip: list[tuple[float, Image.Image]] = field(default_factory=list)  # (guidance, image), same seed
    flops: dict[str, Any] = field(default_factory=dict)  # see `flop_counts`
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage of this run
    schedule: dict[str, list[float]] = field(default_factory=dict)  # the training schedule: t, alpha_bar
    code: str = ""  # a diffusers script that reproduces the image
    latent_mask: np.ndarray | None = None  # (h, w) inpainting: the mask as the U-Net sees it (1 = repaint)
    image_mask: Image.Image | None = None  # inpainting: the binary mask at the working size
    input_image: Image.Image | None = None  # inpainting: the input at the working size

    @property
    def steps(self) -> int:
        return len(self.timesteps)


@dataclass
class ExplainResult(GenerationResult):
    explanation: Explanation | None = None


# --- probes on the shared modules ----------------------------------------------------------------------------

class _AttentionProbe:
    """Stands in for one cross-attention processor for one request: the original computes the output
    (so nothing changes), then the attention probabilities of the conditional batch item are recomputed
    and summed over heads into the probe's map for the current step.

    Like diffusers' own processors it receives whatever `Attention.forward` passes; processor-specific
    cross_attention_kwargs (IP-Adapter masks) are not used by this app.
    """

    def __init__(self, original, probe: "Probe"):
        self.original = original
        self.probe = probe

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if encoder_hidden_states is not None and self.probe.attention_enabled:
            self.probe.add_attention(attn, hidden_states, encoder_hidden_states)
        return out


class Probe:
    """Context manager: takes engine.lock, installs the probes on the shared U-Net, text encoder and VAE
    decoder, and removes every one of them on exit, whatever happened (error, Cancel)."""

    def __init__(self, engine, *, cfg: bool, attention: bool = True, keep_tokens: int | None = None, unet=None):
        self.engine = engine
        self.unet = (
            unet if unet is not None else engine.base.unet
        )  # the U-Net the run calls (an inpainting one may differ)
        self.keep_tokens = keep_tokens  # attention maps kept for token positions [0, keep_tokens): the prompt
        self.cfg = cfg  # the U-Net batch is [negative..., positive...]: the conditional item is the second half
        self.attention_enabled = attention
        self.unet_inputs: list[torch.Tensor] = []  # per call: (4, h, w) first item's latents
        self.unet_outputs: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # per call: (cond, uncond)
        self.unet_timesteps: list[float] = []
        self.attention: list[torch.Tensor] = []  # per call: (T, h, w)
        self.attention_layers = 0
        self.times: dict[str, float] = {"text_encoder": 0.0, "unet": 0.0, "vae_decode": 0.0}
        self.latent_hw: tuple[int, int] | None = None
        self.step_end_latents: list[torch.Tensor] = []  # filled by `capture` (run_pipeline's step-end callback)
        self._handles: list[Any] = []
        self._processors: list[tuple[Any, Any]] = []
        self._started: dict[str, float] = {}
        self._layers_this_call = 0

    # installing and removing
    def __enter__(self) -> "Probe":
        self.engine.lock.acquire()
        try:
            self._install()
        except BaseException:
            self._remove()
            self.engine.lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._remove()
        finally:
            self.engine.lock.release()

    def _install(self) -> None:
        base = self.engine.base
        unet = self.unet
        if self.attention_enabled:
            from diffusers.models.attention_processor import Attention

            for module in unet.modules():
                if isinstance(module, Attention) and module.is_cross_attention:
                    self._processors.append((module, module.processor))
                    module.set_processor(_AttentionProbe(module.processor, self))
        self._handles += [
            unet.register_forward_pre_hook(self._unet_pre, with_kwargs=True),
            unet.register_forward_hook(self._unet_post),
            base.text_encoder.register_forward_pre_hook(self._timer_start("text_encoder")),
            base.text_encoder.register_forward_hook(self._timer_stop("text_encoder")),
            base.vae.decoder.register_forward_pre_hook(self._timer_start("vae_decode")),
            base.vae.decoder.register_forward_hook(self._timer_stop("vae_decode", last_only=True)),
        ]

    def _remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        while self._processors:
            module, original = self._processors.pop()
            module.set_processor(original)

    # timing
    def _sync(self) -> None:
        if str(self.engine.device).startswith("cuda") and torch.cuda.is_available():
            torch.cuda.synchronize()

    def _timer_start(self, name: str):
        def hook(module, args):
            self._sync()
            self._started[name] = time.perf_counter()
        return hook

    def _timer_stop(self, name: str, *, last_only: bool = False):
        def hook(module, args, output):
            self._sync()
            elapsed = time.perf_counter() - self._started.pop(name, time.perf_counter())
            # The VAE decoder also runs for live previews; the pipeline's own decode is the last call.
            self.times[name] = elapsed if last_only else self.times[name] + elapsed
        return hook

    # the U-Net
    def _cond_index(self, batch: int) -> int:
        return batch // 2 if self.cfg and batch % 2 == 0 else 0

    def _unet_pre(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        self.unet_inputs.append(sample[0, :4].detach().float().cpu())  # 9-channel U-Nets: the latents come first
        t = timestep.flatten()[0] if torch.is_tensor(timestep) else timestep
        self.unet_timesteps.append(float(t))
        self.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))
        self.attention.append(None)
        self._layers_this_call = 0
        self._sync()
        self._started["unet"] = time.perf_counter()

    def _unet_post(self, module, args, output):
        self._sync()
        self.times["unet"] += time.perf_counter() - self._started.pop("unet", time.perf_counter())
        eps = output[0] if isinstance(output, (tuple, list)) else output.sample  # (B, 4, h, w)
        index = self._cond_index(eps.shape[0])
        cond = eps[index].detach().float().cpu()
        uncond = eps[0].detach().float().cpu() if index else None
        self.unet_outputs.append((cond, uncond))
        self.attention_layers = max(self.attention_layers, self._layers_this_call)

    # cross-attention
    @torch.no_grad()
    def add_attention(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> None:
        if self.latent_hw is None or not self.attention:
            return
        index = self._cond_index(hidden_states.shape[0])
        x = hidden_states[index:index + 1]  # (1, N, C)
        context = encoder_hidden_states[index:index + 1]  # (1, T, D)
        if x.ndim == 4:  # (1, C, H, W) -> (1, N, C)
            x = x.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.head_to_batch_dim(attn.to_q(x))  # (heads, N, d)
        key = attn.head_to_batch_dim(attn.to_k(context))  # (heads, T, d)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        probs = attn.get_attention_scores(query, key, None).float().sum(0)  # (N, T): heads summed
        lh, lw = _layer_size(self.latent_hw, probs.shape[0])
        probs = probs[:, :self.keep_tokens] if self.keep_tokens else probs
        maps = probs.T.reshape(1, -1, lh, lw)  # (1, T, lh, lw)
        maps = F.interpolate(maps, size=self.latent_hw, mode="bilinear", align_corners=False)[0]  # (T, h, w)
        current = self.attention[-1]
        self.attention[-1] = maps.cpu() if current is None else current + maps.cpu()
        self._layers_this_call += 1

    # run_pipeline's step-end callback
    def capture(self, pipe, i: int, t, callback_kwargs: dict) -> None:
        self.step_end_latents.append(callback_kwargs["latents"][0].detach().float().cpu())


def _layer_size(latent_hw: tuple[int, int], positions: int) -> tuple[int, int]:
    """(h, w) of a U-Net level with `positions` pixels: the latent size halved (rounding up, as stride-2
    convolutions with padding do) until it fits."""
    h, w = latent_hw
    while h * w > positions:
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != positions:
        raise RuntimeError(f"cannot place {positions} attention positions on a {latent_hw} latent")
    return h, w


# --- noise levels and x̂0 -----------------------------------------------------------------------------------

def _noise_levels(engine, scheduler_name: str, steps: int, timesteps: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(σ, ᾱ) per recorded U-Net call, from a reference scheduler set up like the request's own."""
    reference = make_scheduler(scheduler_name, engine.base.scheduler.config)
    reference.set_timesteps(steps, device="cpu")
    ref_t = np.asarray(reference.timesteps, dtype=np.float64)
    alphas_cumprod = np.asarray(reference.alphas_cumprod, dtype=np.float64)
    sigmas_ref = getattr(reference, "sigmas", None)
    sigmas_ref = None if sigmas_ref is None else np.asarray(sigmas_ref, dtype=np.float64)
    begin = int(np.argmin(np.abs(ref_t - timesteps[0]))) if timesteps else 0  # img2img/inpaint start later
    sigmas, alpha_bars = [], []
    for i, t in enumerate(timesteps):
        j = begin + i
        if sigmas_ref is not None and j < len(sigmas_ref) and abs(ref_t[min(j, len(ref_t) - 1)] - t) < 1e-3:
            sigma = float(sigmas_ref[j])
            alpha_bar = 1.0 / (1.0 + sigma**2)
        else:  # DDIM, LCM: the step uses alphas_cumprod[t] directly
            alpha_bar = float(np.interp(t, np.arange(len(alphas_cumprod)), alphas_cumprod))
            sigma = math.sqrt((1 - alpha_bar) / alpha_bar)
        sigmas.append(sigma)
        alpha_bars.append(alpha_bar)
    return np.asarray(sigmas, dtype=np.float32), np.asarray(alpha_bars, dtype=np.float32)


def predict_x0(z: torch.Tensor, model_output: torch.Tensor, alpha_bar, prediction_type: str) -> torch.Tensor:
    """The clean latent the model implies at this step (z_t = sqrt(ᾱ) x0 + sqrt(1 - ᾱ) ε); `alpha_bar` a float, or a
    tensor that broadcasts against z (one ᾱ per sample of a batch at mixed timesteps)."""
    a, s = alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5
    if prediction_type == "v_prediction":
        return a * z - s * model_output
    if prediction_type == "sample":
        return model_output
    return (z - s * model_output) / a


def noise_schedule(engine) -> dict[str, list[float]]:
    """The model's training noise schedule: t = 0..T-1 and ᾱ_t (alphas_cumprod)."""
    from diffusers import DDPMScheduler

    config = dict(engine.base.scheduler.config)
    reference = DDPMScheduler.from_config(config)
    alpha_bar = reference.alphas_cumprod.double().numpy()
    return {"t": list(range(len(alpha_bar))), "alpha_bar": [float(a) for a in alpha_bar]}


# --- decoding --------------------------------------------------------------------------------------------------

@torch.no_grad()
def _decode(engine, latents: torch.Tensor, *, exact: bool = True) -> list[Image.Image]:
    """(N, 4, h, w) -> N PIL images: a real VAE decode, or the engine's cheap linear preview."""
    if not len(latents):
        return []
    if not exact:
        return [engine.preview(z[None]) for z in latents]
    vae = engine.base.vae
    images = []
    for chunk in latents.split(DECODE_CHUNK):
        x = vae.decode(chunk.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample  # (n, 3, H, W)
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        images += [Image.fromarray(a) for a in x]
    return images


# --- FLOPs ---------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _flops(unet_config_json: str, vae_config_json: str, latent_hw: tuple[int, int], image_hw: tuple[int, int],
           text_len: int, latent_channels: int) -> dict[str, int]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    unet_config = json.loads(unet_config_json)
    cross = unet_config["cross_attention_dim"]
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross

    def unet_forward(channels: int, hw: tuple[int, int]) -> int:
        # Built on the meta device: shapes only, no memory, no weights; the count is exact for this config.
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(unet_config, in_channels=channels, out_channels=channels,
                                                    sample_size=hw[0])
            sample = torch.empty(1, channels, *hw)
            context = torch.empty(1, text_len, cross)
            t = torch.tensor([500])
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            unet(sample, t, encoder_hidden_states=context)
        return int(counter.get_total_flops())

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(json.loads(vae_config_json))
        z = torch.empty(1, latent_channels, *latent_hw)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vae.decode(z)
    return {"unet_latent": unet_forward(unet_config["in_channels"], latent_hw),
            "unet_pixel": unet_forward(3, image_hw), "vae_decode": int(counter.get_total_flops())}


def flop_counts(engine, *, width: int, height: int, steps: int, cfg: bool) -> dict[str, Any]:
    """FLOPs of one U-Net evaluation on the latent (this model) vs an identically configured U-Net with
    3 in/out channels on the image itself (a pixel-space diffusion model), and what a whole run costs."""
    f = engine.vae_scale_factor
    latent_hw, image_hw = (height // f, width // f), (height, width)
    unet_config = {k: v for k, v in dict(engine.base.unet.config).items() if not k.startswith("_")}
    vae_config = {k: v for k, v in dict(engine.base.vae.config).items() if not k.startswith("_")}
    counts = _flops(json.dumps(unet_config, sort_keys=True, default=str),
                    json.dumps(vae_config, sort_keys=True, default=str),
                    latent_hw, image_hw, int(engine.base.tokenizer.model_max_length),
                    int(engine.base.vae.config.latent_channels))
    evaluations = 2 if cfg else 1  # classifier-free guidance runs the U-Net on 2 items per step
    latent_run = steps * evaluations * counts["unet_latent"] + counts["vae_decode"]
    pixel_run = steps * evaluations * counts["unet_pixel"]
    return {
        **counts,
        "latent_size": list(latent_hw), "image_size": list(image_hw), "vae_scale_factor": f,
        "area_ratio": (image_hw[0] * image_hw[1]) / (latent_hw[0] * latent_hw[1]),
        "ratio": counts["unet_pixel"] / counts["unet_latent"],
        "evaluations_per_step": evaluations, "steps": steps,
        "latent_run": latent_run, "pixel_run": pixel_run, "run_ratio": pixel_run / latent_run,
    }


# --- the code that reproduces a run -----------------------------------------------------------------------------

def _model_reference(engine) -> str:
    base = engine.preset.base
    path = Path(base)
    if path.is_absolute():
        try:
            return str(path.resolve().relative_to(REPO_ROOT))  # the built-in model: relative to the repository
        except ValueError:
            return base
    return base


def code_snippet(engine, params: dict[str, Any]) -> str:
    """A standalone diffusers script that makes the same image as this app did with `params`."""
    cls, overrides = SCHEDULERS[params["scheduler"]]
    dtype = {torch.float16: "torch.float16", torch.bfloat16: "torch.bfloat16"}.get(engine.torch_dtype, "torch.float32")
    nine = txt2img.runs_as_inpainting(engine)
    pipeline_cls = "StableDiffusionInpaintPipeline" if nine else "StableDiffusionPipeline"
    args = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
    lines = [
        f"# Reproduces: {params['prompt']!r}, seed {params['seed']} "
        f"(Latent Diffusion Studio, model {engine.preset.name})",
        "import torch",
        f"from diffusers import {cls.__name__}, {pipeline_cls}",
        *(
            [
                "",
                f"torch.set_num_threads({int(engine.threads)})  # as the app ran: another thread count sums in another"
                " order, and some pixels can come out one level off",
            ]
            if str(engine.device) == "cpu"
            else []
        ),
        *(["from PIL import Image"] if nine else []),
        "",
        f"pipe = {pipeline_cls}.from_pretrained(",
        f"    {_model_reference(engine)!r}, torch_dtype={dtype}, use_safetensors=True,",
        "    safety_checker=None, requires_safety_checker=False,",
        ")",
    ]
    if engine.preset.lora:
        lines += [f"pipe.load_lora_weights({engine.preset.lora!r})", "pipe.fuse_lora()"]
    lines += [
        f"pipe.scheduler = {cls.__name__}.from_config(pipe.scheduler.config{', ' + args if args else ''})"
        f"  # {params['scheduler']}",
        f"pipe = pipe.to({str(engine.device)!r})",
        "",
        f"generator = torch.Generator('cpu').manual_seed({int(params['seed'])})"
        "  # CPU noise: the same on every device",
        "image = pipe(",
        f"    prompt={params['prompt']!r},",
        f"    negative_prompt={params.get('negative_prompt') or None!r},",
        f"    num_inference_steps={int(params['steps'])},",
        f"    guidance_scale={float(params['guidance'])!r},",
        f"    width={int(params['width'])}, height={int(params['height'])},",
        *(
            [
                f"    image=Image.new('RGB', ({int(params['width'])}, {int(params['height'])}), 'white'),",
                f"    mask_image=Image.new('L', ({int(params['width'])}, {int(params['height'])}), 255), "
                "strength=1.0,",
            ]
            if nine
            else []
        ),
        "    generator=[generator],",
        ").images[0]",
        "image.save('result.png')",
    ]
    return "\n".join(lines) + "\n"


# --- the runs --------------------------------------------------------------------------------------------------------

def _strip_scales(engine, guidance_strip) -> list[float]:
    scales = []
    for value in guidance_strip or ():
        value = check_float("guidance_strip", value, 0.0, engine.limits.max_guidance)
        if value not in scales:
            scales.append(value)
    if len(scales) > MAX_STRIP:
        raise InputError(f"guidance_strip has {len(scales)} scales, above the limit of {MAX_STRIP}")
    return sorted(scales)


def _uses_cfg(engine, guidance: float) -> bool:
    """diffusers' own rule: guidance > 1 and a U-Net without a guidance embedding (LCM)."""
    return guidance > 1 and engine.base.unet.config.get("time_cond_proj_dim") is None


def _tokens(engine, prompt: str) -> list[str]:
    """The prompt's tokens as the text encoder sees them, without start/end markers and padding."""
    tokenizer = engine.base.tokenizer
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    words = []
    for token_id in ids[1:]:  # position 0 is the start marker
        if token_id in special:
            break
        words.append(tokenizer.convert_ids_to_tokens(token_id).replace("</w>", ""))
    return words


def _progress(on_step, offset: int, total: int):
    """An on_step that counts all runs of a request as one progress bar."""
    if on_step is None:
        return None
    return lambda step, _total, preview=None: on_step(offset + step, total, preview)


def _record(engine, probe: Probe, *, scheduler: str, steps: int, guidance: float, cfg: bool) -> Explanation:
    """Turn what the probe saw into an Explanation (decodes x̂0 and the side views)."""
    prediction_type = engine.base.scheduler.config.get("prediction_type", "epsilon")
    sigmas, alpha_bars = _noise_levels(engine, scheduler, steps, probe.unet_timesteps)
    z = torch.stack(probe.unet_inputs)  # (S, 4, h, w)
    cond = torch.stack([c for c, _ in probe.unet_outputs])
    uncond = torch.stack([u for _, u in probe.unet_outputs]) if cfg else None
    guided = uncond + guidance * (cond - uncond) if cfg else cond
    x0, x0_cond, x0_uncond = [], [], []
    for i, alpha_bar in enumerate(alpha_bars.tolist()):
        x0.append(predict_x0(z[i], guided[i], alpha_bar, prediction_type))
        x0_cond.append(predict_x0(z[i], cond[i], alpha_bar, prediction_type))
        if cfg:
            x0_uncond.append(predict_x0(z[i], uncond[i], alpha_bar, prediction_type))
    x0 = torch.stack(x0)
    exact = z.shape[-1] * z.shape[-2] <= EXACT_DECODE_MAX_LATENT
    with engine.lock, torch.inference_mode():
        x0_images = _decode(engine, x0)
        x0_cond_images = _decode(engine, torch.stack(x0_cond), exact=exact)
        x0_uncond_images = _decode(engine, torch.stack(x0_uncond), exact=exact) if cfg else []
        engine.after_run()  # with --cpu-offload the decodes brought the VAE back to the GPU
    attention = None
    if probe.attention and all(a is not None for a in probe.attention):
        attention = torch.stack(probe.attention).numpy()  # (S, T_max, h, w)
    return Explanation(
        timesteps=np.asarray(probe.unet_timesteps, dtype=np.float32), sigmas=sigmas, alpha_bars=alpha_bars,
        latents=z.numpy(), x0_latents=x0.numpy(), x0_images=x0_images, eps_cond=cond.numpy(),
        eps_uncond=None if uncond is None else uncond.numpy(), guidance=guidance,
        x0_cond_images=x0_cond_images, x0_uncond_images=x0_uncond_images, exact_side_decodes=exact,
        attention=attention, attention_layers=probe.attention_layers,
    )


def explain(engine, *, prompt: str, negative_prompt: str = "", seed: int, steps: int, guidance: float,
            scheduler: str | None = None, width: int | None = None, height: int | None = None,
            guidance_strip=GUIDANCE_STRIP, attention: bool = True, on_step=None, cancel=None) -> ExplainResult:
    """One text-to-image run, watched: trajectory, cross-attention, CFG, schedule, FLOPs, timings, code.

    The image is bit-identical to `txt2img.generate` with the same settings (batch size 1).
    """
    # 1. Check inputs: txt2img's own validation, plus the strip's scales
    request = txt2img.txt2img_request(engine, prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps,
                                      guidance=guidance, scheduler=scheduler, width=width, height=height,
                                      batch_size=1)
    common = request.settings
    scales = _strip_scales(engine, guidance_strip)
    extra_runs = [s for s in scales if s != common["guidance"]]
    total = common["steps"] * (1 + len(extra_runs))
    cfg = _uses_cfg(engine, common["guidance"])
    tokens = _tokens(engine, common["prompt"])

    # 2. The run itself, with probes on the shared modules (all removed before the lock is released)
    started = time.perf_counter()
    with Probe(engine, cfg=cfg, attention=attention, keep_tokens=1 + len(tokens)) as probe:
        images = run_pipeline(engine, request, on_step=_progress(on_step, 0, total), cancel=cancel,
                              capture=probe.capture)
    wall = time.perf_counter() - started
    params = base_params(engine, "txt2img", request)

    # 3. What it saw
    explanation = _record(engine, probe, scheduler=common["scheduler"], steps=common["steps"],
                          guidance=common["guidance"], cfg=cfg)
    explanation.final_latent = probe.step_end_latents[-1].numpy() if probe.step_end_latents else None
    explanation.tokens = tokens
    if explanation.attention is not None:
        # positions 1..n: the prompt's words (0 is the start marker; the end marker and padding were not kept)
        explanation.attention = explanation.attention[:, 1:1 + len(tokens)]
    times = dict(probe.times)
    explanation.timings = {**times, "unet_per_step": times["unet"] / max(1, len(probe.unet_inputs)),
                           "total": wall, "other": max(0.0, wall - sum(times.values()))}

    # 4. The same seed at other guidance scales (plain runs, no probes)
    strip = {common["guidance"]: images[0]} if common["guidance"] in scales else {}
    for k, scale in enumerate(extra_runs):
        run = txt2img.generate(engine, **{**common, "guidance": scale}, width=request.width, height=request.height,
                               on_step=_progress(on_step, common["steps"] * (k + 1), total), cancel=cancel)
        strip[scale] = run.images[0]
    explanation.strip = sorted(strip.items())

    # 5. Cost, schedule and code (no model run)
    explanation.flops = flop_counts(engine, width=request.width, height=request.height, steps=common["steps"], cfg=cfg)
    explanation.schedule = noise_schedule(engine)
    explanation.code = code_snippet(engine, params)
    return ExplainResult(images=images, params=params, explanation=explanation)


def explain_inpaint(engine, *, image, mask, prompt: str, negative_prompt: str = "", seed: int, steps: int,
                    guidance: float, scheduler: str | None = None, strength: float = 1.0,
                    mask_blur: float = DEFAULT_MASK_BLUR, on_step=None, cancel=None) -> ExplainResult:
    """Inpainting in latent space, watched: the mask at latent size and, per step, what the U-Net saw
    (inside the mask: the image being denoised; outside: the input's latents noised to that step's level).

    The run is `inpaint.inpaint` itself (batch size 1), so the image equals the Inpaint tab's.
    """
    cfg = _uses_cfg(engine, float(guidance) if isinstance(guidance, (int, float)) else 0.0)
    unet = engine.task_unet("inpaint")  # a dedicated inpainting U-Net when the preset has one
    with Probe(engine, cfg=cfg, attention=False, unet=unet) as probe:
        result = inpaint_task.inpaint(engine, image=image, mask=mask, prompt=prompt, negative_prompt=negative_prompt,
                                      seed=seed, steps=steps, guidance=guidance, scheduler=scheduler,
                                      strength=strength, mask_blur=mask_blur, batch_size=1, on_step=on_step,
                                      cancel=cancel)
    params = result.params
    explanation = _record(engine, probe, scheduler=params["scheduler"], steps=params["steps"],
                          guidance=params["guidance"], cfg=cfg)
    times = dict(probe.times)
    explanation.timings = {**times, "unet_per_step": times["unet"] / max(1, len(probe.unet_inputs))}

    # The mask as the U-Net sees it: the pipeline's own mask processing, then nearest down to latent size.
    from diffusers.image_processor import VaeImageProcessor

    width, height, f = params["width"], params["height"], engine.vae_scale_factor
    binary = result.previews[0]
    work_mask = binary.resize((width, height), Image.NEAREST) if binary.size != (width, height) else binary
    processor = VaeImageProcessor(vae_scale_factor=f, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    mask_tensor = processor.preprocess(work_mask, height=height, width=width)  # (1, 1, H, W) in {0, 1}
    explanation.latent_mask = F.interpolate(mask_tensor, size=(height // f, width // f))[0, 0].numpy()
    explanation.image_mask = work_mask
    from pipelines import preprocess

    original = preprocess.load_image(image, max_pixels=engine.limits.max_image_pixels)
    if original.size != (width, height):
        original = original.resize((width, height), Image.LANCZOS)  # as run_inpaint does
    explanation.input_image = original
    return ExplainResult(images=result.images, params=params, previews=result.previews, explanation=explanation)


# --- intervene: prompt-to-prompt editing through the cross-attention ------------------------------------------------
#
# Prompt-to-prompt (Hertz et al., 2022): at the same seed, run the edited prompt with the cross-attention
# probabilities of the original prompt for the first tau of the steps (word swap), and/or with one word's
# probabilities scaled (re-weighting). The edit lives in `_EditProcessor`, set on the cross-attention modules of
# the shared U-Net for one request under engine.lock and removed before the lock is released (`_EditContext`),
# like the Probe: no other request ever runs through it.

DEFAULT_TAU = 0.6  # share of the steps with the original's attention injected (chosen by training.evaluate_p2p)
MAX_WEIGHT = 5.0  # a word's attention is scaled by at most this (0 removes it)
MAX_WEIGHTS = 8  # re-weighted words per request
SELF_INJECT_MAX_POSITIONS = 32 * 32  # self-attention maps copied in a swap only at levels up to this many positions


@dataclass
class InterventionRun:
    """One image of an intervention and the attention it used (summed over heads, layers and steps)."""

    label: str  # "original", "plain", "edited"
    prompt: str
    image: Image.Image
    tokens: list[str]
    attention: np.ndarray | None  # (T, h, w) per token of `prompt`
    params: dict[str, Any] = field(default_factory=dict)  # what makes this image again (its PNG's parameters)


@dataclass
class InterventionResult(GenerationResult):
    runs: list[InterventionRun] = field(default_factory=list)

    def image_params(self, i: int) -> dict[str, Any]:
        """All images share the seed: the plain ones restore into Text to image, the edited one carries its edit."""
        return self.runs[i].params


def _tokenizer_copy(engine):
    """A private copy of the model's tokenizer: encoding sets the fast tokenizer's shared padding/truncation
    state, and a model run may be encoding on another thread (pipelines.world.text)."""
    import copy

    return copy.deepcopy(engine.base.tokenizer)


def inspect_tokens(engine, prompt: str) -> dict[str, Any]:
    """How the text encoder reads `prompt`: its tokens in order, unknown words, and where the tokenizer's
    limit (CLIP: 77 positions, 75 for the prompt between its start and end markers) cuts it off."""
    from pipelines.common import check_text
    from pipelines.world import text as world_text

    prompt = check_text("prompt", prompt, engine.limits.max_prompt_chars)
    tokenizer = _tokenizer_copy(engine)
    encoded = tokenizer(prompt, truncation=False, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    limit = int(tokenizer.model_max_length)
    usable = limit - 2  # the start and end markers take two positions
    unknown_id = tokenizer.unk_token_id if world_text.is_word_level(tokenizer) else None
    tokens = []
    for i, (token_id, (begin, end)) in enumerate(zip(ids, offsets)):
        status = "cut" if i >= usable else ("unknown" if unknown_id is not None and token_id == unknown_id else "kept")
        text = tokenizer.convert_ids_to_tokens(token_id)
        tokens.append({"position": i + 1, "token": text.replace("</w>", ""), "id": int(token_id),
                       "text": prompt[begin:end], "status": status})
    cut_text = prompt[offsets[usable][0]:] if len(ids) > usable else ""
    return {"tokenizer": "word-level" if world_text.is_word_level(tokenizer) else "BPE",
            "limit": limit, "usable": usable, "count": len(ids), "tokens": tokens, "cut_text": cut_text,
            "unknown": engine.unknown_words(prompt)}


def parse_weights(weights: Any) -> dict[str, float]:
    """{word: scale} from a dict or text like "red=2, circle=0.5"; each scale within [0, MAX_WEIGHT]."""
    if weights is None or weights == "":
        return {}
    if isinstance(weights, str):
        pairs = {}
        for item in weights.split(","):
            if not item.strip():
                continue
            word, sep, value = item.partition("=")
            if not sep or not word.strip():
                raise InputError(f"weights item {item.strip()!r} is not word=scale (e.g. red=2)")
            try:
                pairs[word.strip()] = float(value)
            except ValueError:
                raise InputError(f"weights item {item.strip()!r}: {value.strip()!r} is not a number") from None
        weights = pairs
    if not isinstance(weights, dict):
        raise InputError(f"weights must be word=scale pairs, got {type(weights).__name__}")
    if len(weights) > MAX_WEIGHTS:
        raise InputError(f"weights names {len(weights)} words, above the limit of {MAX_WEIGHTS}")
    return {str(word).strip().lower(): check_float(f"weight of {word!r}", scale, 0.0, MAX_WEIGHT)
            for word, scale in weights.items()}


def _ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids as the pipeline encodes them: start marker, tokens, end marker (then padding)."""
    return tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]


def swap_mapper(tokenizer, source: str, target: str) -> torch.Tensor:
    """(L, L) matrix M over the text encoder's L positions with target_attention = source_attention @ M.

    The two prompts may differ in one stretch of words (the swap): positions before and after it map one to
    one, and the source's stretch is spread evenly over the target's (P2P's replacement mapper), so every row
    keeps its attention mass. Refused when the prompts are equal or one only adds words to the other.
    """
    length = int(tokenizer.model_max_length)
    src, tgt = _ids(tokenizer, source), _ids(tokenizer, target)
    prefix = 0
    while prefix < min(len(src), len(tgt)) and src[prefix] == tgt[prefix]:
        prefix += 1
    if src == tgt:
        raise InputError("target_prompt reads the same as the prompt to the text encoder: swap a word")
    suffix = 0
    while suffix < min(len(src), len(tgt)) - prefix and src[-1 - suffix] == tgt[-1 - suffix]:
        suffix += 1
    src_span = list(range(prefix, len(src) - suffix))
    tgt_span = list(range(prefix, len(tgt) - suffix))
    if not src_span or not tgt_span:
        raise InputError(f"target_prompt {target!r} adds or removes words of the prompt {source!r}; "
                         f"a swap replaces words (e.g. 'a red circle' -> 'a blue circle')")
    mapper = torch.zeros(length, length)
    for i in range(prefix):
        mapper[i, i] = 1.0
    for i in src_span:
        mapper[i, tgt_span] = 1.0 / len(tgt_span)
    for k in range(suffix):  # the end of both prompts, aligned from the end marker back
        mapper[len(src) - 1 - k, len(tgt) - 1 - k] = 1.0
    for k in range(length - len(src)):  # padding after the end marker, in order
        if len(tgt) + k < length:
            mapper[len(src) + k, len(tgt) + k] = 1.0
    return mapper


def weight_vector(tokenizer, prompt: str, weights: dict[str, float]) -> torch.Tensor:
    """(L,) scale per text position: each weighted word's tokens get its scale, everything else 1."""
    length = int(tokenizer.model_max_length)
    encoded = tokenizer(prompt, truncation=True, max_length=length, return_offsets_mapping=True)
    vector = torch.ones(length)
    found = set()
    for position, (begin, end) in enumerate(encoded["offset_mapping"]):
        if end <= begin:
            continue
        for word, scale in weights.items():
            for match in _word_spans(prompt, word):
                if begin < match[1] and end > match[0]:
                    vector[position] = scale
                    found.add(word)
    missing = [w for w in weights if w not in found]
    if missing:
        raise InputError(f"weights name {', '.join(map(repr, missing))}, not in the prompt {prompt!r}")
    return vector


def _word_spans(prompt: str, word: str) -> list[tuple[int, int]]:
    import re

    return [m.span() for m in re.finditer(rf"(?<![\w]){re.escape(word)}(?![\w])", prompt.lower())]


class _EditProcessor:
    """Cross-attention of one edit request, computed here (as diffusers' AttnProcessor does) so that the
    probabilities can be changed before they weigh the values; the edit itself is `_EditContext.change`."""

    def __init__(self, edit: "_EditContext", *, cross: bool):
        self.edit, self.cross = edit, cross

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B * heads, N, L)
        probs = self.edit.change(probs, batch_size, attn.heads, cross=self.cross)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _watch_only(module, args) -> None:
    """A hook that changes nothing: it marks a module as watched."""


class _EditContext:
    """Context manager: takes engine.lock, sets `_EditProcessor` on every cross-attention module of `unet`, and
    puts the original processors back on exit, whatever happened (error, Cancel), before releasing the lock.

    The U-Net batch is [unconditional..., conditional...] with classifier-free guidance, else [conditional...];
    with a swap each half holds [source, target], else [target]. Only the conditional target is changed (as in
    P2P): its probabilities become the source's mapped through `mapper` while step < tau_steps, and are then
    scaled per position by `weights` at every step. Its maps (heads, layers and steps summed) are recorded.
    """

    def __init__(self, engine, unet, *, cfg: bool, mapper: torch.Tensor | None, tau_steps: int,
                 weights: torch.Tensor | None, latent_hw: tuple[int, int], keep_tokens: int):
        self.engine, self.unet, self.cfg = engine, unet, cfg
        self.mapper, self.tau_steps, self.weights = mapper, tau_steps, weights
        self.latent_hw, self.keep_tokens = latent_hw, keep_tokens
        self.step = 0  # steps finished (run_pipeline's step-end callback advances it through `capture`)
        self.injected_steps: set[int] = set()
        self.maps: torch.Tensor | None = None  # (keep_tokens, h, w)
        self._processors: list[tuple[Any, Any]] = []
        self._hooks: list[Any] = []

    def __enter__(self) -> "_EditContext":
        from diffusers.models.attention_processor import Attention

        self.engine.lock.acquire()
        try:
            for module in self.unet.modules():
                if isinstance(module, Attention) and (module.is_cross_attention or self.mapper is not None):
                    self._processors.append((module, module.processor))
                    module.set_processor(_EditProcessor(self, cross=module.is_cross_attention))
            if self.mapper is not None and self.unet.config.get("addition_embed_type") == "text":
                # This U-Net also reads the prompt pooled into one vector added to the time embedding (the
                # built-in model): the source's for the same steps, or the swapped word moves the whole layout
                self._hooks.append(self.unet.add_embedding.register_forward_hook(self._pooled_text))
            # The original and plain images are decoded by the eager VAE (the Probe watches its decoder); the
            # edited one goes through the same decoder, so that the three differ by the edit alone and not by the
            # fast backend's ONNX decoder's rounding (pipelines/fast_backend.OnnxDecoder decodes watched VAEs eagerly)
            self._hooks.append(self.engine.base.vae.decoder.register_forward_pre_hook(_watch_only))
        except BaseException:
            self._restore()
            self.engine.lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._restore()
        finally:
            self.engine.lock.release()

    def _restore(self) -> None:
        while self._hooks:
            self._hooks.pop().remove()
        while self._processors:
            module, original = self._processors.pop()
            module.set_processor(original)

    def capture(self, pipe, i: int, t, callback_kwargs: dict) -> None:
        self.step = i + 1

    def _pooled_text(self, module, args, output: torch.Tensor) -> torch.Tensor:
        batch = output.shape[0]
        first = batch - 2 if self.cfg and batch == 4 else 0
        if self.step < self.tau_steps:
            output = output.clone()
            output[first + 1] = output[first]
        return output

    @torch.no_grad()
    def change(self, probs: torch.Tensor, batch: int, heads: int, *, cross: bool = True) -> torch.Tensor:
        images = 2 if self.mapper is not None else 1
        p = probs.view(batch, heads, probs.shape[1], probs.shape[2])
        first = batch - images if self.cfg and batch == 2 * images else 0  # the conditional items
        target = first + images - 1
        if not cross:
            # Self-attention (swaps only): the layout of the source as well, for the same steps, at the levels
            # small enough to copy (P2P's limit: 32x32 positions; SD1.5's 64x64 level would be 4096² per head)
            if self.step < self.tau_steps and p.shape[-1] <= SELF_INJECT_MAX_POSITIONS:
                p[target] = p[first]
            return probs
        if self.mapper is not None and self.step < self.tau_steps:
            p[target] = p[first] @ self.mapper.to(p.device, p.dtype)
            self.injected_steps.add(self.step)
        if self.weights is not None:
            p[target] = p[target] * self.weights.to(p.device, p.dtype)
        self._record(p[target].float().sum(0))
        return p.view(batch * heads, probs.shape[1], probs.shape[2])

    def _record(self, probs: torch.Tensor) -> None:
        lh, lw = _layer_size(self.latent_hw, probs.shape[0])
        maps = probs[:, :self.keep_tokens].T.reshape(1, -1, lh, lw)
        maps = F.interpolate(maps, size=self.latent_hw, mode="bilinear", align_corners=False)[0].cpu()
        self.maps = maps if self.maps is None else self.maps + maps


@dataclass(eq=False)
class _PairRequest:
    """A txt2img Request whose call makes two images from the same noise: the source prompt, then the target."""

    request: Any
    source_prompt: str

    def __getattr__(self, name):
        return getattr(self.request, name)

    def call_kwargs(self) -> dict[str, Any]:
        from pipelines.request import generators

        kwargs = self.request.call_kwargs()
        negative = kwargs.get("negative_prompt")
        kwargs.update(prompt=[self.source_prompt, self.request.prompt], num_images_per_prompt=1,
                      negative_prompt=None if negative is None else [negative, negative],
                      generator=generators(self.request.seed, 1) + generators(self.request.seed, 1))
        return kwargs


def _summed_maps(probe: Probe, tokens: list[str]) -> np.ndarray | None:
    if not probe.attention or any(a is None for a in probe.attention):
        return None
    return torch.stack(probe.attention).sum(0)[1:1 + len(tokens)].numpy()


def intervene(engine, *, prompt: str, target_prompt: str = "", tau: float = DEFAULT_TAU, weights: Any = None,
              negative_prompt: str = "", seed: int, steps: int, guidance: float, scheduler: str | None = None,
              width: int | None = None, height: int | None = None, plain: bool = True, on_step=None,
              cancel=None) -> InterventionResult:
    """Prompt-to-prompt at one seed: the original prompt, the target prompt made plainly, and the target made
    with the original's cross-attention for the first `tau` of the steps and the `weights` applied.

    Without a target prompt the edit is re-weighting alone (of the prompt itself). `images` are, in order:
    original, plain target (with a swap), edited; `runs` holds each with the attention it used. `plain=False`
    makes the edited image alone (the evaluation makes the plain ones once for several tau).
    """
    # 1. Check everything before taking the lock
    source = txt2img.txt2img_request(engine, prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps,
                                     guidance=guidance, scheduler=scheduler, width=width, height=height,
                                     batch_size=1)
    common = source.settings
    target_text = "" if target_prompt is None else target_prompt
    swap = bool(target_text.strip()) and target_text.strip() != common["prompt"].strip()
    target = txt2img.txt2img_request(engine, **{**common, "prompt": target_text if swap else common["prompt"]},
                                     width=source.width, height=source.height)
    tau = check_float("tau", tau, 0.0, 1.0)
    weights = parse_weights(weights)
    if not swap and not weights:
        raise InputError("nothing to change: give a target_prompt that swaps words of the prompt, or weights "
                         "(e.g. red=2)")
    tokenizer = _tokenizer_copy(engine)
    mapper = swap_mapper(tokenizer, common["prompt"], target.prompt) if swap else None
    vector = weight_vector(tokenizer, target.prompt, weights) if weights else None
    cfg = _uses_cfg(engine, common["guidance"])
    source_tokens, target_tokens = _tokens(engine, common["prompt"]), _tokens(engine, target.prompt)
    total = common["steps"] * ((3 if swap else 2) if plain else 1)
    f = engine.vae_scale_factor
    latent_hw = (source.height // f, source.width // f)
    unet = engine.task_unet(source.task)

    # 2. The original and (with a swap) the target made plainly, watched by the Probe: the very images txt2img makes
    runs = []
    watched = [("original", source, source_tokens)] + ([("plain", target, target_tokens)] if swap else [])
    for k, (label, request, tokens) in enumerate(watched if plain else []):
        with Probe(engine, cfg=cfg, keep_tokens=1 + len(tokens), unet=unet) as probe:
            image = run_pipeline(engine, request, on_step=_progress(on_step, k * common["steps"], total),
                                 cancel=cancel)[0]
        runs.append(InterventionRun(label, request.prompt, image, tokens, _summed_maps(probe, tokens),
                                    base_params(engine, "txt2img", request)))

    # 3. The edit: the processors are set for this one call and removed before the lock is released
    edited_request = txt2img.txt2img_request(engine, **{**common, "prompt": target.prompt}, width=source.width,
                                             height=source.height)
    with _EditContext(engine, unet, cfg=cfg, mapper=mapper, tau_steps=round(tau * common["steps"]),
                      weights=vector, latent_hw=latent_hw, keep_tokens=1 + len(target_tokens)) as edit:
        call = edited_request
        if swap:
            edited_request.adapters = engine.adapters.active_for([common["prompt"], target.prompt])
            call = _PairRequest(edited_request, common["prompt"])
        images = run_pipeline(engine, call, on_step=_progress(on_step, (total - common["steps"]), total),
                              cancel=cancel, capture=edit.capture)
    maps = None if edit.maps is None else edit.maps[1:1 + len(target_tokens)].numpy()
    params = {**base_params(engine, "intervene", edited_request),
              "source_prompt": common["prompt"] if swap else None, "tau": tau if swap else None,
              "weights": weights or None, "injected_steps": len(edit.injected_steps)}
    runs.append(InterventionRun("edited", target.prompt, images[-1], target_tokens, maps, params))
    return InterventionResult(images=[r.image for r in runs], params=params, runs=runs)
