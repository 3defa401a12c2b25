"""Queued txt2img requests with the same settings run as one batched pipeline call.

While the engine is busy, requests wait. One of them at a time is the *leader*: once it has engine.lock it
takes every waiting request whose settings match its own (size, steps, guidance, scheduler; prompts,
negative prompts, seeds and batch sizes may differ), up to `limits.batch_requests` images, and runs them as
one call with one CPU generator per image (seed + i, exactly as a solo run). The requests it took are
answered when it finishes; the rest elect the next leader. A request that waits alone runs exactly as
before (same call, same bytes).

Equality: the initial noise, prompts and scheduler maths are per image, so a merged image is its solo image
up to float rounding of batched kernels (a few 1e-6 in [0, 1] on CPU: a pixel now and then one level
off out of 255); tests/test_batching.py checks it. Off by default (LDS_BATCH_REQUESTS=1);
LDS_BATCH_REQUESTS=8 turns it on.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from PIL import Image

from pipelines.common import Cancelled
from pipelines.run import CancelEvent, OnStep, PreviewClock, call_view, generators, run_pipeline


@dataclass(eq=False)
class Request:
    """One txt2img request waiting for the model."""

    scheduler: str
    shared: dict[str, Any]  # call arguments that must match to share a call: width, height, steps, guidance
    prompt: str
    negative_prompt: str
    seed: int
    count: int  # images (batch_size); image i uses seed + i
    adapters: tuple[str, ...] = ()  # adapters the prompt switches on: requests share a call only with the same ones
    on_step: OnStep | None = None
    cancel: CancelEvent | None = None
    images: list[Image.Image] | None = None
    error: BaseException | None = None
    done: bool = False
    skipped: bool = False  # cancelled or its callback failed: no more callbacks, no images

    @property
    def key(self) -> tuple:
        return (self.scheduler, tuple(sorted(self.shared.items())), self.adapters)

    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()


class RequestBatcher:
    """Leader/follower merging of compatible txt2img requests (one per engine: `engine.batcher`).

    One leader at a time waits for engine.lock, takes the waiting requests that match its own, runs them and
    wakes everyone; a request another leader took is answered at once (it never waits for the engine again).
    """

    def __init__(self, engine):
        self.engine = engine
        self._pending: list[Request] = []
        self._cond = threading.Condition()  # guards _pending and _leading; model work is under engine.lock
        self._leading = False

    def run(self, request: Request) -> list[Image.Image]:
        """Run `request` (alone or merged with others waiting); returns its images or raises its error."""
        lock_owned = getattr(self.engine.lock, "_is_owned", None)
        if lock_owned is not None and lock_owned():  # called from inside model work: run it, wait for nobody
            with self.engine.lock:
                self._execute([request])
            return self._answer(request)
        with self._cond:
            self._pending.append(request)
            try:
                while self._leading and not request.done:
                    self._cond.wait()
            except BaseException:
                self._pending.remove(request)
                raise
            if request.done:  # a leader ran it
                return self._answer(request)
            self._leading = True
        try:
            with self.engine.lock:
                self._execute(self._take(request))
        finally:
            with self._cond:
                if request in self._pending:  # only if something failed before it was taken
                    self._pending.remove(request)
                self._leading = False
                self._cond.notify_all()
        return self._answer(request)

    @staticmethod
    def _answer(request: Request) -> list[Image.Image]:
        if request.error is not None:
            raise request.error
        return request.images

    def _take(self, leader: Request) -> list[Request]:
        limit = max(1, int(getattr(self.engine.limits, "batch_requests", 1)))
        with self._cond:
            batch, images = [leader], leader.count
            for other in self._pending:
                if other is leader or other.key != leader.key or images + other.count > limit:
                    continue
                if other.cancelled():  # cancelled while waiting: answer it now, run nothing for it
                    other.error, other.done = Cancelled("cancelled before the first step"), True
                    continue
                batch.append(other)
                images += other.count
            for request in batch:
                self._pending.remove(request)
            self._pending = [r for r in self._pending if not r.done]
        return batch

    def _execute(self, batch: list[Request]) -> None:
        engine = self.engine
        try:
            view = engine.pipeline("txt2img", scheduler=batch[0].scheduler)
            if len(batch) == 1:
                request = batch[0]
                request.images = run_pipeline(
                    engine, view, on_step=request.on_step, cancel=request.cancel,
                    prompt=request.prompt, negative_prompt=request.negative_prompt or None,
                    num_images_per_prompt=request.count, generator=generators(request.seed, request.count),
                    **request.shared)
            else:
                self._execute_merged(view, batch)
        except BaseException as error:
            for request in batch:
                if request.error is None:
                    request.error = error
        finally:
            for request in batch:
                request.done = True

    def _execute_merged(self, view, batch: list[Request]) -> None:
        engine = self.engine
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

        images = call_view(
            engine, view, on_step_end,
            prompt=[r.prompt for r in batch for _ in range(r.count)],
            negative_prompt=[r.negative_prompt for r in batch for _ in range(r.count)],  # "" is what None means
            num_images_per_prompt=1,
            generator=[g for r in batch for g in generators(r.seed, r.count)],
            **batch[0].shared)
        for request, offset in zip(batch, offsets):
            if request.error is None:
                request.images = images[offset:offset + request.count]
