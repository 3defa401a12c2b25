"""The Studio: what the tabs of one app share (cancel flags, where PNGs go, the GPU decorator, the model
queue's settings, the "Send to" links between tabs)."""
from __future__ import annotations

import functools
import inspect
import multiprocessing
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from demo.cancelling import CancelRegistry
from demo.common import UI_EVENT
from demo.zerogpu import StaleWorker, gpu_duration

CONCURRENCY_ID = "model"  # every event that touches the model shares this id and one concurrency limit

MODEL_EVENT = dict(concurrency_id=CONCURRENCY_ID, concurrency_limit=1)  # Studio.model_event() when batching


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
