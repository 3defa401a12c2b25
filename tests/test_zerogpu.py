"""ZeroGPU's process model, here: every GPU call in a process forked from the app's (tests/zerogpu/spaces, a
double of `spaces.GPU`), and the real app started as a ZeroGPU Space starts it (`python app.py` with
SPACES_ZERO_GPU set), on the built-in model, called through gradio_client on a real port."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

from tests.conftest import REPO, free_port
from tests.test_api import common_args, editor, gallery_paths

DOUBLE = REPO / "tests" / "zerogpu"  # the folder holding the double's `spaces` package
TIME_SCALE = 20  # the double's durations x this: the app's durations are for a GPU, these runs use one CPU core


@pytest.fixture
def spaces_double(monkeypatch):
    """`import spaces` gives the double (what a ZeroGPU Space's `spaces` package is to the app)."""
    monkeypatch.syspath_prepend(str(DOUBLE))
    sys.modules.pop("spaces", None)
    import spaces

    yield spaces
    sys.modules.pop("spaces", None)


# --- the double behaves as spaces.GPU does --------------------------------------------------------------------

def _pid(_=None):
    return os.getpid()


def _count(n):
    for i in range(n):
        yield i, os.getpid()


def _fail():
    raise KeyError("nope")


def _user_error():
    import gradio as gr

    raise gr.Error("steps=999 is above the limit of 150", title="Invalid input")


def _sleep(seconds):
    time.sleep(seconds)
    return "woke"


def _unpicklable():
    return lambda: None


def test_double_runs_each_call_in_a_forked_child_and_streams_generators(spaces_double):
    pid = spaces_double.GPU(_pid)
    first, second = pid(), pid()
    assert os.getpid() not in (first, second) and first != second  # a fresh child per call
    streamed = list(spaces_double.GPU(_count)(3))
    assert [i for i, _ in streamed] == [0, 1, 2]
    assert len({p for _, p in streamed}) == 1 and streamed[0][1] != os.getpid()


def test_double_sends_errors_back_as_spaces_does(spaces_double):
    import gradio as gr

    with pytest.raises(gr.Error) as error:
        spaces_double.GPU(_user_error)()
    assert "above the limit of 150" in error.value.message  # a gr.Error crosses as itself
    with pytest.raises(gr.Error) as error:
        spaces_double.GPU(_fail)()
    assert error.value.message == "KeyError"  # anything else: its class name only
    with pytest.raises(gr.Error):
        spaces_double.GPU(_unpicklable)()  # results must pickle


def test_double_honours_the_duration(spaces_double, monkeypatch):
    import gradio as gr

    monkeypatch.setenv("ZEROGPU_DOUBLE_TIME_SCALE", "1")
    assert spaces_double.GPU(_sleep, duration=5)(0.1) == "woke"
    started = time.monotonic()
    with pytest.raises(gr.Error) as error:
        spaces_double.GPU(_sleep, duration=lambda seconds: 1)(30)  # a callable gets the call's arguments
    assert "GPU task aborted" in error.value.message and time.monotonic() - started < 10


# --- the decisions the app makes for ZeroGPU -------------------------------------------------------------------

def test_zero_gpu_is_decided_by_the_platforms_variable(spaces_double):
    import app

    assert app.gpu_decorator({}) is None  # anywhere else nothing is wrapped
    assert app.gpu_decorator({"SPACES_ZERO_GPU": "true"}) is spaces_double.GPU
    assert app.model_device(None, zero_gpu=True) == "cuda"  # ZeroGPU: the model goes to "cuda" at start-up
    assert app.model_device("cpu", zero_gpu=True) == "cpu"  # an explicit --device / LDS_DEVICE wins
    assert app.model_device(None, zero_gpu=False) is None  # the engine's own choice


def test_missing_spaces_package_on_zero_gpu_is_a_clear_error(monkeypatch):
    import app

    monkeypatch.setitem(sys.modules, "spaces", None)  # import fails
    with pytest.raises(SystemExit, match="add `spaces` to requirements.txt"):
        app.gpu_decorator({"SPACES_ZERO_GPU": "1"})


def test_durations_fit_the_work():
    from demo import zerogpu

    small = zerogpu.generation_seconds({"steps": 20, "batch_size": 1, "width": 64, "height": 64})
    large = zerogpu.generation_seconds({"steps": 150, "batch_size": 4, "width": 768, "height": 768})
    assert zerogpu.gpu_duration(small) == zerogpu.ZERO_GPU_MIN_S + 2  # 20 steps at 512x512 or less
    assert large > 4 * small and zerogpu.gpu_duration(large) == 155  # 150 steps x 4 images x 2.25 (768x768 vs 512x512)
    assert zerogpu.gpu_duration(10_000) == zerogpu.ZERO_GPU_MAX_S  # never more than ZeroGPU allows
    strip = zerogpu.generation_seconds({"steps": 20, "guidance_strip": [1, 4, 7.5]})
    assert strip > zerogpu.generation_seconds({"steps": 20})  # Explain's guidance strip is more images
    assert zerogpu.finetune_seconds({"steps": 400, "batch_size": 4}) > zerogpu.finetune_seconds(
        {"steps": 100, "batch_size": 4}
    )
    assert zerogpu.finetune_seconds({"steps": 0}, default_steps=1200, default_batch=8) == \
        zerogpu.finetune_seconds({"steps": 1200, "batch_size": 8})


def test_the_model_thread_is_per_process(shapes_engine):
    """A forked child has no copy of the parent's model thread: its first job starts its own."""
    import multiprocessing
    import threading

    fork = multiprocessing.get_context("fork")
    here, there = fork.Pipe()

    def child():
        compute = shapes_engine.compute
        there.send((compute.run(lambda: 6 * 7), compute.run(threading.get_ident) != threading.get_ident(),
                    compute.thread.pid == os.getpid()))

    process = fork.Process(target=child)
    process.start()
    assert here.poll(60), "the child's model call never returned"
    assert here.recv() == (42, True, True)
    process.join(10)
    assert shapes_engine.compute.run(lambda: "parent's thread still works") == "parent's thread still works"


def test_cancel_flags_cross_process_boundaries(tmp_path):
    """Cancel arrives in the app's process; the run it stops polls its flag in a forked worker."""
    import multiprocessing

    from demo.studio import Studio

    studio = Studio(output_dir=tmp_path)
    key = ("session", "txt2img")
    fork = multiprocessing.get_context("fork")
    here, there = fork.Pipe()

    def worker():
        flag = studio.cancels.start(key)
        there.send("started")
        deadline = time.monotonic() + 30
        while not flag.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        there.send(flag.is_set())
        studio.cancels.finish(key, flag)

    process = fork.Process(target=worker)
    process.start()
    assert here.recv() == "started"
    assert studio.cancels.cancel(key) == "running"  # the parent sees the child's run
    assert here.recv() is True
    process.join(10)
    assert studio.cancels.cancel(key) is None  # finished in the child: nothing left here either


# --- the real app under the double -------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["fork-per-call", "reuse-idle-workers"])
def zero_gpu_app(request, tmp_path_factory):
    """`python app.py` as a ZeroGPU Space runs it (SPACES_ZERO_GPU, Gradio's server variables), with the double
    as its `spaces` package; the model on the CPU (no CUDA here), one thread. Twice: a fresh worker per call (all
    state stays behind), and idle workers reused as ZeroGPU reuses them (a worker may predate a change)."""
    from tests.conftest import BUILTIN_MODEL

    if not (BUILTIN_MODEL / "model_index.json").is_file():
        pytest.skip("the built-in model is not trained")
    log = tmp_path_factory.mktemp("zerogpu") / "calls.jsonl"
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SPACES_ZERO_GPU": "true", "SPACE_ID": "lds/test-space",
           "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port), "LDS_DEVICE": "cpu",
           "LDS_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(DOUBLE), str(REPO)]),
           "ZEROGPU_DOUBLE_LOG": str(log), "ZEROGPU_DOUBLE_TIME_SCALE": str(TIME_SCALE),
           "ZEROGPU_DOUBLE_REUSE": "1" if request.param == "reuse-idle-workers" else "0"}
    for name in ("LDS_HOST", "LDS_PORT", "LDS_AUTH", "LDS_MODEL", "LDS_SAFETY_CHECKER"):
        env.pop(name, None)
    process = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    client = None
    deadline = time.time() + 180
    while client is None and time.time() < deadline:
        if process.poll() is not None:
            pytest.fail("the app exited: " + process.stdout.read())
        try:
            client = Client(url, verbose=False)
        except Exception:
            time.sleep(1)
    if client is None:
        os.killpg(process.pid, signal.SIGTERM)
        pytest.fail("the app did not come up within 180 s")
    yield {
        "client": client,
        "url": url,
        "log": log,
        "process": process,
        "reuse": request.param == "reuse-idle-workers",
    }
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


