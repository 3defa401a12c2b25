"""Every model call of the process runs on one OS thread (pipelines/compute.py).

Why it matters (no timing asserted here): libgomp keeps an OpenMP worker pool per thread that has run a
parallel op, and once the pools together outnumber the CPUs every op waits for a wake-up. A request that
runs its model calls on its own fresh thread made the app's task path 2.65x a plain diffusers call on 2
cores. These tests fail if model work runs anywhere but the model thread.
"""
import threading

import pytest

SETTINGS = dict(prompt="a red circle", negative_prompt="", steps=2, guidance=4.0, width=64, height=64)


@pytest.fixture
def model_threads(shapes_engine):
    """The ids of the threads the U-Net, the VAE decoder and the text encoder run on, while the fixture lives."""
    seen: set[int] = set()
    base = shapes_engine.base
    handles = [module.register_forward_pre_hook(lambda *_: seen.add(threading.get_ident()))
               for module in (base.unet, base.vae.decoder, base.text_encoder)]
    yield seen
    for handle in handles:
        handle.remove()


def test_requests_from_any_thread_run_the_model_on_the_engines_model_thread(shapes_engine, model_threads):
    from demo.running import run_task
    from demo.studio import Studio
    from pipelines import txt2img

    txt2img.generate(shapes_engine, seed=1, **SETTINGS)  # from this thread
    worker = threading.Thread(target=lambda: txt2img.generate(shapes_engine, seed=2, **SETTINGS))
    worker.start()
    worker.join(120)
    studio = Studio()
    updates = list(run_task(shapes_engine, studio, "txt2img", txt2img.generate, dict(SETTINGS, seed=3),
                               request=None, progress=None))  # the app's path: a worker thread per request
    assert updates[-1][1], "the task made no image"
    assert model_threads == {shapes_engine.compute.ident}
    assert shapes_engine.compute.ident != threading.get_ident()


def test_one_model_thread_per_process(shapes_engine, sd_engine):
    # A second engine's own thread would be a second OpenMP pool: the slowdown this avoids.
    assert shapes_engine.compute.thread is sd_engine.compute.thread


def test_model_work_uses_the_engines_thread_count_whoever_calls(tiny_presets, monkeypatch):
    """All usable cores but one on CPU (the web server keeps one); an explicit count wins; callers' own counts
    (a benchmark's, a test's) do not leak into the engine's jobs."""
    import os

    import torch

    from pipelines.compute import default_decode_threads, default_threads
    from pipelines.engine import Engine

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert default_threads("cpu") == 3 and default_decode_threads("cpu") == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert default_threads("cpu") == 1 and default_decode_threads("cpu") == 1
    engine = Engine(tiny_presets["shapes"], device="cpu", threads=2)
    assert engine.threads == 2 and engine.info()["threads"] == 2
    assert engine.decode_threads == 2  # an explicit count sets the decode's too
    assert engine.info()["decode_threads"] is None  # only the onnx backend decodes on its own threads
    assert engine.compute.run(torch.get_num_threads) == 2
    assert engine.compute.thread.run(torch.get_num_threads) == torch.get_num_threads()  # a plain job: the caller's


def test_model_thread_hands_back_results_and_errors_and_runs_nested_calls_inline(shapes_engine):
    compute = shapes_engine.compute
    assert compute.run(lambda a, *, b: a + b, 1, b=2) == 3
    assert compute.run(lambda: compute.run(threading.get_ident)) == compute.ident  # no deadlock when nested
    with pytest.raises(ZeroDivisionError):
        compute.run(lambda: 1 / 0)
    assert compute.run(lambda: "still running") == "still running"
