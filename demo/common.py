"""UI pieces every tab shares: the settings accordion, the output panel, running a task with live
previews and a real Cancel, PNG files with parameters, restoring parameters, and "Send to" links.

No torch or diffusers here (nor in any demo/ module): the tabs import task functions inside their event
handlers, and everything else this file needs from pipelines/ is torch-free.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import math
import multiprocessing
import os
import queue
import random
import tempfile
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import gradio as gr
from PIL import Image, ImageOps, UnidentifiedImageError

from pipelines.common import (
    Cancelled,
    InputError,
    ModelError,
    ModelNotAvailable,
    params_from_png,
    params_to_png_info,
    withheld,
)
from pipelines.settings import PREVIEW_EVERY_S

CONCURRENCY_ID = "model"  # every event that touches the model shares this id and one concurrency limit
MODEL_EVENT = dict(concurrency_id=CONCURRENCY_ID, concurrency_limit=1)  # Studio.model_event() when batching
UI_EVENT = dict(queue=False, api_visibility="private", show_progress="hidden")  # cheap, model-free UI updates

TAB_LABELS = {
    "txt2img": "Text to image",
    "inpaint": "Inpaint",
    "outpaint": "Outpaint",
    "style": "Style transfer",
    "controlnet": "ControlNet",
    "explain": "Explain",
    "finetune": "Fine-tune",
}
SEND_TARGETS = ("inpaint", "outpaint", "style", "controlnet")  # tabs with an input image
HISTORY_LIMIT = 48  # images kept in a session's history gallery
HEARTBEAT_S = 0.5  # a running request's generator hands control back to gradio at least this often
RANDOM_SEED = -1  # the seed box value meaning "pick one"; the seed actually used is shown with the result
UPSCALED_VIEW_PX = 256  # small images are shown at least this big, with pixelated rendering
CANCEL_SLOTS = 512  # cancel flags held at once (requests waiting or running); the oldest waiting one gives way

# ZeroGPU: the seconds of GPU a call asks for (`spaces.GPU(duration=...)`). ZeroGPU refuses a call that asks for
# more than about 300 s, and a shorter one gets a better place in its queue; the time actually used is what
# counts against a visitor's quota. The per-step figures are estimates for an SD1.5-class model in fp16 at
# 512x512 on a ZeroGPU slice, doubled for safety (no GPU here to measure on); the built-in model needs far less.
ZERO_GPU_MAX_S = 300
ZERO_GPU_MIN_S = 20  # a fresh worker: fork, weights to the GPU, first kernels
GPU_S_PER_IMAGE_STEP = 0.1  # one denoising step (with CFG) of one 512x512 image
GPU_S_PER_TRAIN_IMAGE_STEP = 0.3  # one fine-tuning step (forward and backward) of one 512x512 image
GPU_REFERENCE_PIXELS = 512 * 512

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = REPO_ROOT / "assets" / "examples"

CSS = """
/* Images of the built-in model are 64x64: show them big, with crisp pixels; the files keep their size. */
.lds-pixelated img, .lds-pixelated canvas { image-rendering: pixelated; image-rendering: crisp-edges; }
.lds-pixelated .image-frame img, .lds-pixelated .image-container img { min-width: 192px; min-height: 192px;
  width: 100%; height: 100%; object-fit: contain; }
