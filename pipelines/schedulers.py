"""Scheduler display names -> request-scoped scheduler instances.

Every request builds its own scheduler with `Class.from_config(base_config, **overrides)`: schedulers
carry per-run state (timesteps, step index, model-output history), so a shared one would mix requests.
"""
from __future__ import annotations

from typing import Any, Callable

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    LCMScheduler,
    UniPCMultistepScheduler,
)

# name -> (class, overrides of the base config). Overrides name the variant explicitly so a base config
# with e.g. use_karras_sigmas=True does not leak Karras spacing into "DPM++ 2M" or "UniPC".
SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "DPM++ 2M Karras": (
        DPMSolverMultistepScheduler,
        dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True),
    ),
    "DPM++ 2M": (
        DPMSolverMultistepScheduler,
        dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=False),
    ),
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
    # DDIM defaults to clip_sample=True (pixel-space DDPM habit); clipping latents to [-1, 1] is wrong for an LDM.
    "DDIM": (DDIMScheduler, dict(clip_sample=False)),
    "UniPC": (UniPCMultistepScheduler, dict(use_karras_sigmas=False)),
    "LCM": (LCMScheduler, {}),
}
LCM_ONLY = ("LCM",)  # needs an LCM-distilled U-Net (LCM preset or LCM-LoRA); other models produce mush


def make_scheduler(name: str, base_config: dict) -> Any:
    """A fresh scheduler for one request; KeyError for an unknown name (callers validate first)."""
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(base_config, **overrides)


def factory(name: str) -> Callable[[dict], Any]:
    return lambda config: make_scheduler(name, config)