def gpu_calls(app) -> list[dict]:
    if not app["log"].is_file():
        return []
    return [json.loads(line) for line in app["log"].read_text().splitlines()]


def new_calls(app, before: int) -> list[dict]:
    return gpu_calls(app)[before:]


SMALL = dict(width=64, height=64, **common_args())


def test_every_generating_event_runs_in_a_gpu_worker(zero_gpu_app, images):
    app, client = zero_gpu_app, zero_gpu_app["client"]
    scene = handle_file(str(images["scene.png"]))
    mask = handle_file(str(images["mask_right_half.png"]))
    calls = {
        "/txt2img": dict(prompt="a red circle", **SMALL),
        "/inpaint": dict(image=editor(images["scene.png"]), mask=mask, prompt="a yellow star", strength=1.0,
                         mask_blur=1, **common_args()),
        "/outpaint": dict(image=scene, prompt="a red circle on grass", directions=["left"], pixels=16, fill="edge",
                          **common_args()),
        "/style": dict(image=scene, style="glow", prompt="a circle", strength=0.6, mode="img2img", control="canny",
                       conditioning_scale=1.0, **common_args()),
        "/controlnet": dict(image=scene, control_type="canny", preprocessor="canny", low_threshold=100,
                            high_threshold=200, conditioning_scale=1.0, guidance_start=0.0, guidance_end=1.0,
                            use_second=False, image_2=None, control_type_2="canny", preprocessor_2="none",
                            conditioning_scale_2=0.5, prompt="a red circle", **common_args()),
    }
    from demo import zerogpu

    small_duration = zerogpu.gpu_duration(zerogpu.generation_seconds(dict(steps=3, batch_size=1)))
    assert small_duration < 30
    for api_name, kwargs in calls.items():
        before = len(gpu_calls(app))
        preview, gallery, params, status = client.predict(**kwargs, api_name=api_name)
        assert status.startswith("Done"), (api_name, status)
        assert gallery_paths(gallery) and Path(gallery_paths(gallery)[0]).is_file(), api_name
        made = new_calls(app, before)
        assert len(made) == 1 and made[0]["pid"] != made[0]["parent"], (api_name, made)
        assert made[0]["duration"] == small_duration  # what the app's policy gives 3 steps of one small image
    before = len(gpu_calls(app))
    control_map = client.predict(image=scene, control_type="canny", preprocessor="canny", low_threshold=100,
                                 high_threshold=200, api_name="/preprocess")
    assert Path(control_map).is_file() and len(new_calls(app, before)) == 1