.lds-gallery .thumbnail-item img, .lds-gallery .thumbnail-lg img, .lds-gallery img { image-rendering: pixelated; }
.lds-warning { color: #b45309; }
.lds-warning p { margin: 0; }
#lds-header h1 { margin-bottom: 0.2em; }
"""


# --- uploads -------------------------------------------------------------------------------------------

def _check_image_file(path: str | None, max_pixels: int, what: str) -> None:
    """Refuse what PIL cannot read, and decompression bombs, before anything decodes the pixels."""
    if not path:
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
    except Image.DecompressionBombError as e:
        raise gr.Error(f"The {what} is too large to open safely ({e}); the limit is {max_pixels:,} pixels.") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise gr.Error(
            f"The {what} is not a readable image (PNG, JPEG or WebP); the file is damaged or of another type."
        ) from None
    if width * height > max_pixels:
        raise gr.Error(
            f"The {what} is {width}x{height} = {width * height:,} pixels, above the limit of {max_pixels:,} pixels."
        )


def _decode_error(what: str, e: Exception) -> gr.Error:
    return gr.Error(f"The {what} could not be decoded ({type(e).__name__}: {e}); the file is damaged or truncated.")


class SafeImage(gr.Image):
    """gr.Image that refuses unreadable files and decompression bombs with a clear message."""

    is_template = True  # the browser renders it with gr.Image's frontend
    max_pixels = 4096 * 4096  # set per instance by `safe_image` (no __init__: gradio reads props from its signature)

    def preprocess(self, payload):
        _check_image_file(payload.path if payload is not None else None, self.max_pixels, f"image '{self.label}'")
        try:
            image = super().preprocess(payload)
            if isinstance(image, Image.Image):
                image.load()
            return image
        except gr.Error:
            raise
        except Exception as e:
            raise _decode_error(f"image '{self.label}'", e) from None


class SafeImageEditor(gr.ImageEditor):
    """gr.ImageEditor with the same checks on its background and every layer."""

    is_template = True
    max_pixels = 4096 * 4096  # set per instance by `safe_image_editor`

    def preprocess(self, payload):
        if payload is not None:
            files = [payload.background, payload.composite, *(payload.layers or [])]
            for file in files:
                _check_image_file(getattr(file, "path", None), self.max_pixels, f"image '{self.label}'")
        try:
            value = super().preprocess(payload)
        except gr.Error:
            raise
        except Exception as e:
            raise _decode_error(f"image '{self.label}'", e) from None
        return value


def _named_errors(cls):
    """`cls` whose server-side checks (gradio's bounds and choices) say which field was wrong:
    "Steps: Value 10000 is greater than maximum value 150." instead of the bare sentence."""

    class Named(cls):
        is_template = True  # rendered by the frontend of `cls`

        def preprocess(self, payload):
            try:
                return super().preprocess(payload)
            except gr.Error as error:
                raise gr.Error(f"{self.label}: {error.message}", title="Invalid input") from None

    Named.__name__ = Named.__qualname__ = f"Named{cls.__name__}"
    return Named


Slider = _named_errors(gr.Slider)
Number = _named_errors(gr.Number)
Dropdown = _named_errors(gr.Dropdown)
Radio = _named_errors(gr.Radio)
CheckboxGroup = _named_errors(gr.CheckboxGroup)


def safe_image(*, max_pixels: int, **kwargs) -> SafeImage:
    component = SafeImage(**kwargs)
    component.max_pixels = max_pixels
    return component


def safe_image_editor(*, max_pixels: int, **kwargs) -> SafeImageEditor:
    component = SafeImageEditor(**kwargs)
    component.max_pixels = max_pixels
    return component


def open_png_params(path: str | None, max_pixels: int) -> dict[str, Any]:
    """The generation parameters stored in a PNG written by this app (or by AUTOMATIC1111)."""
    if not path:
        raise gr.Error("Drop a PNG made by this app to restore its parameters.")
    _check_image_file(path, max_pixels, "parameters file")
    with Image.open(path) as im:
        try:
            params = params_from_png(im)
        except Exception as e:  # a damaged text chunk
            raise _decode_error("parameters file", e) from None
    if not params:
        raise gr.Error(f"{Path(path).name} carries no generation parameters (no 'parameters' PNG text chunk).")
    return params


# --- the common settings accordion ----------------------------------------------------------------------

@dataclass
class CommonSettings:
    """The components of one tab's settings accordion (built by `common_settings`)."""

    negative_prompt: gr.Textbox
    seed: gr.Number
    randomise: gr.Button
    steps: gr.Slider
    guidance: gr.Slider
    scheduler: gr.Dropdown
    batch_size: gr.Slider
    width: gr.Slider | None = None
    height: gr.Slider | None = None
    restore_file: gr.File | None = None
    restored: gr.JSON | None = None

    def kwargs(self) -> dict[str, gr.components.Component]:
        """Task keyword name -> component, for `inputs_kwargs=` of a model event."""
        named = dict(negative_prompt=self.negative_prompt, seed=self.seed, steps=self.steps,
                     guidance=self.guidance, scheduler=self.scheduler, batch_size=self.batch_size)
        if self.width is not None:
            named.update(width=self.width, height=self.height)
        return named


def size_choices(engine) -> tuple[int, int, int]:
    """(minimum, maximum, step) for width/height sliders, within the model's and the server's limits."""
    preset = engine.preset
    limit = engine.limits.max_size or preset.max_size
    maximum = min(preset.max_size, limit)
    multiple = int(getattr(engine, "size_multiple", 8) or 8)
    minimum = max(multiple, (preset.default_size // 4) // multiple * multiple)
    return minimum, maximum, multiple


def common_settings(
    engine, *, tab: str, size: bool = True, label: str = "Settings", open: bool = False
) -> CommonSettings:
    """Build the settings accordion (negative prompt, seed + random, steps, guidance, scheduler, size, batch).

    Every tab calls this one function, so the settings look and behave the same everywhere.
    """
    preset, limits = engine.preset, engine.limits
    with gr.Accordion(label, open=open, elem_id=f"{tab}-settings"):
        negative = gr.Textbox(value="", label="Negative prompt", placeholder="what the image should not show",
                              max_lines=2, max_length=limits.max_prompt_chars, elem_id=f"{tab}-negative")
        with gr.Row():
            seed = Number(label="Seed (-1 = random)", value=RANDOM_SEED, precision=0, minimum=RANDOM_SEED,
                             maximum=limits.max_seed, scale=4, elem_id=f"{tab}-seed")
            randomise = gr.Button("Random seed", scale=1, min_width=80, size="sm", elem_id=f"{tab}-random-seed")
        with gr.Row():
            steps = Slider(label="Steps", minimum=1, maximum=limits.max_steps, step=1, value=preset.default_steps,
                           elem_id=f"{tab}-steps")
            guidance = Slider(label="Guidance (CFG)", minimum=0.0, maximum=limits.max_guidance, step=0.5,
                                 value=preset.default_guidance, elem_id=f"{tab}-guidance")
        with gr.Row():
            scheduler = Dropdown(
                label="Scheduler",
                choices=list(getattr(engine, "scheduler_names", preset.scheduler_names)),
                value=preset.default_scheduler,
                elem_id=f"{tab}-scheduler",
            )
            batch = Slider(
                label="Batch size", minimum=1, maximum=limits.max_batch, step=1, value=1, elem_id=f"{tab}-batch"
            )
        width = height = None
        if size:
            low, high, step = size_choices(engine)
            with gr.Row():
                width = Slider(label="Width", minimum=low, maximum=high, step=step, value=preset.default_size,
                               elem_id=f"{tab}-width")
                height = Slider(label="Height", minimum=low, maximum=high, step=step, value=preset.default_size,
                                elem_id=f"{tab}-height")
        with gr.Accordion("Restore parameters from PNG", open=False):
            restore = gr.File(label="Restore parameters from PNG (drop an image made here)", file_types=[".png"],
                              type="filepath", height=90, elem_id=f"{tab}-restore")
            restored = gr.JSON(label="Parameters found", elem_id=f"{tab}-restored")
    randomise.click(lambda: random.randint(0, limits.max_seed), None, seed, **UI_EVENT)
    return CommonSettings(negative_prompt=negative, seed=seed, randomise=randomise, steps=steps, guidance=guidance,
                          scheduler=scheduler, batch_size=batch, width=width, height=height,
                          restore_file=restore, restored=restored)


def wire_restore(engine, settings: CommonSettings, fields: dict[str, gr.components.Component], *,
                 api_name: str | None = None, derive: Callable[[dict], dict] | None = None) -> None:
    """Dropping a PNG on `settings.restore_file` fills `fields` (params key -> component) from its metadata.

    `fields` should hold the tab's own inputs (prompt, strength, ...); the common settings are added here.
    `derive(params)` may compute UI-only values (e.g. outpaint's chosen sides) from the stored ones.
    """
    targets = {**settings.kwargs(), **fields}
    names = list(targets)
    max_pixels = engine.limits.max_image_pixels

    def read_params(png: str | None) -> dict:
        """The generation parameters stored in a PNG made by this app."""
        return open_png_params(png, max_pixels)

    def apply(params: dict):
        params = dict(params or {})
        if derive is not None:
            params.update(derive(params))
        updates = []
        for name in names:
            value = params.get(name)
            if name == "negative_prompt" and value is None:
                value = params.get("negative")
            updates.append(gr.skip() if value is None else _coerce(targets[name], value))
        return updates

    read = settings.restore_file.upload(
        read_params, settings.restore_file, settings.restored,
        api_name=api_name or False, api_visibility="public" if api_name else "private", queue=False)
    read.success(apply, settings.restored, list(targets.values()), **UI_EVENT)


def _coerce(component, value):
    """A restored value shaped for its component (numbers for sliders, known choices for dropdowns)."""
    if isinstance(component, gr.Dropdown):
        choices = [c[1] if isinstance(c, tuple) else c for c in (component.choices or [])]
        return value if value in choices else gr.skip()
    if isinstance(component, (gr.Slider, gr.Number)):
        try:
            return float(value) if isinstance(component, gr.Slider) and component.step % 1 else int(value) \
                if float(value).is_integer() else float(value)
        except (TypeError, ValueError):
            return gr.skip()
    if isinstance(component, gr.Checkbox):
        return bool(value)
    if isinstance(component, gr.CheckboxGroup):
        return list(value) if isinstance(value, (list, tuple)) else gr.skip()
    return value if isinstance(value, (str, int, float)) else gr.skip()


def unknown_words_warning(engine, prompt: gr.Textbox) -> gr.Markdown:
    """A warning under `prompt` listing words the model does not know (the built-in model has a small vocabulary)."""
    box = gr.Markdown("", visible=False, elem_classes=["lds-warning"])

    def check(text: str):
        words = engine.unknown_words(text or "") if hasattr(engine, "unknown_words") else []
        if not words:
            return gr.Markdown(value="", visible=False)
        vocab = vocabulary(engine)
        listed = f" Known words: {', '.join(vocab)}." if vocab else ""
        return gr.Markdown(value=f"⚠ The model does not know: **{', '.join(words)}**; they are ignored.{listed}",
                           visible=True)

    prompt.change(check, prompt, box, trigger_mode="always_last", **UI_EVENT)
    return box


def vocabulary(engine) -> list[str]:
    info = engine.info() if hasattr(engine, "info") else {}
    vocab = info.get("vocabulary") or getattr(engine, "vocabulary", None) or []
    return list(vocab() if callable(vocab) else vocab)


# --- cancel ---------------------------------------------------------------------------------------------

class CancelRegistry:
    """Cancel flags keyed by (browser session, tab), shared by the app's process and every process forked from it.

    A browser click first *expects* a run, so that a Cancel while the request still waits in the queue is
    kept; the run then *starts* with that flag (a fresh one for API calls) and Cancel sets it. The app never
    uses gradio's own `cancels=`: its frontend keeps a cancelled event pending until two more round trips
    finish, and a Generate click in that window was silently dropped.

    The flags live in shared memory made when the app is built: on ZeroGPU a run starts and polls its flag in a
    worker process forked from the app's, while Cancel arrives in the app's own process; a flag in one
    process's memory would never reach the other. Each entry is (key id, state, cancelled, serial).
    """

    FREE, WAITING, RUNNING = 0, 1, 2
    _FIELDS = 4

    def __init__(self, slots: int = CANCEL_SLOTS) -> None:
        import multiprocessing

        self._slots = slots
        self._table = multiprocessing.RawArray("q", slots * self._FIELDS)
        self._serial = multiprocessing.RawValue("q", 0)
        self._lock = multiprocessing.Lock()

    @staticmethod
    def _key_id(key: tuple[str, str]) -> int:
        digest = hashlib.blake2b("\0".join(key).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little", signed=True)

    def _entries(self, key_id: int, state: int) -> list[int]:
        t, n = self._table, self._FIELDS
        return [i for i in range(self._slots) if t[i * n + 1] == state and t[i * n] == key_id]

    def _claim(self, key_id: int, state: int) -> tuple[int, int]:
        """A free entry (else the oldest waiting one: a click whose request never ran) set to `state`."""
        t, n = self._table, self._FIELDS
        free = [i for i in range(self._slots) if t[i * n + 1] == self.FREE]
        if not free:
            waiting = [i for i in range(self._slots) if t[i * n + 1] == self.WAITING]
            if not waiting:
                raise RuntimeError(f"{self._slots} requests are running at once, the limit of the cancel registry")
            free = [min(waiting, key=lambda i: t[i * n + 3])]
        self._serial.value += 1
        i = free[0]
        t[i * n: i * n + n] = [key_id, state, 0, self._serial.value]
        return i, self._serial.value

    def expect(self, key: tuple[str, str]) -> None:
        key_id = self._key_id(key)
        with self._lock:
            for i in self._entries(key_id, self.WAITING):  # a new click replaces the last one's flag
                self._table[i * self._FIELDS + 1] = self.FREE
            self._claim(key_id, self.WAITING)

    def start(self, key: tuple[str, str]) -> CancelFlag:
        key_id, n = self._key_id(key), self._FIELDS
        with self._lock:
            waiting = self._entries(key_id, self.WAITING)
            if waiting:  # the click's flag, cancelled or not, becomes the run's
                i = waiting[0]
                self._table[i * n + 1] = self.RUNNING
                return CancelFlag(self, i, self._table[i * n + 3])
            return CancelFlag(self, *self._claim(key_id, self.RUNNING))

    def finish(self, key: tuple[str, str], flag: CancelFlag) -> None:
        with self._lock:
            if flag.current():
                self._table[flag.index * self._FIELDS + 1] = self.FREE

    def cancel(self, key: tuple[str, str]) -> str | None:
        """Set the flag of this key's run: "running", "waiting" (it will not run), or None (nothing to stop)."""
        key_id, n = self._key_id(key), self._FIELDS
        with self._lock:
            running = self._entries(key_id, self.RUNNING)
            if running:
                for i in self._entries(key_id, self.WAITING):  # a second click's leftover must not cancel the next run
                    self._table[i * n + 1] = self.FREE
                for i in running:
                    self._table[i * n + 2] = 1
                return "running"
            waiting = self._entries(key_id, self.WAITING)
            for i in waiting:
                self._table[i * n + 2] = 1
            return "waiting" if waiting else None


class CancelFlag:
    """One run's cancel flag (an entry of a CancelRegistry): `is_set()` / `set()`, readable from any process."""

    def __init__(self, registry: CancelRegistry, index: int, serial: int):
        self.registry, self.index, self.serial = registry, index, serial

    def current(self) -> bool:
        """The entry still belongs to this run (not finished and reused)."""
        return self.registry._table[self.index * CancelRegistry._FIELDS + 3] == self.serial

    def is_set(self) -> bool:
        # A run whose entry is finished (and perhaps reused) was abandoned: nobody waits for it, so it stops.
        return not self.current() or self.registry._table[self.index * CancelRegistry._FIELDS + 2] == 1

    def set(self) -> None:
        with self.registry._lock:
            if self.current():
                self.registry._table[self.index * CancelRegistry._FIELDS + 2] = 1


CANCEL_MESSAGES = {"running": "Cancelling…", "waiting": "Cancelled: it will not run."}


def wire_cancellable(studio: Studio, tab: str, trigger: gr.Button, cancel_button: gr.Button, status, fn: Callable,
                     *, cancel_api_name: str | None = None, **event_kwargs):
    """trigger -> fn on the model queue, with a Cancel button that really stops it.

    Cancel sets the run's flag; the model stops within one step and fn's own last update reports it, so the
    event ends normally and the next click always runs. Returns fn's event (for .success/.then)."""
    def expect_run(request: gr.Request) -> None:
        studio.cancels.expect(session_key(request, tab))

    event = trigger.click(expect_run, None, None, **UI_EVENT).then(fn, **event_kwargs)

    def cancel(request: gr.Request):
        stopped = studio.cancels.cancel(session_key(request, tab))
        return CANCEL_MESSAGES[stopped] if stopped else gr.skip()

    api = dict(api_name=cancel_api_name, api_description=f"Stop this session's running {tab} request.") \
        if cancel_api_name else dict(api_visibility="private")
    cancel_button.click(cancel, None, status, **api,
                        queue=False,  # never waits in (or is refused by) the model queue it is meant to clear
                        show_progress="hidden")
    return event


def session_key(request: gr.Request | None, tab: str) -> tuple[str, str]:
    session = getattr(request, "session_hash", None) or "anonymous"
    return (str(session), tab)


# --- running a task with live previews --------------------------------------------------------------------

@dataclass
class Studio:
    """What the tabs of one app share: the cancel registry, where PNGs go, and the "Send to" links."""

    output_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="lds-outputs-")))
    cancels: CancelRegistry = field(default_factory=CancelRegistry)
    targets: dict[str, tuple[gr.components.Component, str]] = field(default_factory=dict)  # tab -> (input, kind)
    sources: list[tuple[gr.Gallery, gr.State, dict[str, gr.Button]]] = field(default_factory=list)
    # spaces.GPU on a ZeroGPU Space (app.gpu_decorator decides), else None: every event runs in this process.
    # On ZeroGPU each call of a wrapped function runs in a worker process forked from this one (see gpu_event).
    gpu: Callable[..., Callable] | None = None
    pid: int = field(default_factory=os.getpid)  # the app's own process (ZeroGPU workers have other ids)
    # How many times the app's process changed the model's state (adapters), in memory every ZeroGPU worker
    # shares, and the count this process last saw: ZeroGPU may reuse an idle worker forked before a change.
    revision: Any = field(default_factory=lambda: multiprocessing.RawValue("q", 0))
    revision_seen: int = 0
    _revision_lock: threading.Lock = field(default_factory=threading.Lock)
    # Model events admitted at once. The engine still runs one model call at a time (engine.lock); more than
    # one admitted lets queued txt2img requests with the same settings meet in the engine's batcher and run
    # as one call. app.py sets it from the engine's batch_requests and the queue size.
    model_concurrency: int = 1

    @property
    def zero_gpu(self) -> bool:
        return self.gpu is not None

    def in_gpu_worker(self) -> bool:
        """True inside a ZeroGPU worker: what changes here (a new adapter) is gone when the call returns."""
        return os.getpid() != self.pid

    def state_changed(self) -> None:
        """Call in the app's process after changing the model's state: workers forked before now are stale."""
        with self._revision_lock:
            self.revision.value += 1
            self.revision_seen = self.revision.value

    def check_worker(self) -> None:
        """In a ZeroGPU worker: refuse to run on a copy of the app's state that has changed since the fork."""
        if self.in_gpu_worker() and self.revision.value != self.revision_seen:
            raise StaleWorker("This GPU worker started before the last adapter change; running it again in a new one.")

    def gpu_event(self, fn: Callable, seconds: Callable[[dict[str, Any]], float] | None = None) -> Callable:
        """`fn` as a ZeroGPU call on a ZeroGPU Space, `fn` itself elsewhere: the one place events get the GPU.

        `seconds(arguments)` estimates the GPU time of one call from its arguments by name (e.g.
        generation_seconds); ZeroGPU receives it clamped to [ZERO_GPU_MIN_S, ZERO_GPU_MAX_S], as
        `spaces.GPU(duration=...)` with a callable that takes the same arguments as `fn`.

        A reused worker that missed an adapter change refuses the call (StaleWorker) before doing anything;
        spaces drops a worker whose call failed, so the one retry here runs in a freshly forked worker."""
        if self.gpu is None:
            return fn
        signature = inspect.signature(fn)

        def duration(*args, **kwargs) -> int:
            arguments = signature.bind_partial(*args, **kwargs).arguments
            return gpu_duration(seconds(arguments) if seconds is not None else 0.0)

        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def in_worker(*args, **kwargs):
                self.check_worker()
                yield from fn(*args, **kwargs)

            on_gpu = self.gpu(in_worker, duration=duration)

            @functools.wraps(fn)
            def event(*args, **kwargs):
                try:
                    yield from on_gpu(*args, **kwargs)
                except StaleWorker:
                    yield from on_gpu(*args, **kwargs)
        else:
            @functools.wraps(fn)
            def in_worker(*args, **kwargs):
                self.check_worker()
                return fn(*args, **kwargs)

            on_gpu = self.gpu(in_worker, duration=duration)

            @functools.wraps(fn)
            def event(*args, **kwargs):
                try:
                    return on_gpu(*args, **kwargs)
                except StaleWorker:
                    return on_gpu(*args, **kwargs)
        return event

    def model_event(self) -> dict[str, Any]:
        """The queue settings of every model event (one id, so gradio applies one limit to them all)."""
        return dict(concurrency_id=CONCURRENCY_ID, concurrency_limit=self.model_concurrency)

    def register_target(self, tab: str, component, kind: str = "image") -> None:
        """`component` of `tab` receives images sent from any gallery; kind is "image" or "editor"."""
        self.targets[tab] = (component, kind)

    def wire_send_buttons(self, tabs: gr.Tabs | None) -> None:
        """Connect every output panel's "Send to" buttons to the registered inputs (call after all tabs)."""
        for gallery, selected, buttons in self.sources:
            for tab, button in buttons.items():
                if tab not in self.targets:
                    button.visible = False
                    continue
                component, kind = self.targets[tab]
                outputs = [component] + ([tabs] if tabs is not None else [])
                button.click(_sender(kind, tab, tabs is not None), [gallery, selected], outputs, **UI_EVENT)


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


def _sender(kind: str, tab: str, switch: bool):
    def send(gallery_value, index):
        path = pick_image(gallery_value, index)
        if path is None:
            raise gr.Error("Generate an image first, then pick it in the gallery and send it.")
        value = {"background": path, "layers": [], "composite": path} if kind == "editor" else path
        return (value, gr.Tabs(selected=tab)) if switch else value

    return send


def pick_image(gallery_value, index) -> str | None:
    """The file path of gallery item `index` (the first when nothing is selected)."""
    if not gallery_value:
        return None
    index = index if isinstance(index, int) and 0 <= index < len(gallery_value) else 0
    item = gallery_value[index]
    if isinstance(item, (list, tuple)):
        item = item[0]
    if isinstance(item, dict):  # FileData-like
        item = item.get("path") or (item.get("image") or {}).get("path")
    return str(item) if item else None


@dataclass
class OutputPanel:
    preview: gr.Image
    gallery: gr.Gallery
    params: gr.JSON
    status: gr.Markdown
    history: gr.Gallery
    history_state: gr.State
    selected: gr.State
    generate: gr.Button
    cancel: gr.Button

    def outputs(self) -> list:
        """The outputs of a model event, in the order `run_task` yields them."""
        return [self.preview, self.gallery, self.params, self.status]


def output_panel(tab: str, studio: Studio, *, generate_label: str = "Generate") -> OutputPanel:
    """Generate/Cancel buttons, live preview, result gallery (PNG with parameters), history and Send-to buttons."""
    with gr.Row():
        generate = gr.Button(generate_label, variant="primary", elem_id=f"{tab}-generate", scale=3)
        cancel = gr.Button("Cancel", variant="stop", elem_id=f"{tab}-cancel", scale=1)
    status = gr.Markdown("", label="Status", elem_id=f"{tab}-status")
    with gr.Row(equal_height=False):
        preview = gr.Image(label="Live preview", interactive=False, format="png", height=UPSCALED_VIEW_PX,
                           elem_classes=["lds-pixelated"], elem_id=f"{tab}-preview", scale=1)
        gallery = gr.Gallery(label="Result (PNG with parameters)", format="png", type="filepath", columns=2,
                             height=UPSCALED_VIEW_PX + 64, object_fit="contain", interactive=False,
                             elem_classes=["lds-gallery", "lds-pixelated"], elem_id=f"{tab}-gallery", scale=2)
    selected = gr.State(0)
    buttons = {}
    with gr.Row():
        for target in SEND_TARGETS:
            buttons[target] = gr.Button(f"Send to {TAB_LABELS[target]}", size="sm", elem_id=f"{tab}-send-{target}")
    with gr.Accordion("Parameters of this result", open=False):
        params = gr.JSON(label="Parameters", elem_id=f"{tab}-params")
    with gr.Accordion("History (this session)", open=False):
        history = gr.Gallery(label="History", format="png", type="filepath", columns=6, height=220,
                             interactive=False, elem_classes=["lds-gallery", "lds-pixelated"])
    history_state = gr.State([])

    gallery.select(_selected_index, None, selected, **UI_EVENT)
    gallery.change(lambda: 0, None, selected, **UI_EVENT)
    studio.sources.append((gallery, selected, buttons))
    return OutputPanel(preview=preview, gallery=gallery, params=params, status=status, history=history,
                       history_state=history_state, selected=selected, generate=generate, cancel=cancel)


def _selected_index(evt: gr.SelectData) -> int:
    return int(evt.index) if isinstance(evt.index, int) else 0


def wire_model_event(tab: str, studio: Studio, panel: OutputPanel, fn: Callable, *,
                     inputs_kwargs: dict[str, gr.components.Component], api_name: str,
                     api_description: str | None = None, extra_outputs=()) -> None:
    """Generate -> fn (a generator using `run_task`) on the shared model queue; Cancel really stops it.
    `extra_outputs` follow the panel's four outputs (fn then yields those four values and one per extra)."""
    event = wire_cancellable(studio, tab, panel.generate, panel.cancel, panel.status,
                             studio.gpu_event(fn, generation_seconds),
                             cancel_api_name=f"cancel_{tab}", inputs_kwargs=inputs_kwargs,
                             outputs=panel.outputs() + list(extra_outputs), api_name=api_name,
                             api_description=api_description, show_progress="minimal",
                             show_progress_on=[panel.preview], **studio.model_event())
    event.success(_add_history, [panel.gallery, panel.history_state], [panel.history, panel.history_state],
                  **UI_EVENT)


def _add_history(gallery_value, history):
    items = [(pick_image([item], 0), item[1] if isinstance(item, (list, tuple)) else None)
             for item in (gallery_value or [])]
    history = ([item for item in items if item[0]] + list(history or []))[:HISTORY_LIMIT]
    return history, history


def resolve_seed(engine, seed) -> int:
    """-1 (or empty) -> a fresh random seed within the engine's limit; anything else is passed on for the
    pipeline to check."""
    if seed is None or seed == "" or (isinstance(seed, (int, float)) and seed == RANDOM_SEED):
        return random.randint(0, engine.limits.max_seed)
    return seed


def save_pngs(result, out_dir: Path, task_name: str) -> list[tuple[str, str]]:
    """Write each image as PNG with its own reproducible parameters; (path, caption) pairs for a gallery."""
    out_dir.mkdir(parents=True, exist_ok=True)
    items = []
    for i, image in enumerate(result.images):
        params = result.image_params(i) if len(result.images) > 1 else dict(result.params)
        path = out_dir / f"{task_name}-{params.get('seed', 'x')}-{uuid.uuid4().hex[:8]}.png"
        image.save(path, format="PNG", pnginfo=params_to_png_info(params))
        items.append((str(path), f"seed {params.get('seed')}"))
    return items


class BackgroundRun:
    """One request's model work in a worker thread, with this session's Cancel flag and its reports.

    `work(cancel, report)` runs in the thread; `report(item)` hands items to `batches`, which a gradio
    generator turns into UI updates. Use it as a context manager inside that generator: when the browser
    leaves (gradio closes the generator) the model is told to stop at once. `cancelled_before_start` is
    true when Cancel came while the request waited in the queue; then nothing runs.
    """

    _DONE = object()

    def __init__(self, studio: Studio, key: tuple[str, str], work: Callable[[threading.Event, Callable], Any]):
        self.studio, self.key = studio, key
        self.cancel = studio.cancels.start(key)
        self.result: Any = None
        self.error: BaseException | None = None
        self._reports: queue.Queue = queue.Queue()
        self.cancelled_before_start = self.cancel.is_set()
        self._worker = threading.Thread(target=self._run, args=(work,), name=f"lds-{key[1]}", daemon=True)
        if not self.cancelled_before_start:
            self._worker.start()

    def __enter__(self) -> BackgroundRun:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._worker.is_alive():  # the browser left or the job was cancelled: stop the model too
            self.cancel.set()
        self.studio.cancels.finish(self.key, self.cancel)

    def _run(self, work) -> None:
        try:
            self.result = work(self.cancel, self._reports.put)
        except BaseException as e:  # handed to the generator, which turns it into a message
            self.error = e
        finally:
            self._reports.put(self._DONE)

    def batches(self, every_s: float) -> Iterator[list]:
        """The reports gathered since the last batch, at most one batch per `every_s`, and the last ones
        when the work ends. An empty batch comes at least every HEARTBEAT_S: gradio's cancel (a client's
        job.cancel(), a closed browser tab) waits for the generator's next step, so a step never waits on
        the model for long."""
        pending: list = []
        last_sent = 0.0
        while True:
            try:
                item = self._reports.get(timeout=HEARTBEAT_S)
            except queue.Empty:
                yield []
                continue
            while item is not self._DONE:
                pending.append(item)
                try:
                    item = self._reports.get_nowait()
                except queue.Empty:
                    break
            if item is self._DONE:
                if pending:
                    yield pending
                break
            now = time.perf_counter()
            if now - last_sent >= every_s:
                last_sent = now
                yield pending
                pending = []
        self._worker.join()


def run_task(engine, studio: Studio, tab: str, fn: Callable, kwargs: dict[str, Any], *,
             request: gr.Request | None, progress: gr.Progress | None) -> Iterator[tuple]:
    """Run task `fn(engine, **kwargs, on_step=, cancel=)` in a worker thread, yielding UI updates.

    Yields (preview, gallery, params, status) tuples: live previews while denoising, then the PNGs.
    Errors the user can fix become gr.Error with the pipeline's sentence; a model error becomes a
    gr.Error for this user only; Cancel ends the run early with a status line.
    """
    started = time.perf_counter()
    step = total = 0
    with BackgroundRun(studio, session_key(request, tab), lambda cancel, report: fn(
            engine, **kwargs, cancel=cancel,
            on_step=lambda step, total, preview=None: report((step, total, preview)))) as run:
        if run.cancelled_before_start:
            yield (gr.skip(), gr.skip(), gr.skip(), "Cancelled before it started.")
            return
        yield (gr.skip(), gr.skip(), gr.skip(), "Waiting for the model…")
        for reports in run.batches(PREVIEW_EVERY_S):
            if not reports:
                yield (gr.skip(),) * 4
                continue
            step, total, _ = reports[-1]
            latest_preview = next((preview for *_, preview in reversed(reports) if preview is not None), None)
            if progress is not None and total:
                progress((step, total), desc=f"Denoising step {step}/{total}")
            # The step count goes out even between previews (they are rationed by their cost), so the
            # status always shows the run moving.
            yield (
                gr.skip() if latest_preview is None else latest_preview,
                gr.skip(),
                gr.skip(),
                f"Step {step}/{total}",
            )

    if isinstance(run.error, Cancelled):
        yield (gr.skip(), gr.skip(), gr.skip(), f"Cancelled at step {step} of {total}." if total else "Cancelled.")
        return
    if run.error is not None:
        raise user_error(run.error)
    result = run.result
    items = save_pngs(result, studio.output_dir, tab)
    seconds = time.perf_counter() - started
    first = result.images[0] if result.images else None
    status = f"Done: {len(result.images)} image(s) in {seconds:.1f} s · seed {result.params.get('seed')}"
    if first is not None:
        status += f" · {first.width}x{first.height}"
    unknown = engine.unknown_words(kwargs.get("prompt") or "") if hasattr(engine, "unknown_words") else []
    if unknown:
        status += f"\n\n⚠ Words the model does not know were ignored: {', '.join(unknown)}"
    for note in result.params.get("warnings", []) or []:
        status += f"\n\n⚠ {note}"
    hidden = withheld(result.images)
    if hidden:
        status += (f"\n\n⚠ {hidden} of {len(result.images)} image(s) withheld by the safety checker: "
                   f"a notice stands in for each.")
    yield (first, items, result.params, status)


def user_error(error: BaseException) -> gr.Error:
    """The message a browser user or API client sees for `error`."""
    if isinstance(error, gr.Error):
        return error
    if isinstance(error, InputError):
        return gr.Error(str(error), title="Invalid input", print_exception=False)
    if isinstance(error, ModelNotAvailable):
        return gr.Error(str(error), title="Model not available")
    if isinstance(error, (ModelError, RuntimeError, MemoryError)):
        return gr.Error(f"The model failed during this run ({error}). Nothing is broken: try again, "
                        f"or use a smaller size, batch or number of steps.", title="Model error")
    if isinstance(error, ValueError):
        return gr.Error(str(error), title="Invalid input")
    return gr.Error(f"Unexpected error ({type(error).__name__}: {error}).", title="Error")


def open_image(value) -> Image.Image | None:
    """An upload as a PIL image with EXIF orientation applied (pipelines normalise mode and size)."""
    if value is None:
        return None
    if isinstance(value, (str, Path)):
        with Image.open(value) as im:
            im.load()
            value = im.copy() if im.format != "MPO" else im.convert("RGB")
    try:
        return ImageOps.exif_transpose(value)
    except Exception:
        return value


def example_files(*names: str) -> list[str]:
    """Paths of example inputs in assets/examples that exist (the folder is generated by scripts/make_examples.py)."""
    return [str(EXAMPLES_DIR / name) for name in names if (EXAMPLES_DIR / name).is_file()]
