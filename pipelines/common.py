"""Plain types shared by the engine, the task functions and the UI: results, errors, PNG metadata.

This module imports neither torch nor diffusers, so UI code may import it cheaply.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from pipelines.registry import COMMON_SCHEDULERS

PNG_KEY = "parameters"  # JSON, read back by params_from_png
A1111_KEY = "a1111_parameters"  # the same values as an AUTOMATIC1111-style text block, for humans and other tools
WITHHELD_KEY = "lds_withheld"  # image info key of a notice that replaced an image the safety checker flagged


def withheld(images: list) -> int:
    """How many of `images` are notices standing in for images the safety checker flagged (pipelines/safety.py)."""
    return sum(1 for image in images if (getattr(image, "info", None) or {}).get(WITHHELD_KEY))


class InputError(ValueError):
    """A value the user can fix; the message is one sentence naming the value and the limit."""


class Cancelled(RuntimeError):
    """The run was stopped by its cancel event."""


class ModelError(RuntimeError):
    """The model failed during a run (out of memory, a bad weight, ...); the engine stays usable."""


class ModelNotAvailable(ModelError):
    """Weights are neither local nor downloadable; the message names the model id and how to fetch it."""


@dataclass
class GenerationResult:
    images: list[Image.Image]  # one per batch item, each reproducible alone with params["seed"] + i
    params: dict[str, Any]  # everything needed to redo the run; written into each PNG
    previews: list[Image.Image] = field(
        default_factory=list
    )  # side images: control maps, the mask, the outpaint canvas

    def image_params(self, i: int) -> dict[str, Any]:
        """The params that reproduce image i alone (batch item i used seed + i)."""
        return {**self.params, "seed": self.params["seed"] + i, "batch_size": 1, "batch_index": i}


# --- validation: every message names the value and the limit -------------------------------------

def check_int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise InputError(f"{name}={value!r} is not a whole number")
    value = int(value)
    if value < low:
        raise InputError(f"{name}={value} is below the minimum of {low}")
    if value > high:
        raise InputError(f"{name}={value} is above the limit of {high}")
    return value


def check_float(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise InputError(f"{name}={value!r} is not a number")
    value = float(value)
    if value < low:
        raise InputError(f"{name}={value:g} is below the minimum of {low:g}")
    if value > high:
        raise InputError(f"{name}={value:g} is above the limit of {high:g}")
    return value


def check_text(name: str, value: Any, max_chars: int) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(f"{name} must be text, got {type(value).__name__}")
    if len(value) > max_chars:
        raise InputError(f"{name} has {len(value)} characters, above the limit of {max_chars}")
    return value


def check_choice(name: str, value: Any, choices) -> str:
    if value not in choices:
        raise InputError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")
    return value


# --- PNG metadata ------------------------------------------------------------------------------------

def params_to_png_info(params: dict[str, Any]) -> PngInfo:
    """PNG text chunks for `image.save(path, pnginfo=...)`: JSON under "parameters" plus an A1111-style block."""
    info = PngInfo()
    info.add_text(PNG_KEY, json.dumps(params, sort_keys=True, default=str))
    info.add_text(A1111_KEY, params_to_a1111(params))
    return info


def params_to_a1111(params: dict[str, Any]) -> str:
    lines = [str(params.get("prompt", ""))]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    pairs = [
        ("Steps", params.get("steps")),
        ("Sampler", params.get("scheduler")),
        ("CFG scale", params.get("guidance")),
        ("Seed", params.get("seed")),
        ("Size", f"{params.get('width')}x{params.get('height')}" if params.get("width") else None),
        ("Model", params.get("model")),
        ("Denoising strength", params.get("strength")),
        ("Task", params.get("task")),
    ]
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs if v is not None))
    return "\n".join(lines)


_A1111_FIELDS = {"Steps": ("steps", int), "CFG scale": ("guidance", float),
                 "Seed": ("seed", int), "Model": ("model", str), "Denoising strength": ("strength", float),
                 "Task": ("task", str)}
NOTES_KEY = "notes"  # what reading a parameters block could not carry over, one sentence each

# AUTOMATIC1111 names a sampler and, since 1.9, its noise schedule apart ("Sampler: DPM++ 2M, Schedule type:
# Karras"); older files join them ("Sampler: DPM++ 2M Karras"). Its plain sampler names are this app's names.
_SCHEDULER_NAMES = (*COMMON_SCHEDULERS, "LCM")
_KARRAS = " Karras"
# "Automatic" is the sampler's own default schedule in A1111 (Karras for DPM++ 2M; evenly spaced for the others)
_A1111_AUTOMATIC = {"DPM++ 2M": "Karras"}
# "Uniform" spaces the steps evenly over the training timesteps, as this app's plain schedulers do
_A1111_PLAIN_SCHEDULES = ("Uniform",)


def scheduler_from_a1111(sampler: str, schedule: str | None = None) -> tuple[str | None, list[str]]:
    """This app's scheduler for an A1111 sampler and schedule type, and notes on what has no equivalent here.
    None when the sampler itself has none (the tab keeps its scheduler)."""
    sampler, schedule = sampler.strip(), (schedule or "").strip() or "Automatic"
    if sampler.endswith(_KARRAS) and schedule == "Automatic":  # the joined form of A1111 before 1.9
        sampler, schedule = sampler[: -len(_KARRAS)], "Karras"
    plain = [name for name in _SCHEDULER_NAMES if not name.endswith(_KARRAS)]
    karras = [name[: -len(_KARRAS)] for name in _SCHEDULER_NAMES if name.endswith(_KARRAS)]
    if sampler not in plain:
        return None, [f"Sampler {sampler!r} has no equivalent here (this app has {', '.join(plain)}, with Karras "
                      f"spacing for {', '.join(karras)}); the scheduler was left as it is."]
    if schedule == "Automatic":
        schedule = _A1111_AUTOMATIC.get(sampler, _A1111_PLAIN_SCHEDULES[0])
    if schedule == "Karras" and sampler + _KARRAS in _SCHEDULER_NAMES:
        return sampler + _KARRAS, []
    if schedule in _A1111_PLAIN_SCHEDULES:
        return sampler, []
    return sampler, [f"Schedule type {schedule!r} has no equivalent for {sampler} here; {sampler!r} with its own "
                     f"(evenly spaced) steps was chosen, so the image will differ."]


def params_from_a1111(text: str) -> dict[str, Any]:
    """Parse an AUTOMATIC1111 "parameters" block (prompt, optional negative, then "Key: value, ..." line)."""
    lines = text.strip().split("\n")
    settings = lines.pop() if lines and re.match(r"^\s*Steps: ", lines[-1]) else ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    params: dict[str, Any] = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative)}
    found = {key.strip(): value.strip() for key, value in
             re.findall(r"\s*([\w \-/]+):\s*(\"(?:\\.|[^\"])*\"|[^,]*)(?:,|$)", settings)}
    notes = []
    for key, value in found.items():
        if key == "Size" and re.fullmatch(r"\d+x\d+", value):
            params["width"], params["height"] = map(int, value.split("x"))
        elif key in _A1111_FIELDS:
            name, kind = _A1111_FIELDS[key]
            try:
                params[name] = kind(value)
            except ValueError:
                notes.append(f"{key} {value!r} is not a number; it was left as it is.")
    if found.get("Sampler"):
        scheduler, scheduler_notes = scheduler_from_a1111(found["Sampler"], found.get("Schedule type"))
        if scheduler is not None:
            params["scheduler"] = scheduler
        notes += scheduler_notes
    if notes:
        params[NOTES_KEY] = notes
    return params


def params_from_png(image: Image.Image) -> dict[str, Any] | None:
    """Read back what `params_to_png_info` wrote (or an A1111 PNG's text block); None when there is none."""
    text = getattr(image, "text", None) or image.info or {}
    raw = text.get(PNG_KEY)
    if raw:
        try:
            value = json.loads(raw)
            if isinstance(value, dict):
                return value
        except (json.JSONDecodeError, TypeError):
            pass
        return params_from_a1111(str(raw))  # a PNG written by AUTOMATIC1111
    if text.get(A1111_KEY):
        return params_from_a1111(str(text[A1111_KEY]))
    return None
