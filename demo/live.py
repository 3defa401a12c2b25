"""Live mode: a tab's image made again as its inputs change, the newest input winning.

Each edit of a watched input (prompt, seed, a slider, ...) makes two events, in this order (gradio runs the
events of one trigger one after the other, each to its end):

1. `on_edit` (no queue, every edit): the page numbers the edit (a counter in the page, so the numbers follow
   the order the person made the edits whatever order the requests arrive in); the server keeps the newest
   number per session and stops this session's live run if it was made for an older one. When Live is on it
   writes the number into a hidden field, whose change starts:
2. `live_run` (queued, `trigger_mode="always_last"`): the tab's own request with live previews off. The page
   holds at most one live run per session in flight and, while one runs, keeps only the last trigger; that
   run starts when the one in flight ends, with the inputs as they are then. The run carries the newest edit
   number the page had when it was sent: it does not start if a newer edit reached the server first, and it
   returns nothing if one reached the server while it ran.
3. What a run returns goes to hidden copies of the outputs; a step in the page (no server) moves it to the
   visible ones only if the page's edit counter still equals the run's number. An edit made while the result
   travelled (which the server could not know of yet) keeps it from being shown. So an image is shown only
   while no newer edit exists, and the last edit's run is always made and shown.

Live runs share the engine with everything else but have their own gradio concurrency group, at most
LIVE_CONCURRENCY admitted at once for all sessions together: a normal Generate (the "model" group) never
waits behind more than the live run on the engine, and the live users take turns in gradio's queue.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Iterator, Sequence

import gradio as gr

from demo.cancelling import session_key
from demo.common import UI_EVENT
from demo.outputs import OutputPanel
from demo.settings_box import RANDOM_SEED, resolve_seed
from demo.studio import Studio
from demo.zerogpu import generation_seconds

LIVE_CONCURRENCY_ID = "live"  # gradio concurrency group of live runs, apart from the "model" group of Generate clicks
# Live runs admitted at once across all sessions. One: the engine runs one model call at a time anyway, and with
# one live run admitted a waiting Generate request shares the engine at worst turn about with live runs.
LIVE_CONCURRENCY = 1

# The page's edit counter: bumped by every edit (event 1), read by every live run when it is sent (event 2).
_NUMBER_EDIT_JS = """(live, edit, seed) => {
  window.ldsLiveEdits = (window.ldsLiveEdits || 0) + 1;
  return [live, window.ldsLiveEdits, seed];
}"""
_NEWEST_EDIT_JS = "(edit, ...values) => [window.ldsLiveEdits || 0, ...values]"
# Show a run's outputs only if no edit came since it was sent (undefined leaves an output as it is).
_SHOW_IF_NEWEST_JS = """(edit, ...outputs) => edit === (window.ldsLiveEdits || 0)
  ? outputs : outputs.map(() => undefined)"""


def live_key(tab: str) -> str:
    """The cancel-registry and file-name key of a tab's live runs (apart from its Generate runs)."""
    return f"{tab}-live"


def without_previews(task: Callable) -> Callable:
    """`task(engine, ..., on_step=, cancel=)` with no step callback: the engine then makes no live preview (each
    costs a VAE decode, time a newer edit's run needs) and reports no steps; cancel still stops it."""
    def run(engine, *, on_step=None, **kwargs):
        return task(engine, **kwargs)

    return run


class LiveEdits:
    """Per session: the newest edit number the server has seen and the live run in flight (its edit number).

    Bounded like gradio's own session state: the least recently used sessions are forgotten beyond `capacity`
    (a forgotten session's next edit starts afresh)."""

    def __init__(self, capacity: int):
        self.capacity = max(1, int(capacity))
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, dict[str, int | None]] = OrderedDict()

    def _entry(self, session: str) -> dict[str, int | None]:
        entry = self._sessions.get(session)
        if entry is None:
            entry = self._sessions[session] = {"newest": 0, "running": None}
            while len(self._sessions) > self.capacity:
                self._sessions.popitem(last=False)
        self._sessions.move_to_end(session)
        return entry

    def edited(self, session: str, edit: int) -> bool:
        """Record edit number `edit`; True when the run in flight was made for an older edit (stop it)."""
        with self._lock:
            entry = self._entry(session)
            entry["newest"] = max(entry["newest"], edit)
            return entry["running"] is not None and entry["running"] < edit

    def begin(self, session: str, edit: int) -> bool:
        """A live run for edit `edit` starts: False (do not run) when a newer edit is known."""
        with self._lock:
            entry = self._entry(session)
            if edit < entry["newest"]:
                return False
            entry["newest"], entry["running"] = edit, edit
            return True

    def stale(self, session: str, edit: int) -> bool:
        with self._lock:
            return self._entry(session)["newest"] > edit

    def end(self, session: str, edit: int) -> None:
        with self._lock:
            entry = self._entry(session)
            if entry["running"] == edit:
                entry["running"] = None


