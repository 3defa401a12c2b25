"""The output panel every tab has (Generate/Cancel, live preview, result gallery, parameters, history,
"Send to" buttons) and the wiring of its model event."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import gradio as gr

from demo.cancelling import session_key
from demo.common import UI_EVENT
from demo.studio import Studio, pick_image
from demo.zerogpu import generation_seconds

TAB_LABELS = {
    "txt2img": "Text to image",
    "inpaint": "Inpaint",
    "outpaint": "Outpaint",
    "style": "Style transfer",
    "controlnet": "ControlNet",
    "explain": "Explain",
    "compare": "Compare",
    "finetune": "Fine-tune",
}

SEND_TARGETS = ("inpaint", "outpaint", "style", "controlnet")  # tabs with an input image

HISTORY_LIMIT = 48  # images kept in a session's history gallery

UPSCALED_VIEW_PX = 256  # small images are shown at least this big, with pixelated rendering


@dataclass
class OutputPanel:
    preview: gr.Image
    gallery: gr.Gallery
    params: gr.JSON
    status: gr.Markdown
    history: gr.Gallery
    history_state: gr.State
    selected: gr.State
    generate: gr.Button
    cancel: gr.Button

    def outputs(self) -> list:
        """The outputs of a model event, in the order `run_task` yields them."""
        return [self.preview, self.gallery, self.params, self.status]


def output_panel(tab: str, studio: Studio, *, generate_label: str = "Generate") -> OutputPanel:
    """Generate/Cancel buttons, live preview, result gallery (PNG with parameters), history and Send-to buttons."""
    with gr.Row():
        generate = gr.Button(generate_label, variant="primary", elem_id=f"{tab}-generate", scale=3)
        cancel = gr.Button("Cancel", variant="stop", elem_id=f"{tab}-cancel", scale=1)
    status = gr.Markdown("", label="Status", elem_id=f"{tab}-status")
    with gr.Row(equal_height=False):
        preview = gr.Image(label="Live preview", interactive=False, format="png", height=UPSCALED_VIEW_PX,
                           elem_classes=["lds-pixelated"], elem_id=f"{tab}-preview", scale=1)
        gallery = gr.Gallery(label="Result (PNG with parameters)", format="png", type="filepath", columns=2,
                             height=UPSCALED_VIEW_PX + 64, object_fit="contain", interactive=False,
                             elem_classes=["lds-gallery", "lds-pixelated"], elem_id=f"{tab}-gallery", scale=2)
    selected = gr.State(0)
    buttons = {}
    with gr.Row():
        for target in SEND_TARGETS:
            buttons[target] = gr.Button(f"Send to {TAB_LABELS[target]}", size="sm", elem_id=f"{tab}-send-{target}")
    with gr.Accordion("Parameters of this result", open=False):
        params = gr.JSON(label="Parameters", elem_id=f"{tab}-params")
    with gr.Accordion("History (this session)", open=False):
        history = gr.Gallery(label="History", format="png", type="filepath", columns=6, height=220,
                             interactive=False, elem_classes=["lds-gallery", "lds-pixelated"])
    history_state = gr.State([])

    gallery.select(_selected_index, None, selected, **UI_EVENT)
    gallery.change(lambda: 0, None, selected, **UI_EVENT)
    studio.sources.append((gallery, selected, buttons))
    return OutputPanel(preview=preview, gallery=gallery, params=params, status=status, history=history,
                       history_state=history_state, selected=selected, generate=generate, cancel=cancel)


def _selected_index(evt: gr.SelectData) -> int:
    return int(evt.index) if isinstance(evt.index, int) else 0


def wire_model_event(tab: str, studio: Studio, panel: OutputPanel, fn: Callable, *,
                     inputs_kwargs: dict[str, gr.components.Component], api_name: str,
                     api_description: str | None = None, extra_outputs=()) -> None:
    """Generate -> fn (a generator using `run_task`) on the shared model queue; Cancel really stops it.
    `extra_outputs` follow the panel's four outputs (fn then yields those four values and one per extra)."""
    event = wire_cancellable(studio, tab, panel.generate, panel.cancel, panel.status,
                             studio.gpu_event(fn, generation_seconds),
                             cancel_api_name=f"cancel_{tab}", inputs_kwargs=inputs_kwargs,
                             outputs=panel.outputs() + list(extra_outputs), api_name=api_name,
                             api_description=api_description, show_progress="minimal",
                             show_progress_on=[panel.preview], **studio.model_event())
    event.success(_add_history, [panel.gallery, panel.history_state], [panel.history, panel.history_state],
                  **UI_EVENT)


def _add_history(gallery_value, history):
    """The newest results first, at most HISTORY_LIMIT, and only files still on disk: results older than
    `Limits.max_file_age_s` are swept away (demo/cleanup.py), and so leave the history too."""
    items = [(pick_image([item], 0), item[1] if isinstance(item, (list, tuple)) else None)
             for item in (gallery_value or [])]
    history = [item for item in items + list(history or []) if item[0] and os.path.exists(item[0])]
    return history[:HISTORY_LIMIT], history[:HISTORY_LIMIT]


CANCEL_MESSAGES = {"running": "Cancelling…", "waiting": "Cancelled: it will not run."}


def wire_cancellable(studio: Studio, tab: str, trigger: gr.Button, cancel_button: gr.Button, status, fn: Callable,
                     *, cancel_api_name: str | None = None, **event_kwargs):
    """trigger -> fn on the model queue, with a Cancel button that really stops it.

    Cancel sets the run's flag; the model stops within one step and fn's own last update reports it, so the
    event ends normally and the next click always runs. Returns fn's event (for .success/.then)."""
    def expect_run(request: gr.Request) -> None:
        studio.cancels.expect(session_key(request, tab))

    event = trigger.click(expect_run, None, None, **UI_EVENT).then(fn, **event_kwargs)

    def cancel(request: gr.Request):
        stopped = studio.cancels.cancel(session_key(request, tab))
        return CANCEL_MESSAGES[stopped] if stopped else gr.skip()

    api = dict(api_name=cancel_api_name, api_description=f"Stop this session's running {tab} request.") \
        if cancel_api_name else dict(api_visibility="private")
    cancel_button.click(cancel, None, status, **api,
                        queue=False,  # never waits in (or is refused by) the model queue it is meant to clear
                        show_progress="hidden")
    return event
