"""Running a task for a tab: the model work in a worker thread with this session's cancel flag, its progress
turned into UI updates, the results saved as PNGs with their parameters, errors turned into messages."""
from __future__ import annotations

import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import gradio as gr

from demo.cancelling import session_key
from demo.studio import Studio
from pipelines.common import (
    Cancelled,
    InputError,
    ModelError,
    ModelNotAvailable,
    params_to_png_info,
    withheld,
)
from pipelines.settings import PREVIEW_EVERY_S

HEARTBEAT_S = 0.5  # a running request's generator hands control back to gradio at least this often
# A run sends no status or step update before this: one that ends sooner (a distilled image, a small run on the fast
# backend) sends only its result, since each update is one more message through gradio's queue and the page, as
# long as the model work itself at these speeds (README, Performance: the web layer's share)
QUIET_START_S = 0.25


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
        waiting_shown = False
        for reports in run.batches(PREVIEW_EVERY_S):
            if reports:
                step, total, _ = reports[-1]
            if time.perf_counter() - started < QUIET_START_S:
                continue
            if not reports:
                yield (gr.skip(),) * 3 + (gr.skip() if waiting_shown or step else "Waiting for the model…",)
                waiting_shown = True
                continue
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
    unknown = engine.unknown_words(kwargs.get("prompt") or "")
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
