"""Queued txt2img requests with the same settings run as one call (pipelines/batching.py), and each image
equals its solo run: same seed per image, same prompt, same scheduler maths; only batched kernels may round
differently (a few 1e-6 on CPU), so at most one level of 255 on a pixel now and then."""
from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest

from pipelines import txt2img
from pipelines.common import Cancelled

SETTINGS = dict(steps=3, guidance=4.0, scheduler="DPM++ 2M", width=64, height=64)
REQUESTS = [
    dict(prompt="a red circle left of a blue square", seed=1),
    dict(prompt="a big yellow star on grass", seed=2, batch_size=2),
    dict(prompt="a green person waving on sand", seed=3, negative_prompt="red"),
    dict(prompt="a red circle", seed=4),
]
MAX_LEVEL_DIFF = 1  # uint8 levels a merged image may differ from its solo run (float rounding of batched kernels)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


class UnetCalls:
    """Counts U-Net forward calls and the batch rows of each."""

    def __init__(self, engine):
        self.rows: list[int] = []
        self.handle = engine.base.unet.register_forward_pre_hook(lambda m, args: self.rows.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def run_together(engine, requests, *, on_steps=None, cancels=None) -> list:
    """Start every request while the engine is busy, so all of them are waiting when it frees up."""
    results: list = [None] * len(requests)

    def call(i):
        try:
            results[i] = txt2img.generate(engine, **SETTINGS, **requests[i],
                                          on_step=on_steps[i] if on_steps else None,
                                          cancel=cancels[i] if cancels else None)
        except BaseException as error:  # noqa: BLE001  (handed back to the test)
            results[i] = error

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    with engine.lock:  # "a long run is going on"
        for thread in threads:
            thread.start()
        deadline = time.time() + 30
        while len(engine.batcher._pending) < len(requests) and time.time() < deadline:
            time.sleep(0.01)
        assert len(engine.batcher._pending) == len(requests)
    for thread in threads:
        thread.join(120)
    return results


@pytest.fixture
def engine(shapes_engine, monkeypatch):
    monkeypatch.setattr(shapes_engine, "limits", dataclasses.replace(shapes_engine.limits, batch_requests=8))
    return shapes_engine


def test_waiting_requests_with_same_settings_run_as_one_call_and_equal_solo_runs(engine):
    solo = [txt2img.generate(engine, **SETTINGS, **r) for r in REQUESTS]
    with UnetCalls(engine) as calls:
        merged = run_together(engine, REQUESTS)
    images = sum(r.get("batch_size", 1) for r in REQUESTS)
    assert calls.rows == [2 * images] * SETTINGS["steps"]  # one call: every image, with CFG's unconditional half
    worst = 0
    for alone, together in zip(solo, merged):
        assert not isinstance(together, BaseException), together
        assert together.params == alone.params  # each request keeps its own seed, prompt and PNG parameters
        assert len(together.images) == len(alone.images)
        for a, b in zip(alone.images, together.images):
            worst = max(worst, int(np.abs(pixels(a) - pixels(b)).max()))
    assert worst <= MAX_LEVEL_DIFF, f"merged images differ from solo runs by up to {worst} levels"


def test_a_merged_request_is_answered_without_waiting_for_the_engine_again(engine):
    # After the merged call, someone else takes the engine for a long time: the follower must not wait for it.
    hold, holding = threading.Event(), threading.Event()

    def blocker():
        with engine.lock:
            holding.set()
            hold.wait(300)

    started = []

    def on_last_step(i, n, preview):
        if i == n and not started:  # the leader still holds the lock: the blocker gets it right after
            started.append(threading.Thread(target=blocker))
            started[0].start()

    try:
        results = run_together(engine, REQUESTS[:2], on_steps=[on_last_step, on_last_step])  # joins for <= 120 s
        assert holding.wait(30)
        assert [len(r.images) for r in results] == [1, 2]  # both answered while the lock is held
    finally:
        hold.set()
        for thread in started:
            thread.join(30)


def test_called_inside_model_work_runs_at_once(engine):
    with engine.lock:  # e.g. a task that already holds the engine and makes a txt2img image on the way
        result = txt2img.generate(engine, **SETTINGS, **REQUESTS[0])
    assert len(result.images) == 1


def test_different_settings_are_not_merged(engine):
    extras = [{}, {"scheduler": "DDIM"}, {"steps": 2}]  # default / other scheduler / other step count
    results, threads = [], []

    def call(extra):
        results.append(txt2img.generate(engine, **{**SETTINGS, **extra}, prompt="a red circle", seed=1))

    with UnetCalls(engine) as calls:
        with engine.lock:
            for extra in extras:
                threads.append(threading.Thread(target=call, args=(extra,)))
                threads[-1].start()
            while len(engine.batcher._pending) < len(extras):
                time.sleep(0.01)
        for thread in threads:
            thread.join(120)
    assert len(results) == 3
    assert calls.rows == [2] * (3 + 3 + 2)  # three calls of one image each


def test_batch_requests_1_turns_merging_off(engine, monkeypatch):
    monkeypatch.setattr(engine, "limits", dataclasses.replace(engine.limits, batch_requests=1))
    with UnetCalls(engine) as calls:
        results = run_together(engine, REQUESTS[:3:2])
    assert all(not isinstance(r, BaseException) for r in results)
    assert calls.rows == [2] * (2 * SETTINGS["steps"])


def test_each_merged_request_gets_its_own_progress_and_previews(engine, monkeypatch):
    monkeypatch.setattr(engine, "preview_every_s", 0)
    seen = [[] for _ in REQUESTS]
    on_steps = [lambda i, n, p, k=k: seen[k].append((i, n, p)) for k in range(len(REQUESTS))]
    results = run_together(engine, REQUESTS, on_steps=on_steps)
    assert all(not isinstance(r, BaseException) for r in results)
    for steps in seen:
        assert [(i, n) for i, n, _ in steps] == [(s, SETTINGS["steps"]) for s in range(1, SETTINGS["steps"] + 1)]
        assert all(p is not None and p.size == (64, 64) for _, _, p in steps)
    # request k's preview is its own image: the last previews differ between different prompts/seeds
    assert pixels(seen[0][-1][2]).tolist() != pixels(seen[2][-1][2]).tolist()


def test_a_cancelled_request_leaves_the_merged_call_and_the_others_finish(engine):
    cancel_waiting, cancel_running = threading.Event(), threading.Event()
    cancel_waiting.set()  # cancelled while waiting for the engine: never runs

    def stop_at_two(i, n, preview):
        if i == 2:
            cancel_running.set()

    requests = REQUESTS[:3]
    results = run_together(engine, requests, on_steps=[None, stop_at_two, None],
                           cancels=[None, cancel_running, cancel_waiting])
    assert not isinstance(results[0], BaseException) and len(results[0].images) == 1
    assert isinstance(results[1], Cancelled) and "step 2" in str(results[1])
    assert isinstance(results[2], Cancelled)


def test_everyone_cancelled_stops_the_call(engine):
    cancels = [threading.Event(), threading.Event()]

    def stop_all(i, n, preview):
        for c in cancels:
            c.set()

    with UnetCalls(engine) as calls:
        results = run_together(engine, REQUESTS[:3:2], on_steps=[stop_all, None], cancels=cancels)
    assert all(isinstance(r, Cancelled) for r in results)
    assert len(calls.rows) <= 2  # stopped after the first step (at most one more U-Net call)


def test_model_error_reaches_every_merged_request_and_the_engine_recovers(engine):
    def fail(module, args):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    handle = engine.base.unet.register_forward_pre_hook(fail)
    try:
        results = run_together(engine, REQUESTS[:2])
    finally:
        handle.remove()
    assert all("out of memory" in str(r) for r in results)
    assert len(txt2img.generate(engine, **SETTINGS, **REQUESTS[0]).images) == 1


def test_app_admits_enough_model_events_to_merge_but_keeps_the_queue_bound():
    import app

    class FakeEngine:
        limits = dataclasses.make_dataclass("L", [("batch_requests", int)])(8)

    assert app.model_concurrency(FakeEngine(), app.AppSettings(queue_size=20)) == 8
    assert app.model_concurrency(FakeEngine(), app.AppSettings(queue_size=1)) == 2
    assert app.model_concurrency(FakeEngine(), app.AppSettings(queue_size=20), zero_gpu=True) == 1
    FakeEngine.limits.batch_requests = 1
    assert app.model_concurrency(FakeEngine(), app.AppSettings(queue_size=20)) == 8  # merging off: still admitted