def test_explain_and_explain_inpaint_in_a_gpu_worker(zero_gpu_app, images):
    app, client = zero_gpu_app, zero_gpu_app["client"]
    before = len(gpu_calls(app))
    out = client.predict(prompt="a red circle", width=64, height=64, guidance_strip=[1, 4], strength=0.6,
                         **{k: v for k, v in common_args().items() if k != "batch_size"}, api_name="/explain")
    assert out[3].startswith("Done") and "StableDiffusionPipeline" in out[-1]  # the status, then the code
    result = client.predict(
        image=editor(images["scene.png"]),
        mask=handle_file(str(images["mask_right_half.png"])),
        inpaint_prompt="a yellow star",
        prompt="",
        strength=1.0,
        **{k: v for k, v in common_args().items() if k != "batch_size"},
        api_name="/explain_inpaint",
    )
    assert result[0].startswith("Done"), result[0]
    assert [c["task"] for c in new_calls(app, before)] == ["explain", "explain_inpainting"]


def test_finetune_save_load_and_switch_carry_over_to_later_workers(zero_gpu_app):
    """A fine-tune trains in a worker that is gone when the call ends; the adapter must live on in the app's
    process, so that every later worker (forked from it) draws with it, and save/load/switch work there."""
    from tests.test_finetune_app import finetune_args

    app, client = zero_gpu_app, zero_gpu_app["client"]

    def draw(prompt):  # the pixels (the PNG's text also records which adapters made it)
        from tests.test_api import pixels

        gallery = client.predict(prompt=prompt, **SMALL, api_name="/txt2img")[1]
        return pixels(gallery_paths(gallery)[0]).tobytes()

    word_prompt = "a big blue square in zqgpu style"
    before_image = draw(word_prompt)
    calls_before = len(gpu_calls(app))
    status, loss, comparison, table = client.predict(**finetune_args(token="zqgpu", steps=3), api_name="/finetune")
    assert status.startswith("Done: adapter `zqgpu` trained 3 steps"), status
    finetune_call = new_calls(app, calls_before)[0]
    assert finetune_call["task"] == "train_adapter" and finetune_call["pid"] != finetune_call["parent"]
    from demo import zerogpu

    expected = zerogpu.gpu_duration(zerogpu.finetune_seconds({"steps": 3, "batch_size": 2}))
    assert finetune_call["duration"] == expected  # from the fine-tune's own steps and batch
    assert [row[0] for row in table["data"]] == ["zqgpu"]
    assert [a["name"] for a in client.predict(api_name="/adapters")] == ["zqgpu"]
    calls_before = len(gpu_calls(app))
    after_image = draw(word_prompt)  # a worker forked after the fine-tune: it has the adapter
    assert after_image != before_image
    drawn = new_calls(app, calls_before)
    if app["reuse"]:  # the idle txt2img worker predates the adapter: it refused, a new one drew
        assert [c["task"] for c in drawn] == ["txt2img", "txt2img"] and drawn[0]["pid"] != drawn[1]["pid"], drawn
    else:
        assert len(drawn) == 1, drawn

    saved, note = client.predict(adapter="zqgpu", api_name="/adapter_save")
    assert saved.endswith(".safetensors") and "Saved" in note
    client.predict(adapter="zqgpu", on=False, scale=1.0, api_name="/adapter_update")
    assert draw(word_prompt) == before_image  # switched off in the app's process: workers see it off
    client.predict(adapter="zqgpu", api_name="/adapter_remove")
    assert client.predict(api_name="/adapters") == []
    table, _, note = client.predict(adapter_file=handle_file(saved), word="", api_name="/adapter_load")
    assert "prompts with `zqgpu`" in note
    assert draw(word_prompt) == after_image  # loaded in the app's process: the same adapter in the next worker
    for adapter in client.predict(api_name="/adapters"):
        client.predict(adapter=adapter["name"], api_name="/adapter_remove")


