"""A model failure mid-run reaches that client as a clear error, and the next request works
(docs/ARCHITECTURE.md, Robustness)."""
from __future__ import annotations

import pytest
from gradio_client.exceptions import AppError

from tests.test_api import common_args, gallery_paths


class FailOnce:
    """A forward pre-hook for the shared U-Net that raises `error` on its `after`-th call, once."""

    def __init__(self, error: Exception, after: int = 2):
        self.error, self.after, self.calls, self.fired = error, after, 0, False

    def __call__(self, module, args):
        self.calls += 1
        if not self.fired and self.calls >= self.after:
            self.fired = True
            raise self.error


def run(client, **overrides):
    args = dict(prompt="a red circle", width=64, height=64, **common_args(steps=4, seed=11))
    args.update(overrides)
    return client.predict(**args, api_name="/txt2img")


@pytest.mark.parametrize("error, fragments", [
    (RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB"), ["out of memory", "lower the size"]),
    (RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"), ["model failed", "cudnn"]),
])
def test_model_error_mid_run_then_recovery(client, live_app, error, fragments):
    baseline = run(client)
    hook = FailOnce(error)
    handle = live_app.engine.base.unet.register_forward_pre_hook(hook)
    try:
        with pytest.raises(AppError) as info:
            run(client)
    finally:
        handle.remove()
    assert hook.fired
    message = str(info.value).lower()
    assert all(f in message for f in fragments), message
    # the next request works and gives exactly what it gave before the failure
    again = run(client)
    with open(gallery_paths(baseline[1])[0], "rb") as a, open(gallery_paths(again[1])[0], "rb") as b:
        assert a.read() == b.read()


def test_failure_in_one_session_does_not_reach_another(live_app):
    failing, bystander = live_app.client(), live_app.client()
    hook = FailOnce(RuntimeError("CUDA out of memory"), after=1)
    handle = live_app.engine.base.unet.register_forward_pre_hook(hook)
    try:
        job = failing.submit(prompt="a red circle", width=64, height=64, **common_args(steps=3), api_name="/txt2img")
        with pytest.raises(AppError):
            job.result(timeout=120)
    finally:
        handle.remove()
    _, gallery, params, _ = run(bystander)
    assert len(gallery) == 1 and params["seed"] == 11
