"""Explain tab: watch latent diffusion happen (trajectory, cross-attention, guidance, latent inpainting,
noise schedule, cost, code). One Explain run records everything; the sliders then only re-render what was
recorded (no model work), so scrubbing is instant.

UI only: numpy + PIL render the recorded arrays; the model side is pipelines/explain.py (imported lazily).
"""
from __future__ import annotations

import math
from typing import Any

import gradio as gr
import numpy as np
import pandas as pd
from PIL import Image

from demo.common import UI_EVENT
from demo.fields import CheckboxGroup, Slider, example_files, open_image, safe_image, safe_image_editor
from demo.outputs import OutputPanel, output_panel, wire_cancellable, wire_model_event
from demo.running import run_task
from demo.settings_box import common_settings, resolve_seed, unknown_words_warning, wire_restore
from demo.studio import Studio
from demo.zerogpu import generation_seconds
from pipelines.settings import DEFAULT_MASK_BLUR

TAB = "explain"
INPAINT_TAB = "explain_inpaint"  # cancel key of the inpainting run
INTERVENE_TAB = "explain_intervene"  # cancel key of the prompt-to-prompt run
GUIDANCE_CHOICES = [1.0, 2.0, 4.0, 7.5, 12.0]
GUIDANCE_DEFAULT = [1.0, 2.0, 4.0, 7.5]
CHANNEL_PX = 96  # each latent channel is drawn at least this big (nearest-neighbour: one block per latent)
IMAGE_PX = 192  # small images are enlarged to at least this (nearest-neighbour)
VIEW_PX = 220  # height of the image views
OVERLAY_ALPHA = 0.55  # attention heat over the image
SCHEDULE_STRIDE = 5  # plot every 5th training timestep
STRENGTH_DEFAULT = 0.6

# perceptual colour maps as a few anchors (interpolated): viridis for values, inferno for heat, blue-white-red
VIRIDIS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
INFERNO = [(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)]
DIVERGING = [(59, 76, 192), (141, 176, 254), (240, 240, 240), (244, 154, 123), (180, 4, 38)]

INTRO = """**Watch the latent diffusion happen.** *Explain* runs one text-to-image request on the shared model and
records what happens inside: the latent at every denoising step and the clean image the U-Net predicts from it,
which prompt words each region attends to, how classifier-free guidance mixes two noise predictions, what it
costs in latent vs pixel space, and the code to reproduce it. The image is exactly what *Text to image* makes
with the same settings."""


# --- rendering (numpy -> PIL) ---------------------------------------------------------------------------------

def colormap(values: np.ndarray, anchors=VIRIDIS) -> np.ndarray:
    """values in [0, 1], any shape -> uint8 RGB (..., 3)."""
    values = np.clip(np.nan_to_num(values), 0.0, 1.0)
    points = np.linspace(0.0, 1.0, len(anchors))
    table = np.asarray(anchors, dtype=np.float64)
    rgb = np.stack([np.interp(values, points, table[:, c]) for c in range(3)], axis=-1)
    return rgb.round().astype(np.uint8)


def enlarge(image: Image.Image, min_px: int = IMAGE_PX) -> Image.Image:
    """Nearest-neighbour enlargement by a whole factor so the short side is at least min_px."""
    factor = max(1, math.ceil(min_px / max(1, min(image.size))))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image


