"""Running a Request (pipelines/request.py) under engine.lock: adapters, progress, previews, cancel, error mapping."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Protocol

import torch
from PIL import Image

from pipelines.common import Cancelled, InputError, ModelError
from pipelines.request import Request
from pipelines.safety import screen

logger = logging.getLogger(__name__)

OnStep = Callable[[int, int, "Image.Image | None"], None]

# A live preview is made at most every engine.preview_every_s (settings.PREVIEW_EVERY_S unless changed: the UI
# shows no more than that), and only while previews take at most PREVIEW_COST_SHARE of the run: a small
# model's real VAE decode costs about as much as a U-Net step or two, so a preview at every step would slow
# a run several times. Steps without one get None.
PREVIEW_COST_SHARE = 0.05


class PreviewClock:
    """When the next live preview is due: `max(every_s, cost / PREVIEW_COST_SHARE)` after the run starts or the
    last preview, where cost is what the engine's last preview took (`engine.preview_cost_s`, remembered across
    runs, so a run shorter than that makes none). `engine.preview_every_s <= 0` means every step."""

    def __init__(self, engine):
        self.engine = engine
        self.every_s = float(engine.preview_every_s)
        self.next_at = time.perf_counter() + self._gap(float(engine.preview_cost_s))

    def _gap(self, cost_s: float) -> float:
        return max(self.every_s, cost_s / PREVIEW_COST_SHARE)

    def due(self) -> bool:
        return self.every_s <= 0 or time.perf_counter() >= self.next_at

    def made(self, cost_s: float) -> None:
        self.engine.preview_cost_s = cost_s
        self.next_at = time.perf_counter() + self._gap(cost_s)


# (pipe, i, t, callback_kwargs): sees the step-end tensors (latents, ...) of every step; returns nothing
Capture = Callable[[Any, int, Any, dict], None]


class CancelEvent(Protocol):
    def is_set(self) -> bool: ...


def run_pipeline(engine, request: Request, *, on_step: OnStep | None = None, cancel: CancelEvent | None = None,
                 capture: Capture | None = None) -> list[Image.Image]:
    """Run one request with progress, cancel and error mapping; returns PIL images. Caller holds engine.lock.

    The request's adapters are resolved here (`resolve_adapters`), under the lock. Cancel: the step-end
    callback sets `_interrupt` on this request's pipeline view only, so the denoising loop skips the remaining
    steps; then `Cancelled` is raised instead of returning images. `capture(pipe, i, t, callback_kwargs)` is
    called first at every step end (the Explain tab records the latents there); it must not modify them.
    `on_step(step, total, preview)` runs after every step; preview is a new picture of the first image
    when one is due (see PreviewClock, `engine.preview_every_s`), else None.
    """
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled before the first step")
    state: dict[str, Any] = {"cancelled": False, "error": None, "steps_done": 0}
    clock = PreviewClock(engine)

    def on_step_end(pipe, i: int, t, callback_kwargs: dict) -> dict:
        state["steps_done"] = i + 1
        if capture is not None:
            capture(pipe, i, t, callback_kwargs)
        if on_step is not None and state["error"] is None:
            try:
                preview = None
                if clock.due():
                    started = time.perf_counter()
                    preview = engine.preview(callback_kwargs["latents"])
                    clock.made(time.perf_counter() - started)
                on_step(i + 1, int(getattr(pipe, "num_timesteps", 0) or 0), preview)
            except Exception as error:  # a UI callback failing must not look like a model failure
                state["error"] = error
                pipe._interrupt = True
        if cancel is not None and cancel.is_set():
            state["cancelled"] = True
            pipe._interrupt = True
        return {}

    resolve_adapters(engine, request)
    images = call_view(engine, view_for(engine, request), request.adapters, on_step_end, **request.call_kwargs())
    if state["error"] is not None:
        raise state["error"]
    if state["cancelled"]:
        raise Cancelled(f"cancelled after step {state['steps_done']}")
    return images


def resolve_adapters(engine, request: Request) -> tuple[str, ...]:
    """The adapters (fine-tunes, LoRAs) the request's prompt switches on, worked out once, under engine.lock."""
    if request.adapters is None:
        request.adapters = engine.adapters.active_for(request.prompt)
    return request.adapters


def view_for(engine, request: Request):
    """A request-scoped pipeline view of the request's task, with its own scheduler."""
    return engine.pipeline(request.task, scheduler=request.scheduler, controls=request.controls)


def call_view(engine, view, adapters: tuple[str, ...], on_step_end, **call_kwargs: Any) -> list[Image.Image]:
    """`view(**call_kwargs)` with these adapters on and a step-end callback; model failures become ModelError,
    bad values InputError."""
    try:
        view = engine.adapters.prepare(view, adapters)  # none: the base model, untouched
        # On the engine's model thread (pipelines/compute.py); inference_mode is per thread, so it is entered there
        output = engine.compute.run(_inference, view, callback_on_step_end=on_step_end, output_type="pil",
                                    **call_kwargs)
        # A public deployment's safety checker (pipelines/safety.py): flagged images become notices, never vanish
        images = screen(engine, list(output.images))
    except (InputError, Cancelled):
        raise
    except ValueError as error:
        # diffusers' check_inputs names the argument and value; these are caller mistakes, not model ones.
        raise InputError(str(error)) from error
    except Exception as error:
        engine.free_memory()
        if isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower():
            raise ModelError(
                f"out of memory on {engine.device}: lower the size, batch or steps, or restart with "
                f"--attention-slicing / --vae-tiling / --cpu-offload") from error
        logger.exception("model run failed")
        raise ModelError(f"the model failed: {type(error).__name__}: {error}") from error
    finally:
        engine.after_run()
    return images


def _inference(fn, /, **kwargs: Any):
    with torch.inference_mode():
        return fn(**kwargs)
