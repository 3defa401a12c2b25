"""Live mode of the Text to image tab (demo/live.py): the real app on a real port, driven by headless Chromium.

Typing with Live on shows, at the end, the image of the final prompt, equal to a direct /txt2img run of the same
settings, and no image for an older prompt after the last keystroke; a Generate request of another client
finishes while live edits keep coming. The page records what it showed and when (benchmarks/live_mode.py, whose
helpers these are); nothing here waits a fixed time.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from benchmarks.live_mode import (
    RECORDER_JS,
    png_pixels,
    set_settings,
    turn_live_on,
    type_edits,
    wait_for_prompt,
)
from demo.live import LIVE_CONCURRENCY, LIVE_CONCURRENCY_ID, LiveEdits, edit_number
from demo.studio import CONCURRENCY_ID
from tests.test_browser import chromium_page

TIMEOUT_MS = 60_000
STEPS = 4
SEED = 7


def test_newest_edit_wins_in_the_bookkeeping():
    edits = LiveEdits(capacity=2)
    assert edits.begin("a", 1)
    assert not edits.edited("a", 1)  # the run's own edit arriving late stops nothing
    assert edits.edited("a", 3)  # a newer edit: stop the run for edit 1
    assert edits.stale("a", 1)
    edits.end("a", 1)
    assert not edits.begin("a", 2)  # sent before edit 3 reached the server: not run
    assert edits.begin("a", 3)
    assert not edits.edited("a", 2)  # an older edit arriving late changes nothing
    assert not edits.stale("a", 3)
    edits.end("a", 3)
    edits.begin("b", 1), edits.begin("c", 1)  # beyond capacity the least recently used session is forgotten
    assert edits.begin("a", 0)
    assert [edit_number(v) for v in (None, "x", -4, 2.0, 5)] == [0, 0, 0, 2, 5]


def test_live_runs_have_their_own_queue(live_app):
    """Live runs: private, always_last, in their own concurrency group; the edit bookkeeping skips the queue."""
    names = {fn.name: fn for fn in live_app.app.fns.values()}
    run, edit = names["live_run"], names["on_edit"]
    assert run.concurrency_id == LIVE_CONCURRENCY_ID != CONCURRENCY_ID
    assert run.concurrency_limit == LIVE_CONCURRENCY
    assert run.trigger_mode == "always_last" and run.queue and run.api_visibility == "private"
    assert edit.trigger_mode == "multiple" and not edit.queue and edit.api_visibility == "private"


@pytest.mark.browser
def test_live_shows_the_final_prompt_and_nothing_older(live_app, test_output):
    final_prompt = "a blue square"
    with chromium_page(live_app.url, TIMEOUT_MS) as page:
        page.wait_for_selector("#txt2img-generate")
        set_settings(page, SEED, STEPS)
        turn_live_on(page, TIMEOUT_MS)
        page.evaluate(RECORDER_JS)
        type_edits(page, "a red circle", delay_ms=30)  # several quick edits, then the final prompt
        type_edits(page, final_prompt, delay_ms=30)
        final, after = wait_for_prompt(page, final_prompt, TIMEOUT_MS)
        stale = [entry["params"].get("prompt") for entry in after if entry is not final]
        assert not stale, f"images for older prompts shown after the last keystroke: {stale}"
        assert final["params"]["seed"] == SEED and final["params"]["steps"] == STEPS
        live = png_pixels(page, final["src"])
        # the preview shows the same image (previews are off for live runs, so it is the result)
        page.wait_for_function("() => { const img = document.querySelector('#txt2img-preview img');"
                               " return img && window.ldsShown.some(e => e.where === 'preview' && e.t >= "
                               "window.ldsLastKey && e.src === img.getAttribute('src')); }")
        preview_src = page.locator("#txt2img-preview img").first.get_attribute("src")
        assert np.array_equal(png_pixels(page, preview_src), live)
        status = page.locator("#txt2img-status").inner_text()
        assert status.startswith("Live:") and f"seed {SEED}" in status
        page.screenshot(path=str(test_output / "live-final.png"), full_page=True)
        # nothing arrives later either: the run of the final prompt was the last one
        gallery_srcs = [e["src"] for e in page.evaluate("() => window.ldsShown") if e["where"] == "gallery"]
        assert gallery_srcs[-1] == final["src"]
    # the same request as Generate's: a direct API run of the recorded settings gives the same pixels
    params = final["params"]
    _, gallery, _, _ = live_app.client().predict(
        **{name: params[name] for name in ("prompt", "negative_prompt", "seed", "steps", "guidance", "scheduler",
                                           "width", "height", "batch_size")}, api_name="/txt2img")
    from PIL import Image

    with Image.open(gallery[0]["image"]) as direct:
        assert np.array_equal(np.asarray(direct.convert("RGB")), live)


@pytest.mark.browser
def test_generate_finishes_while_live_edits_keep_coming(live_app):
    """A Generate request of another client (the API) ends while a browser keeps editing with Live on."""
    common = dict(negative_prompt="", seed=3, steps=STEPS, guidance=live_app.engine.preset.default_guidance,
                  scheduler=live_app.engine.preset.default_scheduler, width=64, height=64, batch_size=1)
    with chromium_page(live_app.url, TIMEOUT_MS) as page:
        page.wait_for_selector("#txt2img-generate")
        set_settings(page, SEED, STEPS)
        turn_live_on(page, TIMEOUT_MS)
        page.evaluate(RECORDER_JS)
        type_edits(page, "a green", delay_ms=30)  # live runs are under way before the request arrives
        job = live_app.client().submit(prompt="a yellow star", **common, api_name="/txt2img")
        deadline = time.monotonic() + TIMEOUT_MS / 1000
        words, edits_made = ["circle", "square", "star", "heart"], 0
        while not job.done() and time.monotonic() < deadline:  # edits keep coming until the request is answered
            type_edits(page, f"a green {words[edits_made % len(words)]}", delay_ms=20)
            edits_made += 1
        assert job.done(), f"/txt2img did not finish within {TIMEOUT_MS / 1000:.0f} s of live edits"
        _, gallery, params, status = job.result()
        assert status.startswith("Done") and params["prompt"] == "a yellow star" and gallery
        # the live side kept working too: its last edit's image comes
        last = f"a green {words[(edits_made - 1) % len(words)]}" if edits_made else "a green"
        wait_for_prompt(page, last, TIMEOUT_MS)