def _tile(blocks: list[np.ndarray], gap: int = 4, columns: int | None = None) -> Image.Image:
    """Equal-sized RGB blocks (h, w, 3) on white: side by side, or in rows of `columns`."""
    columns = columns or len(blocks)
    rows = math.ceil(len(blocks) / columns)
    h, w = blocks[0].shape[:2]
    canvas = np.full((rows * h + gap * (rows - 1), columns * w + gap * (columns - 1), 3), 255, dtype=np.uint8)
    for i, block in enumerate(blocks):
        y, x = (i // columns) * (h + gap), (i % columns) * (w + gap)
        canvas[y:y + h, x:x + w] = block
    return Image.fromarray(canvas)


def _blocks(rgb: np.ndarray) -> np.ndarray:
    """(h, w, 3) -> enlarged by a whole factor to at least CHANNEL_PX (one block per latent position)."""
    factor = max(1, math.ceil(CHANNEL_PX / max(1, min(rgb.shape[:2]))))
    return rgb.repeat(factor, axis=0).repeat(factor, axis=1)


def _outline(rgb: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Mark latent positions outside the mask with a darker tint (the inpainting view)."""
    if mask is None:
        return rgb
    keep = mask < 0.5
    out = rgb.astype(np.float32)
    out[keep] = out[keep] * 0.45 + 255 * 0.1
    return out.round().astype(np.uint8)


def latent_channels(latent: np.ndarray, *, mask: np.ndarray | None = None) -> Image.Image:
    """(C, h, w) -> the C channels side by side, each normalised to its own min..max (viridis)."""
    blocks = []
    for channel in np.asarray(latent, dtype=np.float64):
        low, high = channel.min(), channel.max()
        scaled = (channel - low) / (high - low) if high > low else np.zeros_like(channel)
        blocks.append(_blocks(_outline(colormap(scaled), mask)))
    return _tile(blocks)


def signed_channels(values: np.ndarray, limits: np.ndarray) -> Image.Image:
    """(C, h, w) signed -> channels in a 2-column grid, blue < 0 < red, each channel scaled by its own limit."""
    blocks = []
    for channel, limit in zip(np.asarray(values, dtype=np.float64), limits):
        scaled = 0.5 + 0.5 * channel / limit if limit > 0 else np.full_like(channel, 0.5)
        blocks.append(_blocks(colormap(scaled, DIVERGING)))
    return _tile(blocks, columns=2)


def _abs_limits(*arrays: np.ndarray) -> np.ndarray:
    """Per-channel max |value| over several (C, h, w) arrays: one colour scale for all of them."""
    return np.max([np.abs(a).reshape(a.shape[0], -1).max(axis=1) for a in arrays], axis=0)


def view_image(label: str, name: str, scale: int | None = None):
    """A read-only, pixelated, fixed-height picture of one part of the last run (every view in this tab)."""
    return gr.Image(label=label, interactive=False, format="png", height=VIEW_PX, scale=scale,
                    elem_id=f"{TAB}-{name}", elem_classes=["lds-pixelated"])


def overlay(image: Image.Image, heat: np.ndarray) -> Image.Image:
    """An attention map (h, w) in [0, 1] over the image, both enlarged to at least IMAGE_PX."""
    base = enlarge(image.convert("RGB"))
    heat_image = Image.fromarray((np.clip(heat, 0, 1) * 255).astype(np.uint8)).resize(base.size, Image.BILINEAR)
    colours = colormap(np.asarray(heat_image, dtype=np.float64) / 255.0, INFERNO).astype(np.float32)
    mixed = np.asarray(base, dtype=np.float32) * (1 - OVERLAY_ALPHA) + colours * OVERLAY_ALPHA
    return Image.fromarray(mixed.round().astype(np.uint8))


def attention_maps(data: dict, start: int, end: int) -> list[tuple[Image.Image, str]]:
    """Per-token overlays, attention summed over heads, layers and steps start..end (1-based, inclusive)."""
    e = data["explanation"]
    if e.attention is None or not e.tokens:
        return []
    steps = e.attention.shape[0]
    start, end = sorted((int(start), int(end)))
    start, end = max(1, min(start, steps)), max(1, min(end, steps))
    summed = e.attention[start - 1:end].sum(axis=0)  # (T, h, w)
    mass = summed.reshape(len(summed), -1).sum(axis=1)
    share = mass / mass.sum() if mass.sum() > 0 else mass
    items = []
    for i, (token, heat) in enumerate(zip(e.tokens, summed)):
        low, high = float(heat.min()), float(heat.max())
        contrast = high / low if low > 0 else float("inf")
        # stretched to the word's own min..max: where it attends *more*; the contrast says how much more
        heat = (heat - low) / (high - low) if high > low else np.zeros_like(heat)
        items.append((overlay(data["image"], heat), f"{token} · {share[i]:.0%} · ×{contrast:.1f}"))
    return items


# --- the views of one recorded run --------------------------------------------------------------------------------

def _step_index(data: dict, step) -> int:
    steps = data["explanation"].steps
    return max(0, min(int(step or steps), steps) - 1)


def noise_line(e, i: int) -> str:
    a = float(e.alpha_bars[i])
    return (f"**Step {i + 1} of {e.steps}** · t = {e.timesteps[i]:.0f} · σ = {e.sigmas[i]:.3g} · ᾱ = {a:.4f}  \n"
            f"z_t = {math.sqrt(a):.3f} · x0 + {math.sqrt(1 - a):.3f} · ε — the U-Net sees this latent "
            f"(left, 4 channels) and predicts the noise ε̂ in it (directly, or through v = √ᾱ·ε − √(1−ᾱ)·x0 for a "
            f"v-prediction model such as the built-in one); removing that noise gives x̂0 (right, decoded "
            f"by the VAE): (z_t − {math.sqrt(1 - a):.3f}·ε̂) / {math.sqrt(a):.3f}.")


def trajectory_view(data: dict | None, step) -> tuple:
    if not data:
        return None, None, ""
    e = data["explanation"]
    i = _step_index(data, step)
    return latent_channels(e.latents[i]), enlarge(e.x0_images[i]), noise_line(e, i)


def filmstrip(data: dict) -> list[tuple[Image.Image, str]]:
    e = data["explanation"]
    return [(image, f"{i + 1} · σ {e.sigmas[i]:.2g}") for i, image in enumerate(e.x0_images)]


def guidance_view(data: dict | None, step) -> tuple:
    """(ε uncond, ε cond, difference, x̂0 uncond, x̂0 cond, x̂0 guided, text) at one step."""
    if not data:
        return (None,) * 6 + ("",)
    e = data["explanation"]
    i = _step_index(data, step)
    guided_x0 = enlarge(e.x0_images[i])
    cond_x0 = enlarge(e.x0_cond_images[i]) if e.x0_cond_images else None
    if e.eps_uncond is None:
        text = (f"Guidance {e.guidance:g} ≤ 1: diffusers skips classifier-free guidance, so the U-Net ran once per "
                f"step on the prompt alone and there is no unconditional prediction to compare.")
        return None, signed_channels(e.eps_cond[i], _abs_limits(e.eps_cond[i])), None, None, cond_x0, guided_x0, text
    uncond, cond = e.eps_uncond[i], e.eps_cond[i]
    diff = cond - uncond
    limits = _abs_limits(uncond, cond)
    share = float(np.linalg.norm(diff) / max(1e-12, np.linalg.norm(cond)))
    text = (f"**Step {i + 1}** · ε̂ = ε̂_uncond + {e.guidance:g} · (ε̂_cond − ε̂_uncond). The two predictions differ "
            f"by {share:.1%} of |ε̂_cond|; guidance multiplies that difference by {e.guidance:g}. "
            f"Blue < 0 < red, each channel on its own scale (the difference on a finer one).")
    uncond_x0 = enlarge(e.x0_uncond_images[i]) if e.x0_uncond_images else None
    return (signed_channels(uncond, limits), signed_channels(cond, limits), signed_channels(diff, _abs_limits(diff)),
            uncond_x0, cond_x0, guided_x0, text)


def strip_gallery(data: dict) -> list[tuple[Image.Image, str]]:
    e = data["explanation"]
    seed = data["params"].get("seed")
    return [(enlarge(image), f"guidance {scale:g} · seed {seed}") for scale, image in e.strip]


def schedule_frame(schedule: dict, timesteps=None, alpha_bars=None, strength: float = STRENGTH_DEFAULT) -> tuple:
    """(DataFrame for the schedule plot, markdown on the img2img cut-off)."""
    t = np.asarray(schedule["t"], dtype=np.float64)
    a = np.asarray(schedule["alpha_bar"], dtype=np.float64)
    keep = slice(None, None, SCHEDULE_STRIDE)
    rows = [pd.DataFrame({"t": t[keep], "value": a[keep], "curve": "ᾱ_t (signal power kept)"}),
            pd.DataFrame({"t": t[keep], "value": np.sqrt(1 - a[keep]), "curve": "√(1−ᾱ_t) (noise std)"})]
    strength = float(strength)
    if timesteps is not None and len(timesteps):
        steps = len(timesteps)
        run = min(int(steps * strength), steps)  # the img2img pipeline's own rule
        start = steps - run
        if run == 0:
            text = f"img2img at strength {strength:g} with {steps} steps runs no step: the input comes back unchanged."
        else:
            t_cut, a_cut = float(timesteps[start]), float(alpha_bars[start])
            text = (f"**img2img at strength {strength:g}** with this run's {steps} steps skips the first {start} and "
                    f"runs {run}: the input's latent is noised to t = {t_cut:.0f} (ᾱ = {a_cut:.3f}), keeping "
                    f"{math.sqrt(a_cut):.2f} of its signal under noise of std {math.sqrt(1 - a_cut):.2f}; higher "
                    f"strength starts further right, from less of the input.")
    else:
        t_cut = strength * (len(t) - 1)
        text = f"img2img at strength {strength:g} starts near t ≈ {t_cut:.0f} (run *Explain* for the exact step)."
    if strength > 0 and (timesteps is None or min(int(len(timesteps) * strength), len(timesteps)) > 0):
        rows.append(pd.DataFrame({"t": [t_cut, t_cut], "value": [0.0, 1.0],
                                  "curve": f"img2img start (strength {strength:g})"}))
    return pd.concat(rows, ignore_index=True), text


def run_noise_frame(data: dict) -> pd.DataFrame:
    e = data["explanation"]
    step = np.arange(1, e.steps + 1)
    a = e.alpha_bars.astype(np.float64)
    return pd.concat([pd.DataFrame({"step": step, "value": np.sqrt(a), "curve": "√ᾱ (signal scale of z_t)"}),
                      pd.DataFrame({"step": step, "value": np.sqrt(1 - a), "curve": "√(1−ᾱ) (noise scale of z_t)"})],
                     ignore_index=True)


def _flops(value: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if value >= size:
            return f"{value / size:.3g} {unit}FLOP"
    return f"{value:.3g} FLOP"


def _seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def cost_markdown(data: dict) -> str:
    e = data["explanation"]
    f, t = e.flops, e.timings
    h, w = f["latent_size"]
    H, W = f["image_size"]
    n = f["evaluations_per_step"]
    cfg = " (×2: classifier-free guidance runs the U-Net on the prompt and the negative prompt)" if n == 2 else ""
    estimate = t["unet"] * f["ratio"] if t.get("unet") else None
    lines = [
        "| | latent space (this model) | pixel space (same U-Net, 3 channels) |",
        "|---|---|---|",
        f"| U-Net input | 4 × {h} × {w} = {4 * h * w:,} numbers | 3 × {H} × {W} = {3 * H * W:,} numbers |",
        f"| one U-Net evaluation | {_flops(f['unet_latent'])} | {_flops(f['unet_pixel'])} |",
        f"| one denoising step{' (×2)' if n == 2 else ''} | {_flops(n * f['unet_latent'])} "
        f"| {_flops(n * f['unet_pixel'])} |",
        f"| whole run ({f['steps']} steps{', + one VAE decode' if f.get('vae_decode') else ''}) | "
        f"{_flops(f['latent_run'])} | {_flops(f['pixel_run'])} |",
        "",
        f"Per step the pixel-space U-Net needs **{f['ratio']:.1f}×** the FLOPs: the image has f² = "
        f"{f['vae_scale_factor']}² = {f['area_ratio']:.0f}× the positions of the latent, and self-attention grows "
        f"with the square of the positions{cfg}. Over the whole run, with the VAE decode paid once, latent "
        f"diffusion is **{f['run_ratio']:.1f}×** cheaper; the decode alone costs "
        f"{f['vae_decode'] / f['unet_latent']:.0f} latent U-Net evaluations. (Counted with torch's FlopCounterMode "
        f"on meta-device copies of the U-Net and VAE decoder; 1 multiply-add = 2 FLOP.)",
        "",
        f"**Time of this run** on {data['device']}: text encoder {_seconds(t['text_encoder'])} · U-Net "
        f"{_seconds(t['unet'])} ({f['steps']} steps, {_seconds(t['unet_per_step'])} each) · VAE decode "
        f"{_seconds(t['vae_decode'])} · everything else (scheduler, previews, callbacks) {_seconds(t['other'])} · "
        f"total {_seconds(t['total'])}.",
    ]
    if estimate:
        lines.append(f"At the same FLOP rate, pixel-space U-Net steps would take about {_seconds(estimate)}.")
    return "\n".join(lines)


# --- inpainting in latent space ----------------------------------------------------------------------------------

def inpaint_masks(data: dict) -> tuple[Image.Image, Image.Image]:
    e = data["explanation"]
    latent_mask = Image.fromarray((e.latent_mask * 255).astype(np.uint8))
    image_mask = e.image_mask.convert("L")
    # the input with the mask tinted, and the mask the U-Net uses (one block per latent position)
    tinted = np.asarray(e.input_image.convert("RGB"), dtype=np.float32)
    m = np.asarray(image_mask, dtype=np.float32)[..., None] / 255.0
    tinted = tinted * (1 - 0.5 * m) + np.array([255, 0, 255], dtype=np.float32) * 0.5 * m
    return enlarge(Image.fromarray(tinted.round().astype(np.uint8))), _tile([_blocks(np.repeat(
        np.asarray(latent_mask)[..., None], 3, axis=2))])


def inpaint_step_view(data: dict | None, step) -> tuple:
    if not data:
        return None, None, ""
    e = data["explanation"]
    i = _step_index(data, step)
    a = float(e.alpha_bars[i])
    head = f"**Step {i + 1} of {e.steps}** · t = {e.timesteps[i]:.0f} · ᾱ = {a:.4f}. "
    if data.get("params", {}).get("inpaint_unet") == "9-channel":
        text = head + (
            "Left: the latent being denoised (dimmed = outside the mask), the first 4 of the 9 channels the "
            "inpainting U-Net sees; the other 5 are the mask at latent size and the latents of the input with "
            "the masked area greyed out, the same at every step, so the U-Net sees the picture around the hole. "
            "Nothing is put back between steps; the input's pixels return only outside the mask after decoding. "
            "Right: x̂0, the clean image predicted at this step."
        )
    else:
        text = head + (
            f"Left: the latent the U-Net sees (dimmed = outside the mask). Outside the mask it is the input's "
            f"own latent noised to this step's level ({math.sqrt(a):.2f}·z_input + {math.sqrt(1 - a):.2f}·ε), "
            f"put back after every step (latent blending); inside it is the image being denoised. Right: x̂0, "
            f"the clean image predicted at this step."
        )
    return latent_channels(e.latents[i], mask=e.latent_mask), enlarge(e.x0_images[i]), text


# --- the tab ---------------------------------------------------------------------------------------------------------

# The views /explain returns after the four values every generating endpoint returns, in this order.
EXPLAIN_VIEWS = (
    "step", "latent", "x0", "noise_level", "x0_per_step",  # 1. trajectory
    "attention_from", "attention_to", "attention_per_word",  # 2. cross-attention
    "cfg_step", "eps_uncond", "eps_cond", "eps_difference", "x0_uncond", "x0_cond", "x0_guided", "cfg_text",
    "guidance_strip",  # 3. classifier-free guidance
    "schedule_plot", "run_noise_plot", "img2img_cutoff",  # 4. noise schedule
    "cost", "code",  # 5, 6
)
EXPLAIN_OUTPUTS = ("preview", "gallery", "params", "status", *EXPLAIN_VIEWS)  # what /explain returns
EXPLAIN_INPAINT_OUTPUTS = ("status", "mask_image", "mask_latent", "result", "step", "latent", "x0", "step_text")
EXPLAIN_INTERVENE_OUTPUTS = ("status", "images", "attention", "params")  # what /explain_intervene returns
EXPLAIN_TOKENS_OUTPUTS = ("tokens", "summary")  # what /explain_tokens returns


def build_tab(engine, *, studio: Studio | None = None) -> None:
    from pipelines import explain as explain_task  # imports torch: when the tab is built, never with the UI

    studio = studio or Studio()
    schedule = explain_task.noise_schedule(engine)
    gr.Markdown(INTRO)
    inputs, panel = _inputs_and_panel(engine, studio)
    state = gr.State(None)  # the last run's recording: the sliders re-render it
    views = {**_trajectory_section(engine), **_attention_section(engine), **_guidance_section(engine),
             **_schedule_section(schedule), **_cost_and_code_section()}
    inpaint = _inpaint_section(engine)
    intervene = _intervene_section(engine, explain_task.DEFAULT_TAU, explain_task.MAX_WEIGHT)
    _wire_explain(engine, studio, explain_task, inputs, panel, views, state)
    _wire_scrubbing(schedule, views, state)
    _wire_explain_inpaint(engine, studio, explain_task, inputs, inpaint)
    _wire_intervene(engine, studio, explain_task, inputs, intervene)


def _steps_slider(engine, name: str, label: str, *, at_end: bool) -> gr.Slider:
    """A step slider over the model's default steps (each run sets its own range)."""
    steps = max(1, engine.preset.default_steps)
    return Slider(label=label, minimum=1, maximum=steps, step=1, value=steps if at_end else 1,
                         elem_id=f"{TAB}-{name}")


def _inputs_and_panel(engine, studio: Studio) -> tuple[dict, OutputPanel]:
    preset = engine.preset
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            prompt = gr.Textbox(value=preset.example_prompts[0] if preset.example_prompts else "", label="Prompt",
                                lines=2, max_length=engine.limits.max_prompt_chars, elem_id=f"{TAB}-prompt")
            unknown_words_warning(engine, prompt)
            strip_scales = CheckboxGroup(
                label="Guidance strip: the same seed at these guidance scales (each is one more run)",
                choices=[c for c in GUIDANCE_CHOICES if c <= engine.limits.max_guidance],
                value=[c for c in GUIDANCE_DEFAULT if c <= engine.limits.max_guidance], elem_id=f"{TAB}-strip-scales")
            settings = common_settings(engine, tab=TAB, size=True)
            settings.batch_size.visible = False  # Explain follows one image
        with gr.Column(scale=3):
            panel = output_panel(TAB, studio, generate_label="Explain")
    return dict(prompt=prompt, strip_scales=strip_scales, settings=settings), panel


def _trajectory_section(engine) -> dict:
    gr.Markdown("## 1 · Denoising trajectory\nDrag the step: the noisy latent z_t (its 4 channels, each scaled "
                "to its own range) and the clean image x̂0 the U-Net predicts from it at that step.")
    step = _steps_slider(engine, "step", "Step", at_end=True)
    with gr.Row(equal_height=False):
        latent = view_image("z_t: the latent's 4 channels", "latent", scale=2)
        x0 = view_image("x̂0 decoded by the VAE", "x0", scale=1)
    noise = gr.Markdown("", label="Noise level at this step", elem_id=f"{TAB}-noise")
    film = gr.Gallery(label="x̂0 at every step (step · σ)", columns=10, height=300, format="png", object_fit="contain",
                      interactive=False, elem_id=f"{TAB}-filmstrip", elem_classes=["lds-gallery", "lds-pixelated"])
    return dict(step=step, latent=latent, x0=x0, noise_level=noise, x0_per_step=film)


def _attention_section(engine) -> dict:
    gr.Markdown("## 2 · Cross-attention per word\nWhere each prompt word's cross-attention lands (DAAM-style: "
                "summed over heads, U-Net layers and the chosen steps, upsampled to the latent and laid over the "
                "result). Each map is stretched to its own range (bright = where this word gets the most "
                "attention); the caption gives the word's share of the attention given to the prompt's words and "
                "how much stronger its brightest spot is than its darkest (max/min).")
    with gr.Row():
        attention_from = _steps_slider(engine, "attention-from", "From step", at_end=False)
        attention_to = _steps_slider(engine, "attention-to", "To step", at_end=True)
    attention = gr.Gallery(label="Attention per word (word · share · max/min)", columns=8, height=240,
                           fit_columns=False, format="png", object_fit="contain", interactive=False,
                           elem_id=f"{TAB}-attention", elem_classes=["lds-gallery", "lds-pixelated"])
    return dict(attention_from=attention_from, attention_to=attention_to, attention_per_word=attention)


def _guidance_section(engine) -> dict:
    gr.Markdown("## 3 · Classifier-free guidance\nAt every step the U-Net predicts the noise twice, with the "
                "prompt (conditional) and with the negative/empty prompt (unconditional); guidance pushes the "
                "prediction along their difference.")
    views = dict(cfg_step=_steps_slider(engine, "cfg-step", "Step", at_end=False))
    with gr.Row(equal_height=False):
        views.update(eps_uncond=view_image("ε̂ unconditional", "eps-uncond"),
                     eps_cond=view_image("ε̂ conditional (prompt)", "eps-cond"),
                     eps_difference=view_image("ε̂_cond − ε̂_uncond", "eps-diff"))
    with gr.Row(equal_height=False):
        views.update(x0_uncond=view_image("x̂0 from ε̂ unconditional", "x0-uncond"),
                     x0_cond=view_image("x̂0 from ε̂ conditional", "x0-cond"),
                     x0_guided=view_image("x̂0 from the guided ε̂", "x0-guided"))
    views["cfg_text"] = gr.Markdown("", label="Guidance at this step", elem_id=f"{TAB}-cfg-text")
    views["guidance_strip"] = gr.Gallery(label="Same seed, different guidance", columns=6, height=260,
                                         fit_columns=False, format="png", object_fit="contain", interactive=False,
                                         elem_id=f"{TAB}-strip", elem_classes=["lds-gallery", "lds-pixelated"])
    return views


def _schedule_section(schedule: dict) -> dict:
    gr.Markdown("## 4 · Noise schedule\nHow much of the clean latent survives at each training timestep t "
                "(z_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε), and where img2img (style transfer) starts for a given strength.")
    initial_frame, initial_text = schedule_frame(schedule)
    strength = Slider(label="img2img strength", minimum=0.0, maximum=1.0, step=0.05, value=STRENGTH_DEFAULT,
                             elem_id=f"{TAB}-strength")
    with gr.Row(equal_height=False):
        schedule_plot = gr.LinePlot(initial_frame, x="t", y="value", color="curve", title="Training noise schedule",
                                    x_title="timestep t", y_title="", y_lim=[0, 1], height=300,
                                    elem_id=f"{TAB}-schedule")
        run_plot = gr.LinePlot(None, x="step", y="value", color="curve", title="This run: signal vs noise per step",
                               x_title="denoising step", y_title="", y_lim=[0, 1], height=300,
                               elem_id=f"{TAB}-run-noise")
    cutoff = gr.Markdown(initial_text, label="img2img cut-off", elem_id=f"{TAB}-cutoff")
    return dict(strength=strength, schedule_plot=schedule_plot, run_noise_plot=run_plot, img2img_cutoff=cutoff)


def _cost_and_code_section() -> dict:
    gr.Markdown("## 5 · Cost: latent vs pixel space")
    cost = gr.Markdown("Run *Explain* to count and time it.", label="Cost", elem_id=f"{TAB}-cost")
    gr.Markdown("## 6 · Code")
    show_code = gr.Button("Code", elem_id=f"{TAB}-code-button", size="sm")
    code = gr.Code(value="", language="python", label="diffusers code that reproduces this result", lines=8,
                   interactive=False, visible=False, elem_id=f"{TAB}-code")
    return dict(cost=cost, show_code=show_code, code=code)


def _inpaint_section(engine) -> dict:
    preset, max_pixels = engine.preset, engine.limits.max_image_pixels
    gr.Markdown("## 7 · Inpainting in latent space\nThe model never sees your mask at full size: it is shrunk to "
                f"the latent grid (f = {engine.vae_scale_factor}), and after every step the latents outside it "
                "are replaced by the input's own latents, noised to that step's level. Uses the prompt and "
                "settings above.")
    ui: dict[str, Any] = {}
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            ui["editor"] = safe_image_editor(
                label="Image: paint over the area to repaint", type="pil", image_mode="RGBA", format="png",
                sources=("upload", "clipboard"), transforms=(), height=320,
                canvas_size=(preset.default_size, preset.default_size),
                brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed", default_size=6),
                eraser=gr.Eraser(default_size=6),
                layers=gr.LayerOptions(allow_additional_layers=False, layers=["Mask"]),
                elem_id=f"{TAB}-inpaint-editor", elem_classes=["lds-pixelated"], max_pixels=max_pixels)
            with gr.Accordion("Upload a mask instead of painting", open=False):
                ui["mask"] = safe_image(label="Mask: white = repaint", type="pil", image_mode=None,
                                               format="png", height=160, sources=("upload",),
                                               elem_id=f"{TAB}-inpaint-mask", elem_classes=["lds-pixelated"],
                                               max_pixels=max_pixels)
            ui["prompt"] = gr.Textbox(value="", label="Prompt for the masked area (empty: the prompt above)",
                                      max_length=engine.limits.max_prompt_chars, elem_id=f"{TAB}-inpaint-prompt")
            ui["strength"] = Slider(label="Strength", minimum=0.05, maximum=1.0, step=0.05, value=1.0,
                                           elem_id=f"{TAB}-inpaint-strength")
            with gr.Row():
                ui["run"] = gr.Button("Explain inpainting", variant="primary", elem_id=f"{TAB}-inpaint-run", scale=3)
                ui["cancel"] = gr.Button("Cancel", variant="stop", elem_id=f"{TAB}-inpaint-cancel", scale=1)
            ui["status"] = gr.Markdown("", label="Status", elem_id=f"{TAB}-inpaint-status")
        with gr.Column(scale=3):
            with gr.Row(equal_height=False):
                ui["mask_image"] = view_image("Your mask (magenta)", "mask-image")
                ui["mask_latent"] = view_image("The mask the U-Net uses (latent grid)", "mask-latent")
                ui["result"] = view_image("Result", "inpaint-result")
            ui["step"] = _steps_slider(engine, "inpaint-step", "Step", at_end=False)
            with gr.Row(equal_height=False):
                ui["latent"] = view_image("What the U-Net sees: z_t, 4 channels", "inpaint-latent", scale=2)
                ui["x0"] = view_image("x̂0 decoded", "inpaint-x0", scale=1)
            ui["step_text"] = gr.Markdown("", label="Inpainting at this step", elem_id=f"{TAB}-inpaint-text")
    ui["state"] = gr.State(None)
    examples = example_files("scene_a.png", "scene_d.png")
    if examples:
        gr.Examples([[path] for path in examples], inputs=[ui["editor"]], label="Example images (then paint a mask)")
    return ui


def render(data: dict, strength: float) -> dict:
    """Every view of a finished run, by name (EXPLAIN_VIEWS)."""
    e = data["explanation"]
    steps = e.steps
    first_cfg = max(1, round(steps * 0.25))
    schedule_plot, cutoff = schedule_frame(e.schedule, e.timesteps, e.alpha_bars, strength)
    slider = dict(minimum=1, maximum=steps, step=1)
    latent, x0, noise = trajectory_view(data, steps)
    eps_uncond, eps_cond, eps_difference, x0_uncond, x0_cond, x0_guided, cfg_text = guidance_view(data, first_cfg)
    return dict(step=gr.update(value=steps, **slider), latent=latent, x0=x0, noise_level=noise,
                x0_per_step=filmstrip(data), attention_from=gr.update(value=1, **slider),
                attention_to=gr.update(value=steps, **slider), attention_per_word=attention_maps(data, 1, steps),
                cfg_step=gr.update(value=first_cfg, **slider), eps_uncond=eps_uncond, eps_cond=eps_cond,
                eps_difference=eps_difference, x0_uncond=x0_uncond, x0_cond=x0_cond, x0_guided=x0_guided,
                cfg_text=cfg_text, guidance_strip=strip_gallery(data), schedule_plot=schedule_plot,
                run_noise_plot=run_noise_frame(data), img2img_cutoff=cutoff, cost=cost_markdown(data), code=e.code)


def _wire_explain(engine, studio: Studio, explain_task, inputs: dict, panel: OutputPanel,
                  views: dict, state: gr.State) -> None:
    device = f"{engine.device} / {str(engine.torch_dtype).removeprefix('torch.')}"
    settings = inputs["settings"]

    def explain(prompt: str, negative_prompt: str, seed: float, steps: float, guidance: float, scheduler: str,
                width: float, height: float, guidance_strip: list[float], strength: float, request: gr.Request,
                progress=gr.Progress()):
        """Generate one image and record how it was made. Returns, in this order, what every generating endpoint
        returns (preview, gallery, params, status), then the views named in demo/explain.py EXPLAIN_VIEWS
        (trajectory, attention, guidance, schedule, cost, code; see the README)."""
        holder: dict[str, Any] = {}

        def run(engine_, **kwargs):
            holder["result"] = explain_task.explain(engine_, **kwargs)
            return holder["result"]

        kwargs = dict(prompt=prompt, negative_prompt=negative_prompt, seed=resolve_seed(engine, seed),
                      steps=steps, guidance=guidance, scheduler=scheduler, width=width, height=height,
                      guidance_strip=list(guidance_strip or []))
        skips = [gr.skip()] * (len(EXPLAIN_VIEWS) + 1)
        for update in run_task(engine, studio, TAB, run, kwargs, request=request, progress=progress):
            if isinstance(update[1], list) and "result" in holder:  # the final update: the run is done
                result = holder["result"]
                data = {"explanation": result.explanation, "image": result.images[0], "params": result.params,
                        "device": device}
                rendered = render(data, strength)
                yield (*update, data, *(rendered[name] for name in EXPLAIN_VIEWS))
            else:
                yield (*update, *skips)

    wire_model_event(
        TAB, studio, panel, explain, api_name="explain",
        extra_outputs=[state, *(views[name] for name in EXPLAIN_VIEWS)],
        api_description="Generate one image and record how it was made (trajectory, attention, guidance, cost, code).",
        inputs_kwargs=dict(prompt=inputs["prompt"],
                           **{k: v for k, v in settings.kwargs().items() if k != "batch_size"},
                           guidance_strip=inputs["strip_scales"], strength=views["strength"]))
    wire_restore(engine, settings, {"prompt": inputs["prompt"]})
    inputs["prompt"].submit(lambda: None, None, None, js=f"() => document.getElementById('{TAB}-generate').click()",
                            api_visibility="private", queue=False)


def _wire_scrubbing(schedule: dict, views: dict, state: gr.State) -> None:
    """The sliders re-render what the last run recorded (no model work)."""
    v = views
    v["step"].change(trajectory_view, [state, v["step"]], [v["latent"], v["x0"], v["noise_level"]], **UI_EVENT)
    v["cfg_step"].change(guidance_view, [state, v["cfg_step"]],
                         [v[name] for name in ("eps_uncond", "eps_cond", "eps_difference", "x0_uncond", "x0_cond",
                                               "x0_guided", "cfg_text")], **UI_EVENT)
    for slider in (v["attention_from"], v["attention_to"]):
        slider.change(lambda d, a, b: attention_maps(d, a, b) if d else gr.skip(),
                      [state, v["attention_from"], v["attention_to"]], v["attention_per_word"], **UI_EVENT)

    def replot(data, value):
        e = data["explanation"] if data else None
        return schedule_frame(schedule, None if e is None else e.timesteps, None if e is None else e.alpha_bars, value)

    v["strength"].change(replot, [state, v["strength"]], [v["schedule_plot"], v["img2img_cutoff"]], **UI_EVENT)

    def show_code(data):
        if not data:
            return gr.update(visible=True, value="# Run Explain first: the code reproduces the last result.")
        return gr.update(visible=True, value=data["explanation"].code)

    v["show_code"].click(show_code, state, v["code"], **UI_EVENT)


def _wire_explain_inpaint(engine, studio: Studio, explain_task, inputs: dict, ui: dict) -> None:
    def explain_inpainting(image: dict | None, mask: object, inpaint_prompt: str, prompt: str, strength: float,
                           negative_prompt: str, seed: float, steps: float, guidance: float, scheduler: str,
                           request: gr.Request, progress=gr.Progress()):
        """Inpaint and record it in latent space. Returns the values named in demo/explain.py
        EXPLAIN_INPAINT_OUTPUTS: status, mask on the image, mask at latent size, result, step, latent the U-Net
        sees, x̂0, step text."""
        background = (image or {}).get("background") if isinstance(image, dict) else image
        if background is None:
            raise gr.Error("Upload an image to inpaint first (and paint a mask over it).")
        holder: dict[str, Any] = {}

        def run(engine_, **kwargs):
            holder["result"] = explain_task.explain_inpaint(engine_, **kwargs)
            return holder["result"]

        kwargs = dict(image=open_image(background), mask=mask if mask is not None else image,
                      prompt=inpaint_prompt or prompt, strength=strength, negative_prompt=negative_prompt,
                      seed=resolve_seed(engine, seed), steps=steps, guidance=guidance, scheduler=scheduler,
                      mask_blur=DEFAULT_MASK_BLUR)
        for preview, gallery, _params, status in run_task(engine, studio, INPAINT_TAB, run, kwargs,
                                                                request=request, progress=progress):
            if isinstance(gallery, list) and "result" in holder:
                result = holder["result"]
                data = {"explanation": result.explanation, "image": result.images[0], "params": result.params}
                steps_done = result.explanation.steps
                yield (status, *inpaint_masks(data), enlarge(result.images[0]),
                       gr.update(value=1, minimum=1, maximum=steps_done, step=1), *inpaint_step_view(data, 1), data)
            else:
                yield (status, gr.skip(), gr.skip(), preview if preview is not None else gr.skip(),
                       *([gr.skip()] * 4), gr.skip())

    settings = inputs["settings"]
    wire_cancellable(
        studio, INPAINT_TAB, ui["run"], ui["cancel"], ui["status"],
        studio.gpu_event(explain_inpainting, generation_seconds),
        inputs_kwargs=dict(image=ui["editor"], mask=ui["mask"], inpaint_prompt=ui["prompt"], prompt=inputs["prompt"],
                           strength=ui["strength"], **{k: v for k, v in settings.kwargs().items()
                                                       if k not in ("batch_size", "width", "height")}),
        outputs=[*(ui[name] for name in EXPLAIN_INPAINT_OUTPUTS), ui["state"]],
        api_name="explain_inpaint", show_progress="minimal", show_progress_on=[ui["result"]],
        **studio.model_event())
    ui["step"].change(inpaint_step_view, [ui["state"], ui["step"]], [ui["latent"], ui["x0"], ui["step_text"]],
                      **UI_EVENT)


# --- intervene: prompt-to-prompt and the token inspector ------------------------------------------------------------

RUN_LABELS = {"original": "original", "plain": "swapped word, plain", "edited": "edited"}


def token_view(report: dict) -> tuple[list[tuple[str, str | None]], str]:
    """The inspector's tokens as (text, status) pairs for a HighlightedText, and a summary."""
    pairs = [(f"{t['token']} ", None if t["status"] == "kept" else t["status"]) for t in report["tokens"]]
    lines = [f"**{report['count']} token(s)** for the prompt; the text encoder reads {report['limit']} positions, "
             f"{report['usable']} of them for the prompt (a start and an end marker take the other two). "
             f"Tokenizer: {report['tokenizer']}" + (" (one token per known word)." if report["tokenizer"] ==
                                                      "word-level" else " (words split into sub-word pieces).")]
    if report["unknown"]:
        lines.append(f"⚠ Unknown to the model (read as one 'unknown' token, carrying nothing): "
                     f"**{', '.join(report['unknown'])}**.")
    if report["cut_text"]:
        lines.append(f"⚠ Cut at token {report['usable']}: the model never reads **{report['cut_text']}**.")
    return pairs, "  \n".join(lines)


def intervention_images(result) -> list[tuple[Image.Image, str]]:
    return [(enlarge(run.image), f"{RUN_LABELS.get(run.label, run.label)} · {run.prompt}") for run in result.runs]


def intervention_attention(result) -> list[tuple[Image.Image, str]]:
    """Per run, per token: where its cross-attention went (heads, layers and steps summed; own min..max)."""
    items = []
    for run in result.runs:
        if run.attention is None:
            continue
        for token, heat in zip(run.tokens, run.attention):
            low, high = float(heat.min()), float(heat.max())
            heat = (heat - low) / (high - low) if high > low else np.zeros_like(heat)
            items.append((overlay(run.image, heat), f"{RUN_LABELS.get(run.label, run.label)} · {token}"))
    return items


def _intervene_section(engine, default_tau: float, max_weight: float) -> dict:
    gr.Markdown("## 8 · Intervene: edit through the attention (prompt-to-prompt)\nSwap a word at the same seed: "
                "*plain* makes the new prompt from scratch, *edited* makes it with the original's attention maps "
                "(which image region reads which word, and which regions look at which) for the first **tau** of "
                "the steps, so the layout can stay while the word changes. Re-weighting scales one word's "
                f"attention at every step (0 removes it, up to {max_weight:g}). Uses the prompt and settings above; "
                "each image is shown with the attention it used.")
    ui: dict[str, Any] = {}
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            ui["target"] = gr.Textbox(value="", label="Target prompt: the prompt above with words swapped "
                                      "(empty: re-weight the prompt itself)",
                                      max_length=engine.limits.max_prompt_chars, elem_id=f"{TAB}-intervene-target")
            ui["tau"] = Slider(label="tau: share of the steps with the original's attention", minimum=0.0,
                               maximum=1.0, step=0.05, value=default_tau, elem_id=f"{TAB}-intervene-tau")
            ui["reweight"] = gr.Textbox(value="", label="Re-weight words (word=scale, ...; e.g. red=2, circle=0.5)",
                                       max_length=engine.limits.max_prompt_chars, elem_id=f"{TAB}-intervene-weights")
            with gr.Row():
                ui["run"] = gr.Button("Intervene", variant="primary", elem_id=f"{TAB}-intervene-run", scale=3)
                ui["cancel"] = gr.Button("Cancel", variant="stop", elem_id=f"{TAB}-intervene-cancel", scale=1)
            ui["status"] = gr.Markdown("", label="Status", elem_id=f"{TAB}-intervene-status")
            ui["inspect"] = gr.Button("Inspect tokens of the prompt", size="sm", elem_id=f"{TAB}-tokens-button")
            ui["tokens"] = gr.HighlightedText(label="Tokens (unknown, cut)", combine_adjacent=False,
                                              color_map={"unknown": "orange", "cut": "red"},
                                              elem_id=f"{TAB}-tokens")
            ui["token_summary"] = gr.Markdown("", elem_id=f"{TAB}-token-summary")
        with gr.Column(scale=3):
            ui["images"] = gr.Gallery(label="Same seed: original · swapped plainly · edited", columns=3, height=260,
                                      format="png", type="filepath", object_fit="contain", interactive=False,
                                      elem_id=f"{TAB}-intervene-images", elem_classes=["lds-gallery", "lds-pixelated"])
            ui["attention"] = gr.Gallery(label="Attention per word of each image", columns=8, height=260,
                                         fit_columns=False, format="png", object_fit="contain", interactive=False,
                                         elem_id=f"{TAB}-intervene-attention",
                                         elem_classes=["lds-gallery", "lds-pixelated"])
            with gr.Accordion("Parameters of the edited image", open=False):
                ui["params"] = gr.JSON(label="Parameters", elem_id=f"{TAB}-intervene-params")
    return ui


def _wire_intervene(engine, studio: Studio, explain_task, inputs: dict, ui: dict) -> None:
    def intervene(prompt: str, target_prompt: str, tau: float, reweight: str, negative_prompt: str, seed: float,
                  steps: float, guidance: float, scheduler: str, width: float, height: float, request: gr.Request,
                  progress=gr.Progress()):
        """Prompt-to-prompt at one seed. Returns the values named in demo/explain.py EXPLAIN_INTERVENE_OUTPUTS:
        status, images (original, swapped plainly, edited: PNGs with parameters), attention per word, params."""
        holder: dict[str, Any] = {}

        def run(engine_, **kwargs):
            holder["result"] = explain_task.intervene(engine_, **kwargs)
            return holder["result"]

        kwargs = dict(prompt=prompt, target_prompt=target_prompt, tau=tau, weights=reweight,
                      negative_prompt=negative_prompt, seed=resolve_seed(engine, seed), steps=steps, guidance=guidance,
                      scheduler=scheduler, width=width, height=height)
        for _preview, gallery, params, status in run_task(engine, studio, INTERVENE_TAB, run, kwargs,
                                                          request=request, progress=progress):
            if isinstance(gallery, list) and "result" in holder:
                result = holder["result"]
                images = [(path, caption) for (path, _), (_, caption) in zip(gallery, intervention_images(result))]
                yield status, images, intervention_attention(result), params
            else:
                yield status, gr.skip(), gr.skip(), gr.skip()

    settings = inputs["settings"]
    wire_cancellable(
        studio, INTERVENE_TAB, ui["run"], ui["cancel"], ui["status"],
        studio.gpu_event(intervene, lambda arguments: generation_seconds({**arguments, "batch_size": 4})),
        inputs_kwargs=dict(prompt=inputs["prompt"], target_prompt=ui["target"], tau=ui["tau"], reweight=ui["reweight"],
                           **{k: v for k, v in settings.kwargs().items() if k != "batch_size"}),
        outputs=[ui[name] for name in EXPLAIN_INTERVENE_OUTPUTS], api_name="explain_intervene",
        show_progress="minimal", show_progress_on=[ui["images"]], **studio.model_event())

    def inspect(prompt: str):
        """How the text encoder reads a prompt. Returns the values named in EXPLAIN_TOKENS_OUTPUTS: the tokens
        (text, status: null, "unknown" or "cut") and a summary (limit, unknown words, where the prompt is cut)."""
        from demo.running import user_error

        try:
            return token_view(explain_task.inspect_tokens(engine, prompt))
        except Exception as error:
            raise user_error(error) from None

    ui["inspect"].click(inspect, inputs["prompt"], [ui["tokens"], ui["token_summary"]], api_name="explain_tokens",
                        queue=False, show_progress="hidden")
