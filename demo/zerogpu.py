"""ZeroGPU: the seconds of GPU a call asks for (`spaces.GPU(duration=...)`), and the error a stale worker raises."""
from __future__ import annotations

import math
from typing import Any

import gradio as gr

# ZeroGPU: the seconds of GPU a call asks for (`spaces.GPU(duration=...)`). ZeroGPU refuses a call that asks for
# more than about 300 s, and a shorter one gets a better place in its queue; the time actually used is what
# counts against a visitor's quota. The per-step figures are estimates for an SD1.5-class model in fp16 at
# 512x512 on a ZeroGPU slice, doubled for safety (no GPU here to measure on); the built-in model needs far less.
ZERO_GPU_MAX_S = 300

ZERO_GPU_MIN_S = 20  # a fresh worker: fork, weights to the GPU, first kernels

GPU_S_PER_IMAGE_STEP = 0.1  # one denoising step (with CFG) of one 512x512 image

GPU_S_PER_TRAIN_IMAGE_STEP = 0.3  # one fine-tuning step (forward and backward) of one 512x512 image

GPU_REFERENCE_PIXELS = 512 * 512


class StaleWorker(gr.Error):
    """A ZeroGPU worker forked before the app's last adapter change (it crosses back pickled, as a gr.Error)."""

    def __init__(self, message: str = "stale GPU worker", *args, **kwargs):
        super().__init__(message, *args, **kwargs)


def gpu_duration(estimate_s: float) -> int:
    """The `duration` a ZeroGPU call asks for: the estimate, at least ZERO_GPU_MIN_S, at most ZERO_GPU_MAX_S."""
    return int(min(ZERO_GPU_MAX_S, max(ZERO_GPU_MIN_S, math.ceil(estimate_s))))


def _number_or(value, default: float) -> float:
    try:
        return float(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default  # the pipeline's own check names the bad value


def _area(arguments: dict[str, Any]) -> float:
    """Pixels of the request relative to 512x512 (at least 1: an upload's size is not known before decoding)."""
    width, height = _number_or(arguments.get("width"), 512), _number_or(arguments.get("height"), 512)
    return max(1.0, width * height / GPU_REFERENCE_PIXELS)


def generation_seconds(arguments: dict[str, Any]) -> float:
    """GPU seconds of a generating event from its steps, batch size, size and (Explain) guidance strip."""
    steps = _number_or(arguments.get("steps"), 50)
    images = _number_or(arguments.get("batch_size"), 1) + len(arguments.get("guidance_strip") or [])
    return ZERO_GPU_MIN_S + GPU_S_PER_IMAGE_STEP * steps * images * _area(arguments)


FINETUNE_FIXED_S = ZERO_GPU_MIN_S + 2 * GPU_S_PER_IMAGE_STEP * 50  # worker start and the before/after test images


def finetune_seconds(arguments: dict[str, Any], *, default_steps: int = 0, default_batch: int = 1) -> float:
    """GPU seconds of a fine-tune: its optimiser steps times images per step, plus the before/after images."""
    steps = _number_or(arguments.get("steps"), default_steps) or default_steps
    batch = _number_or(arguments.get("batch_size"), default_batch) or default_batch
    return FINETUNE_FIXED_S + GPU_S_PER_TRAIN_IMAGE_STEP * steps * batch


def finetune_steps_within(limit_s: float, batch_size: int) -> int:
    """The most fine-tuning steps at `batch_size` whose estimate stays within `limit_s` seconds."""
    return max(0, math.floor((limit_s - FINETUNE_FIXED_S) / (GPU_S_PER_TRAIN_IMAGE_STEP * max(1, batch_size))))
