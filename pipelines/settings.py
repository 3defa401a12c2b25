"""Server-side limits, read from the environment in this one place.

Every limit applies whatever a client sends: the UI's sliders are a convenience, these are the law.
`Limits.from_env()` is called by the Engine when it is built; nothing here runs at import time.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping


@dataclass(frozen=True)
class Limits:
    max_size: int | None = None  # LDS_MAX_SIZE: longest image side in pixels; None -> the preset's own max_size
    max_steps: int = 150  # LDS_MAX_STEPS: denoising steps per request
    max_batch: int = 4  # LDS_MAX_BATCH: images per request
    max_prompt_chars: int = 1000  # LDS_MAX_PROMPT_CHARS: prompt and negative prompt, each
    max_guidance: float = 30.0  # LDS_MAX_GUIDANCE: classifier-free guidance scale
    max_image_pixels: int = 4096 * 4096  # LDS_MAX_IMAGE_PIXELS: uploads above this are refused (decompression bombs)
    max_upload_mb: int = 20  # LDS_MAX_UPLOAD_MB: upload file size, for the web layer
    max_seed: int = 2**32 - 1  # seeds are 32-bit like A1111/ComfyUI so they survive JSON and UI number fields
    max_outpaint: int = 512  # LDS_MAX_OUTPAINT: pixels added on any one side
    max_adapters: int = 8  # LDS_MAX_ADAPTERS: fine-tuned or loaded adapters held at once
    max_finetune_steps: int = 2000  # LDS_MAX_FINETUNE_STEPS: optimiser steps of one fine-tune
    max_finetune_images: int = 20  # LDS_MAX_FINETUNE_IMAGES: training images of one fine-tune
    max_compare_cells: int = 36  # LDS_MAX_COMPARE_CELLS: images of one Compare grid (6 x 6)
    # LDS_MAX_COMPARE_PIXELS: pixels of all cells of one Compare grid together (36 images of 512x512)
    max_compare_pixels: int = 36 * 512 * 512
    # LDS_MAX_FILE_AGE_S: seconds a file the app made or received (result PNGs, previews, uploads, saved adapters)
    # stays on disk. Long enough to download a result or send it to another tab after a coffee; short enough that
    # a busy server's disk holds a bounded window of files (disk use ~ requests per second x this age).
    max_file_age_s: int = 2 * 3600
    # LDS_MAX_SESSIONS: browser/API sessions whose state the server keeps (the least recently used go first).
    # Gradio keeps each session's copy of the page's component values, about 2 MB for this app (benchmarks/soak.py),
    # and by default 10,000 sessions: a public app's memory would grow with every visitor for weeks.
    max_sessions: int = 200
    # LDS_BATCH_REQUESTS: images of queued same-settings txt2img requests run as one call. Off (1) by default:
    # a merged image can differ from its solo run by one level out of 255 (batched kernels round differently),
    # and the app promises that a seed gives the same bytes whoever else is using it (throughput: README).
    batch_requests: int = 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Limits":
        env = os.environ if env is None else env
        values = {}
        for f in fields(cls):
            key = "LDS_" + f.name.upper()
            raw = env.get(key)
            if raw is None or raw.strip() == "":
                continue
            kind = float if f.name == "max_guidance" else int
            try:
                value = kind(raw)
            except ValueError:
                raise ValueError(f"{key}={raw!r} is not a number") from None
            if value <= 0:
                raise ValueError(f"{key}={raw!r} must be positive")
            values[f.name] = value
        return cls(**values)


@dataclass(frozen=True)
class FineTuneDefaults:
    """What a fine-tune uses for a setting left at 0; the Fine-tune tab shows the same values."""

    steps: int  # optimiser steps
    learning_rate_lora: float
    learning_rate_full: float
    instance_prompt: str  # caption of images without their own; {token} is the trigger word
    batch_size: int  # images per step
    lr_schedule: str = "constant"  # "constant" or "cosine"


# Live previews of a running request: at most this often (seconds), in the engine and in the browser alike.
PREVIEW_EVERY_S = 0.15

# Inpainting: pixels over which the result fades into the input inside the mask's edge (pipelines.preprocess.feather);
# outside the mask nothing changes whatever the blur. Chosen on the built-in model's validation split
# (assets/models/shapes-inpaint/README.md): with the edge's colours matched (pipelines.preprocess.match_edges),
# 3 px softens the seam well below the goal where 2 px only just meets it, but fades what is drawn near the mask's
# edge: the Inpaint tab's own example ("a big green star") is read as a star in no seed at 3 px.
DEFAULT_MASK_BLUR = 2

# What runs the U-Net's denoising steps (--backend / LDS_BACKEND; pipelines/fast_backend.py): "eager" PyTorch, or
# "onnx", the base U-Net exported once to ONNX and run by ONNX Runtime on the CPU. Eager by default: ONNX Runtime's
# kernels round differently, so a seed gives other bytes than it does with eager (up to a few levels in some
# pixels; README, Performance: Fast backend), and Explain and the other eager-only paths would no longer make the
# very image Text to image makes.
BACKENDS = ("eager", "onnx")
DEFAULT_BACKEND = "eager"


def resolve_backend(value: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The U-Net backend: `value` (the --backend flag) when given, else LDS_BACKEND, else DEFAULT_BACKEND."""
    env = os.environ if env is None else env
    name, raw = ("backend", value) if value is not None else ("LDS_BACKEND", env.get("LDS_BACKEND"))
    if raw is None or str(raw).strip() == "":
        return DEFAULT_BACKEND
    backend = str(raw).strip().lower()
    if backend not in BACKENDS:
        raise ValueError(f"{name}={raw!r} is not a U-Net backend: use one of {', '.join(map(repr, BACKENDS))}")
    return backend


def onnx_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """LDS_ONNX_CACHE: where exported U-Nets are kept between starts (one folder per weights, torch version and
    opset), by default beside the benchmarks' build cache in the system temp folder. Not in Gradio's cache folder:
    the app's sweep empties that of files older than LDS_MAX_FILE_AGE_S, and an export must outlive a restart."""
    env = os.environ if env is None else env
    return Path(env.get("LDS_ONNX_CACHE") or Path(tempfile.gettempdir()) / "lds-onnx-cache")


FINETUNE_METHODS = ("lora", "full")
OUTPAINT_FILLS = ("edge", "blur", "noise")  # what fills the new border before denoising (pipelines.outpaint.prefill)
LR_SCHEDULES = ("constant", "cosine")


def finetune_defaults(builtin: bool) -> FineTuneDefaults:
    if builtin:  # a 1.9 M-parameter U-Net and a 52-word vocabulary: large steps, "in X style" as the world says it
        # Steps, batch and LoRA rate: what textured the most held-out samples in the texture evaluation
        # (training.evaluate_finetune) while a fine-tune stays a few minutes on a CPU; figures in the README.
        return FineTuneDefaults(steps=1200, learning_rate_lora=2e-3, learning_rate_full=2e-4,
                                instance_prompt="in {token} style", batch_size=8)
    # SD1.5: the DreamBooth / diffusers example rates
    return FineTuneDefaults(steps=400, learning_rate_lora=1e-4, learning_rate_full=5e-6,
                            instance_prompt="a painting in {token} style", batch_size=4)
