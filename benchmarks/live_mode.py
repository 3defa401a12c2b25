"""9. Live mode in a browser: headless Chromium types a prompt into the Text to image tab with Live on, one
keystroke at a time (20 edits per round, TYPING_DELAY_MS apart, as a quick typist), and the page itself records
when each keystroke happened and when each image appeared. Per round: the time from the last keystroke to the
final prompt's image being shown (median over the rounds, next to a plain /txt2img call of the same settings),
and every image shown after the last keystroke is read back (its PNG parameters) to count stale ones: images
for an older prompt shown after the newest edit. Live results show no preview, so the wait is one run plus
whatever run was in flight when the last key was pressed (stopped within one step).

    python -m benchmarks.live_mode [--model FOLDER] [--repeats N] [--quick]

The helpers here (the page recorder, typing, reading what was shown) are also what tests/test_live.py uses.
"""
from __future__ import annotations

import contextlib
import io
import statistics
import time
from pathlib import Path

from benchmarks.common import PROMPTS, Options, Row, build_engine, model_folder, standalone, start_app, txt2img_args

PART = "9 live mode"
EDITS = 20  # keystrokes per round (quick: 3)
TYPING_DELAY_MS = 80  # between keystrokes: about 12 characters a second, faster than a run of the built-in model
SEED = 7
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
TAB = "txt2img"

# In the page: every keystroke in the prompt (window.ldsLastKey) and every new image src in the result gallery
# and the preview (window.ldsShown), stamped with the page's own clock, so network and test overhead do not blur
# the times.
RECORDER_JS = """() => {
  window.ldsShown = []; window.ldsLastKey = 0;
  document.querySelector('#txt2img-prompt textarea').addEventListener('keydown',
      () => { window.ldsLastKey = performance.now(); }, true);
  const last = {};
  const note = () => {
    for (const [where, selector] of [['gallery', '#txt2img-gallery img'], ['preview', '#txt2img-preview img']]) {
      const img = document.querySelector(selector);
      const src = img ? img.getAttribute('src') : null;
      if (src && src !== last[where]) {
        last[where] = src;
        window.ldsShown.push({where, src, t: performance.now()});
      }
    }
  };
  note();
  new MutationObserver(note).observe(document.body, {subtree: true, childList: true, attributes: true,
                                                      attributeFilter: ['src']});
}"""


def png_params(page, src: str) -> dict:
    """The generation parameters in the PNG a page shows at `src` (fetched as the browser would)."""
    from PIL import Image

    from pipelines.common import params_from_png

    with Image.open(io.BytesIO(page.request.get(src).body())) as image:
        return params_from_png(image)


def png_pixels(page, src: str):
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(page.request.get(src).body())) as image:
        return np.asarray(image.convert("RGB"))


def turn_live_on(page, timeout_ms: int) -> None:
    """Tick Live and wait for its first image (the run of the inputs as they are)."""
    page.locator(f"#{TAB}-live input").check()
    page.wait_for_function(f"() => (document.querySelector('#{TAB}-status')?.innerText || '').startsWith('Live:')",
                           timeout=timeout_ms)


def type_edits(page, text: str, delay_ms: int = TYPING_DELAY_MS) -> None:
    """Replace the prompt by `text`, one keystroke per character (the first one replaces the selection)."""
    box = page.locator(f"#{TAB}-prompt textarea")
    box.click()
    box.press("ControlOrMeta+a")
    box.press_sequentially(text, delay=delay_ms)


def shown_after_last_key(page) -> list[dict]:
    return page.evaluate("() => window.ldsShown.filter(e => e.t >= window.ldsLastKey)"
                         ".map(e => ({...e, after_ms: e.t - window.ldsLastKey}))")


def wait_for_prompt(page, prompt: str, timeout_ms: int) -> tuple[dict, list[dict]]:
    """Wait until the gallery shows an image made for `prompt` after the last keystroke. Returns that entry (with
    `after_ms`: milliseconds from the last keystroke) and every gallery image shown after the last keystroke
    before it, each with its PNG's `params`."""
    seen: list[dict] = []
    deadline = time.monotonic() + timeout_ms / 1000
    while True:
        left_ms = max(1, int((deadline - time.monotonic()) * 1000))
        page.wait_for_function(
            "n => window.ldsShown.filter(e => e.where === 'gallery' && e.t >= window.ldsLastKey).length > n",
            arg=len(seen), timeout=left_ms)
        entries = [e for e in shown_after_last_key(page) if e["where"] == "gallery"]
        for entry in entries[len(seen):]:
            entry["params"] = png_params(page, entry["src"])
            seen.append(entry)
            if entry["params"].get("prompt") == prompt:
                return entry, seen