def test_too_long_a_finetune_is_refused_before_it_asks_for_the_gpu(zero_gpu_app):
    from gradio_client.exceptions import AppError

    from tests.test_finetune_app import finetune_args

    app, client = zero_gpu_app, zero_gpu_app["client"]
    before = len(gpu_calls(app))
    from demo import zerogpu

    fits = zerogpu.finetune_steps_within(zerogpu.ZERO_GPU_MAX_S, 8)
    assert zerogpu.gpu_duration(zerogpu.finetune_seconds({"steps": fits, "batch_size": 8})) <= zerogpu.ZERO_GPU_MAX_S
    assert zerogpu.finetune_seconds({"steps": fits + 1, "batch_size": 8}) > zerogpu.ZERO_GPU_MAX_S
    with pytest.raises(AppError, match=rf"steps=2000 .* at most 300 s: use at most {fits} steps"):
        client.predict(**finetune_args(token="zqlong", steps=2000, batch_size=8), api_name="/finetune")
    assert new_calls(app, before) == []


def test_cancel_reaches_the_run_in_the_gpu_worker(zero_gpu_app):
    client = zero_gpu_app["client"]
    job = client.submit(prompt="a big star", width=128, height=128, **common_args(steps=150, batch_size=4),
                        api_name="/txt2img")
    deadline = time.time() + 120
    while time.time() < deadline and not any("Step" in str(o[3]) for o in job.outputs() or []):
        time.sleep(0.2)
    assert client.predict(api_name="/cancel_txt2img") == "Cancelling…"
    status = job.result(timeout=120)[3]
    assert status.startswith("Cancelled at step") and "of 150" in status, status
    # the next request runs normally
    assert client.predict(prompt="a red circle", **SMALL, api_name="/txt2img")[3].startswith("Done")


def test_compare_and_intervene_in_a_gpu_worker(zero_gpu_app):
    """The Compare grid and Explain's intervention are model events too: each runs in a worker, asking for the
    time of all its images (4 cells; original, plain target and the edit's batch of 2)."""
    from demo import zerogpu
    from tests.test_compare import compare_args
    from tests.test_intervene import intervene_args

    app, client = zero_gpu_app, zero_gpu_app["client"]
    before = len(gpu_calls(app))
    grid, gallery, params, status, grid_file = client.predict(**compare_args(), api_name="/compare")
    assert status.startswith("Done: 4 cells"), status
    assert len(gallery) == 4 and Path(grid_file).is_file()
    out = client.predict(**intervene_args(), api_name="/explain_intervene")
    assert out[0].startswith("Done: 3 image(s)"), out[0]
    made = new_calls(app, before)
    assert [c["task"] for c in made] == ["compare", "intervene"], made
    assert all(c["pid"] != c["parent"] for c in made)
    four = zerogpu.gpu_duration(zerogpu.generation_seconds(dict(steps=3, batch_size=4, width=64, height=64)))
    assert [c["duration"] for c in made] == [four, four]
