"""Eight clients on different tabs at once: all succeed, no cross-talk, each output equal to its solo run.
Cancel really stops a run (the Cancel endpoint, and gradio_client's own job.cancel())."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from gradio_client import handle_file

from tests.test_api import common_args, controlnet_args, editor, gallery_paths


def requests(images, engine) -> list[tuple[str, dict]]:
    scene = lambda: handle_file(str(images["scene.png"]))  # noqa: E731  (a fresh upload per call)
    style = next(iter(engine.preset.style_presets), "")
    calls = [
        ("/txt2img", dict(prompt="a red circle", width=64, height=64, **common_args(seed=1))),
        ("/txt2img", dict(prompt="a blue square on grass", width=64, height=48, **common_args(seed=2, batch_size=2))),
        (
            "/inpaint",
            dict(
                image=editor(images["scene.png"]),
                prompt="a star",
                strength=1.0,
                mask_blur=1,
                mask=handle_file(str(images["mask_right_half.png"])),
                **common_args(seed=3),
            ),
        ),
        (
            "/outpaint",
            dict(image=scene(), prompt="grass", directions=["right"], pixels=16, fill="edge", **common_args(seed=4)),
        ),
        (
            "/style",
            dict(
                image=scene(),
                style=style,
                prompt="a circle",
                strength=0.6,
                mode="img2img",
                control="canny",
                conditioning_scale=1.0,
                **common_args(seed=5),
            ),
        ),
        (
            "/preprocess",
            dict(image=scene(), control_type="canny", preprocessor="canny", low_threshold=50, high_threshold=150),
        ),
        (
            "/txt2img",
            dict(prompt="a pink heart at night", width=64, height=64, **common_args(seed=6, scheduler="DDIM")),
        ),
    ]
    if "canny" in engine.control_types:
        calls.append(("/controlnet", controlnet_args(images["scene.png"], seed=8)))
    else:
        calls.append(("/inpaint", dict(image=editor(images["scene.png"]), prompt="a heart", strength=0.8, mask_blur=0,
                                       mask=handle_file(str(images["mask_full.png"])), **common_args(seed=8))))
    return calls


def output_bytes(result) -> list[bytes]:
    paths = [result] if isinstance(result, str) else gallery_paths(result[1])
    out = []
    for path in paths:
        with open(path, "rb") as f:
            out.append(f.read())
    return out


def test_eight_clients_at_once_match_their_solo_runs(live_app, images):
    calls = requests(images, live_app.engine)
    assert len(calls) == 8
    solo = [output_bytes(live_app.client().predict(**kwargs, api_name=name)) for name, kwargs in calls]

    clients = [live_app.client() for _ in calls]  # one browser session each
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(c.predict, **kwargs, api_name=name) for c, (name, kwargs) in zip(clients, calls)]
        together = [output_bytes(f.result(timeout=300)) for f in futures]
    for (name, _), alone, crowd in zip(calls, solo, together):
        assert crowd == alone, f"{name} differs when run alongside other clients"


def long_run(engine) -> dict:
    return dict(prompt="a red circle", width=engine.limits.max_size, height=engine.limits.max_size,
                **common_args(steps=engine.limits.max_steps, batch_size=engine.limits.max_batch))


def wait_for_progress(job, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        outputs = job.outputs() or []
        if outputs and str(outputs[-1][3]).startswith("Step"):
            return
        time.sleep(0.05)
    pytest.fail("the long run never reported a denoising step")


def test_cancel_button_stops_the_model(live_app):
    client = live_app.client()
    job = client.submit(**long_run(live_app.engine), api_name="/txt2img")
    wait_for_progress(job)
    started = time.time()
    assert client.predict(api_name="/cancel_txt2img") == "Cancelling…"
    _, gallery, _, status = job.result(timeout=60)
    assert time.time() - started < 30
    assert status.startswith("Cancelled at step")
    step, total = [int(w) for w in status.rstrip(".").split() if w.isdigit()]
    assert step < total == live_app.engine.limits.max_steps
    # the engine is free again right away
    assert live_app.client().predict(prompt="x", width=64, height=64, **common_args(steps=1), api_name="/txt2img")


def test_cancel_affects_only_its_own_session(live_app):
    runner, other = live_app.client(), live_app.client()
    job = runner.submit(prompt="a red circle", width=64, height=64, **common_args(steps=40), api_name="/txt2img")
    wait_for_progress(job)
    other.predict(api_name="/cancel_txt2img")  # another session's Cancel: nothing of theirs runs
    _, gallery, params, status = job.result(timeout=120)
    assert status.startswith("Done") and len(gallery) == 1


def test_client_side_cancel_frees_the_model(live_app):
    client = live_app.client()
    job = client.submit(**long_run(live_app.engine), api_name="/txt2img")
    wait_for_progress(job)
    started = time.time()
    job.cancel()
    live_app.client().predict(prompt="x", width=64, height=64, **common_args(steps=1), api_name="/txt2img")
    assert time.time() - started < 30  # the abandoned run stopped instead of finishing all its steps


def test_cancel_registry_keeps_a_cancel_made_while_the_request_waits():
    from demo.cancelling import CancelRegistry

    registry, key = CancelRegistry(), ("session", "txt2img")
    assert registry.cancel(key) is None  # nothing clicked, nothing to stop
    registry.expect(key)  # Generate clicked; the request waits in the queue
    assert registry.cancel(key) == "waiting"
    assert registry.start(key).is_set()  # when its turn comes it does not run
    registry.expect(key)  # the next click starts clean
    running = registry.start(key)
    assert not running.is_set()
    registry.expect(key)  # a second click while it runs (the browser drops that run) ...
    assert registry.cancel(key) == "running" and running.is_set()  # ... Cancel stops the one that runs
    registry.finish(key, running)
    assert not registry.start(key).is_set()  # and the second click's leftover flag cancels nothing later


def test_a_request_cancelled_in_the_queue_never_reaches_the_model(tmp_path):
    from demo.cancelling import session_key
    from demo.running import run_task
    from demo.studio import Studio

    class Request:
        session_hash = "queued"

    studio = Studio(output_dir=tmp_path)
    studio.cancels.expect(session_key(Request(), "txt2img"))
    studio.cancels.cancel(session_key(Request(), "txt2img"))
    called = []
    updates = list(run_task(object(), studio, "txt2img", lambda *a, **k: called.append(1), {}, request=Request(),
                            progress=None))
    assert called == [] and updates[-1][3] == "Cancelled before it started."
    assert studio.cancels.cancel(session_key(Request(), "txt2img")) is None  # nothing left behind