@contextlib.contextmanager
def chromium(timeout_ms: int):
    """A fresh headless Chromium context's new page (Debian's chromium, driven by playwright)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 1200}).new_page()
            page.set_default_timeout(timeout_ms)
            yield page
        finally:
            browser.close()


def set_settings(page, seed: int, steps: int, attempts: int = 4) -> None:
    """Seed and steps typed into the Settings accordion, as a person would (Live still off). A slider takes a
    typed number only once it has mounted, so the typing is repeated until its range shows the number."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.locator(f"#{TAB}-settings").get_by_text("Settings").first.click()
    for elem_id, value in ((f"{TAB}-seed", seed), (f"{TAB}-steps", steps)):
        box = page.locator(f"#{elem_id} input[type=number]")
        shown = f"#{elem_id} input[type=range]" if page.locator(f"#{elem_id} input[type=range]").count() else \
            f"#{elem_id} input[type=number]"
        for attempt in range(attempts):
            box.fill(str(value))
            box.press("Tab")
            try:
                page.wait_for_function("([s, v]) => document.querySelector(s).value === v",
                                       arg=[shown, str(value)], timeout=5_000)
                break
            except PlaywrightTimeout:
                if attempt + 1 == attempts:
                    raise


def run(opts: Options) -> list[Row]:
    folder, note = model_folder(opts)
    if note:
        opts.notes.append(note)
    return measure(build_engine(folder), opts)


def measure(engine, opts: Options, part: str = PART, goal: str = "") -> list[Row]:
    """The rows of this part for `engine` (part 10 measures the distilled model on the fast path with it, against
    `goal` for the wait)."""
    if not CHROMIUM.exists():
        return [Row(part, "last keystroke -> final image shown", float("nan"), "s",
                    detail=f"not measured: {CHROMIUM} is missing (apt-get install chromium)")]
    edits = 3 if opts.quick else EDITS
    rounds = 1 if opts.quick else max(3, opts.repeats)
    steps = 2 if opts.quick else engine.preset.default_steps  # the model's own: 20 built-in, 4 distilled
    server = start_app(engine)
    timeout_ms = 120_000
    try:
        client = server.client()
        plain = txt2img_args(engine, seed=SEED, steps=steps)
        plain_times = []
        for _ in range(rounds + 1):  # the first warms up
            started = time.perf_counter()
            client.predict(**plain, api_name="/txt2img")
            plain_times.append(time.perf_counter() - started)
        plain_s = statistics.median(plain_times[1:])
        latencies, stale, live_images = [], 0, 0
        with chromium(timeout_ms) as page:
            page.goto(server.url)
            page.wait_for_selector(f"#{TAB}-generate")
            set_settings(page, SEED, steps)
            turn_live_on(page, timeout_ms)
            page.evaluate(RECORDER_JS)
            for round_index in range(rounds):
                prompt = PROMPTS[round_index % len(PROMPTS)][:edits]
                type_edits(page, prompt)
                final, after = wait_for_prompt(page, prompt, timeout_ms)
                latencies.append(final["after_ms"] / 1000)
                stale += sum(1 for entry in after if entry["params"].get("prompt") != prompt)
                live_images += len(page.evaluate("() => window.ldsShown.filter(e => e.where === 'gallery')"))
                page.evaluate("() => { window.ldsShown = []; }")
    finally:
        server.close()
    latency = statistics.median(latencies)
    return [
        Row(part, f"last keystroke -> final image shown, {edits} edits {TYPING_DELAY_MS} ms apart "
                  f"(median of {rounds})", latency, "s", goal,
            f"rounds: {', '.join(f'{t:.2f}' for t in latencies)} s; {live_images} live images shown in all; "
            f"{steps} steps, {engine.preset.default_size}x{engine.preset.default_size}"),
        Row(part, "that wait vs one /txt2img call of the same settings", latency / plain_s, "x", "",
            f"live {latency:.3f} s vs /txt2img {plain_s:.3f} s (gradio_client, median of {rounds})"),
        Row(part, "stale images shown after the last keystroke", stale, "images", "<= 0",
            f"in {rounds} round(s): images for an older prompt that appeared after the newest edit"),
    ]


if __name__ == "__main__":
    raise SystemExit(standalone(PART, run))
