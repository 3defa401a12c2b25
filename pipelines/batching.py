"""Queued txt2img requests with the same settings run as one batched pipeline call.

While the engine is busy, requests wait. One of them at a time is the *leader*: once it has engine.lock it
takes every waiting request whose settings match its own (size, steps, guidance, scheduler; prompts,
negative prompts, seeds and batch sizes may differ), up to `limits.batch_requests` images, and runs them as
one call with one CPU generator per image (seed + i, exactly as a solo run). The requests it took are
answered when it finishes; the rest elect the next leader. A request that waits alone makes the same call
as an unbatched run (same bytes).

Equality: the initial noise, prompts and scheduler maths are per image, so a merged image is its solo image
up to float rounding of batched kernels (a few 1e-6 in [0, 1] on CPU: a pixel now and then one level
off out of 255); tests/test_batching.py checks it. Off by default (LDS_BATCH_REQUESTS=1);
LDS_BATCH_REQUESTS=8 turns it on.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from PIL import Image

from pipelines.common import Cancelled
from pipelines.request import Request, merged_kwargs
from pipelines.run import CancelEvent, OnStep, PreviewClock, call_view, resolve_adapters, run_pipeline, view_for


@dataclass(eq=False)
class Waiting:
    """One txt2img request waiting for the model, and what becomes of it."""

    request: Request
    on_step: OnStep | None = None
    cancel: CancelEvent | None = None
    images: list[Image.Image] | None = None
    error: BaseException | None = None
    done: bool = False
    skipped: bool = False  # cancelled or its callback failed: no more callbacks, no images

    @property
    def count(self) -> int:
        return self.request.count

    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()


class RequestBatcher:
    """Leader/follower merging of compatible txt2img requests (one per engine: `engine.batcher`).

    One leader at a time waits for engine.lock, takes the waiting requests that match its own, runs them and
    wakes everyone; a request another leader took is answered at once (it never waits for the engine again).
    """

    def __init__(self, engine):
        self.engine = engine
        self._pending: list[Waiting] = []
        self._cond = threading.Condition()  # guards _pending and _leading; model work is under engine.lock
        self._leading = False

    def run(self, waiting: Waiting) -> list[Image.Image]:
        """Run a waiting request (alone or merged with others waiting); returns its images or raises its error."""
        lock_owned = getattr(self.engine.lock, "_is_owned", None)
        if lock_owned is not None and lock_owned():  # called from inside model work: run it, wait for nobody
            with self.engine.lock:
                self._execute([waiting])
            return self._answer(waiting)
        with self._cond:
            self._pending.append(waiting)
            try:
                while self._leading and not waiting.done:
                    self._cond.wait()
            except BaseException:
                self._pending.remove(waiting)
                raise
            if waiting.done:  # a leader ran it
                return self._answer(waiting)
            self._leading = True
        try:
            with self.engine.lock:
                self._execute(self._take(waiting))
        finally:
            with self._cond:
                if waiting in self._pending:  # only if something failed before it was taken
                    self._pending.remove(waiting)
                self._leading = False
                self._cond.notify_all()
        return self._answer(waiting)

    @staticmethod
    def _answer(waiting: Waiting) -> list[Image.Image]:
        if waiting.error is not None:
            raise waiting.error
        return waiting.images

    def _take(self, leader: Waiting) -> list[Waiting]:
        """The leader and the waiting requests that can share its call. The caller holds engine.lock: the
        adapters of every request looked at are worked out now; the ones taken keep theirs (they run in this
        same hold of the lock), the others drop them, since adapters may change before they run."""
        limit = max(1, self.engine.limits.batch_requests)
        with self._cond:
            key = self._key(leader)
            batch, images = [leader], leader.count
            for other in self._pending:
                if other is leader or images + other.count > limit or self._key(other) != key:
                    continue
                if other.cancelled():  # cancelled while waiting: answer it now, run nothing for it
                    other.error, other.done = Cancelled("cancelled before the first step"), True
                    continue
                batch.append(other)
                images += other.count
            for waiting in batch:
                self._pending.remove(waiting)
            self._pending = [w for w in self._pending if not w.done]
            for waiting in self._pending:
                waiting.request.adapters = None
        return batch

    def _key(self, waiting: Waiting) -> tuple:
        resolve_adapters(self.engine, waiting.request)
        return waiting.request.batch_key

    def _execute(self, batch: list[Waiting]) -> None:
        engine = self.engine
        try:
            if len(batch) == 1:
                waiting = batch[0]
                waiting.images = run_pipeline(engine, waiting.request, on_step=waiting.on_step, cancel=waiting.cancel)
            else:
                self._execute_merged(batch)
        except BaseException as error:
            for waiting in batch:
                if waiting.error is None:
                    waiting.error = error
        finally:
            for waiting in batch:
                waiting.done = True

    def _execute_merged(self, batch: list[Waiting]) -> None:
        engine = self.engine
        requests = [w.request for w in batch]
        offsets, start = [], 0
        for request in batch:
            offsets.append(start)
            start += request.count
        clock = PreviewClock(engine)

        def on_step_end(pipe, i: int, t, callback_kwargs: dict) -> dict:
            total = int(getattr(pipe, "num_timesteps", 0) or 0)
            active = [(r, o) for r, o in zip(batch, offsets) if not r.skipped]
            watching = [(r, o) for r, o in active if r.on_step is not None and not r.cancelled()]
            previews: list = [None] * len(watching)
            if watching and clock.due():
                started = time.perf_counter()
                previews = engine.previews(callback_kwargs["latents"][[o for _, o in watching]])
                clock.made(time.perf_counter() - started)
            for (request, _), preview in zip(watching, previews):
                try:
                    request.on_step(i + 1, total, preview)
                except Exception as error:  # this request's UI failed; the others go on
                    request.skipped, request.error = True, error
            for request, _ in active:  # as run_pipeline: a cancel seen at the end of step i stops after step i
                if not request.skipped and request.cancelled():
                    request.skipped, request.error = True, Cancelled(f"cancelled after step {i + 1}")
            if all(r.skipped for r in batch):  # everyone left: stop the whole call
                pipe._interrupt = True
            return {}

        view = view_for(engine, requests[0])
        images = call_view(engine, view, requests[0].adapters, on_step_end, **merged_kwargs(requests))
        for request, offset in zip(batch, offsets):
            if request.error is None:
                request.images = images[offset:offset + request.count]