def edit_number(value) -> int:
    """The edit number a page sent (a count from 0); anything else counts as 0, the oldest."""
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        return 0
    return max(0, number)


def live_toggle(tab: str) -> gr.Checkbox:
    return gr.Checkbox(value=False, label="Live", elem_id=f"{tab}-live",
                       info="Make the image again as you edit the prompt, the seed or a setting "
                            "(no live preview; the newest edit wins; results are not added to the history)")


def wire_live(engine, studio: Studio, tab: str, panel: OutputPanel, live: gr.Checkbox, seed: gr.Number,
              inputs: dict[str, gr.components.Component], run: Callable[..., Iterator[tuple]]) -> None:
    """Live mode for a tab: `inputs` (task keyword -> component, `seed` among them) are watched, and
    `run(request=, **values)` (the tab's request without previews, a `run_task` generator yielding the panel's
    four outputs) makes each image. Live results replace the panel's image, gallery, parameters and status."""
    key = live_key(tab)
    edits = LiveEdits(engine.limits.max_sessions)
    names: Sequence[str] = list(inputs)
    components = list(inputs.values())
    edit = gr.Number(value=0, precision=0, visible="hidden", elem_id=f"{tab}-live-edit")
    triggers = [component.change for component in components] + [live.change]

    def on_edit(is_live: bool, number, seed_value, request: gr.Request):
        """Every edit: note its number, stop an older live run; when Live is on, start a run (through the
        hidden field) or, for seed -1, first draw the seed and show it (that change is the edit that runs)."""
        session = session_key(request, key)
        number = edit_number(number)
        if edits.edited(session[0], number):
            studio.cancels.cancel(session)
        if not is_live:
            return gr.skip(), gr.skip()
        if seed_value is None or seed_value == "" or seed_value == RANDOM_SEED:
            # A random seed per edit would change the whole picture at every keystroke: live mode fixes one
            return gr.skip(), resolve_seed(engine, RANDOM_SEED)
        return number, gr.skip()

    gr.on(triggers, on_edit, [live, edit, seed], [edit, seed], js=_NUMBER_EDIT_JS, trigger_mode="multiple",
          **UI_EVENT)

    gpu_run = studio.gpu_event(run, generation_seconds)
    # Where a live run's results wait for the page's last word (step 3 of the module's docstring)
    with gr.Group(visible="hidden"):
        shown_edit = gr.Number(value=0, precision=0, visible="hidden")
        staged = [gr.Image(format="png", interactive=False, visible="hidden"),
                  gr.Gallery(format="png", type="filepath", interactive=False, visible="hidden"),
                  gr.JSON(visible="hidden"), gr.Markdown(visible="hidden")]
    skip_all = (gr.skip(),) * (1 + len(staged))

    def live_run(request: gr.Request, number, *values):  # gradio passes the request by its position
        """One live run: the tab's request for the newest inputs, returned only if no newer edit came meanwhile."""
        session = session_key(request, key)[0]
        number = edit_number(number)
        if not edits.begin(session, number):
            yield skip_all
            return
        final = None
        try:
            for update in gpu_run(request=request, **dict(zip(names, values))):
                if final is not None:
                    yield skip_all  # hands control back to gradio while the model works (see BackgroundRun)
                final = update
        except gr.Error:
            if not edits.stale(session, number):
                raise
        finally:
            edits.end(session, number)
        if final is None or edits.stale(session, number):
            yield skip_all  # a newer edit is on its way: this image would be out of date
            return
        *images, status = final
        yield (number, *images, status.replace("Done:", "Live:", 1) if isinstance(status, str) else status)

    edit.change(live_run, [edit, *components], [shown_edit, *staged], js=_NEWEST_EDIT_JS,
                trigger_mode="always_last", concurrency_id=LIVE_CONCURRENCY_ID, concurrency_limit=LIVE_CONCURRENCY,
                show_progress="hidden", api_visibility="private"
                ).then(None, [shown_edit, *staged], panel.outputs(), js=_SHOW_IF_NEWEST_JS, **UI_EVENT)
