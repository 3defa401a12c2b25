"""The Settings accordion every tab has (negative prompt, seed, steps, guidance, scheduler, size, batch),
restoring its values from a PNG, the seed that -1 stands for, and the unknown-words warning under a prompt."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import gradio as gr

from demo.common import UI_EVENT
from demo.fields import Dropdown, Number, Slider, open_png_params
from pipelines.common import NOTES_KEY

RANDOM_SEED = -1  # the seed box value meaning "pick one"; the seed actually used is shown with the result


@dataclass
class CommonSettings:
    """The components of one tab's settings accordion (built by `common_settings`)."""

    negative_prompt: gr.Textbox
    seed: gr.Number
    randomise: gr.Button
    steps: gr.Slider
    guidance: gr.Slider
    scheduler: gr.Dropdown
    batch_size: gr.Slider
    width: gr.Slider | None = None
    height: gr.Slider | None = None
    restore_file: gr.File | None = None
    restored: gr.JSON | None = None

    def kwargs(self) -> dict[str, gr.components.Component]:
        """Task keyword name -> component, for `inputs_kwargs=` of a model event."""
        named = dict(negative_prompt=self.negative_prompt, seed=self.seed, steps=self.steps,
                     guidance=self.guidance, scheduler=self.scheduler, batch_size=self.batch_size)
        if self.width is not None:
            named.update(width=self.width, height=self.height)
        return named


def size_choices(engine) -> tuple[int, int, int]:
    """(minimum, maximum, step) for width/height sliders, within the model's and the server's limits."""
    preset = engine.preset
    limit = engine.limits.max_size or preset.max_size
    maximum = min(preset.max_size, limit)
    multiple = engine.size_multiple
    minimum = max(multiple, (preset.default_size // 4) // multiple * multiple)
    return minimum, maximum, multiple


def common_settings(
    engine, *, tab: str, size: bool = True, label: str = "Settings", open: bool = False
) -> CommonSettings:
    """Build the settings accordion (negative prompt, seed + random, steps, guidance, scheduler, size, batch).

    Every tab calls this one function, so the settings look and behave the same everywhere.
    """
    preset, limits = engine.preset, engine.limits
    with gr.Accordion(label, open=open, elem_id=f"{tab}-settings"):
        negative = gr.Textbox(value="", label="Negative prompt", placeholder="what the image should not show",
                              max_lines=2, max_length=limits.max_prompt_chars, elem_id=f"{tab}-negative")
        with gr.Row():
            seed = Number(label="Seed (-1 = random)", value=RANDOM_SEED, precision=0, minimum=RANDOM_SEED,
                             maximum=limits.max_seed, scale=4, elem_id=f"{tab}-seed")
            randomise = gr.Button("Random seed", scale=1, min_width=80, size="sm", elem_id=f"{tab}-random-seed")
        with gr.Row():
            steps = Slider(label="Steps", minimum=1, maximum=limits.max_steps, step=1, value=preset.default_steps,
                           elem_id=f"{tab}-steps")
            guidance = Slider(label="Guidance (CFG)", minimum=0.0, maximum=limits.max_guidance, step=0.5,
                                 value=preset.guidance_for(tab), elem_id=f"{tab}-guidance")
        with gr.Row():
            scheduler = Dropdown(
                label="Scheduler",
                choices=list(engine.scheduler_names),
                value=preset.default_scheduler,
                elem_id=f"{tab}-scheduler",
            )
            batch = Slider(
                label="Batch size", minimum=1, maximum=limits.max_batch, step=1, value=1, elem_id=f"{tab}-batch"
            )
        width = height = None
        if size:
            low, high, step = size_choices(engine)
            with gr.Row():
                width = Slider(label="Width", minimum=low, maximum=high, step=step, value=preset.default_size,
                               elem_id=f"{tab}-width")
                height = Slider(label="Height", minimum=low, maximum=high, step=step, value=preset.default_size,
                                elem_id=f"{tab}-height")
        with gr.Accordion("Restore parameters from PNG", open=False):
            restore = gr.File(label="Restore parameters from PNG (drop an image made here)", file_types=[".png"],
                              type="filepath", height=90, elem_id=f"{tab}-restore")
            restored = gr.JSON(label="Parameters found", elem_id=f"{tab}-restored")
    randomise.click(lambda: random.randint(0, limits.max_seed), None, seed, **UI_EVENT)
    return CommonSettings(negative_prompt=negative, seed=seed, randomise=randomise, steps=steps, guidance=guidance,
                          scheduler=scheduler, batch_size=batch, width=width, height=height,
                          restore_file=restore, restored=restored)


def wire_restore(engine, settings: CommonSettings, fields: dict[str, gr.components.Component], *,
                 api_name: str | None = None, derive: Callable[[dict], dict] | None = None) -> None:
    """Dropping a PNG on `settings.restore_file` fills `fields` (params key -> component) from its metadata.

    `fields` should hold the tab's own inputs (prompt, strength, ...); the common settings are added here.
    `derive(params)` may compute UI-only values (e.g. outpaint's chosen sides) from the stored ones.
    """
    targets = {**settings.kwargs(), **fields}
    names = list(targets)
    max_pixels = engine.limits.max_image_pixels

    def read_params(png: str | None) -> dict:
        """The generation parameters stored in a PNG made by this app (or AUTOMATIC1111), with notes on what
        this model cannot take over."""
        return with_model_notes(engine, open_png_params(png, max_pixels))

    def apply(params: dict):
        params = dict(params or {})
        for note in params.get(NOTES_KEY) or []:
            gr.Warning(note)
        if derive is not None:
            params.update(derive(params))
        updates = []
        for name in names:
            value = params.get(name)
            if name == "negative_prompt" and value is None:
                value = params.get("negative")
            updates.append(gr.skip() if value is None else _coerce(targets[name], value))
        return updates

    read = settings.restore_file.upload(
        read_params, settings.restore_file, settings.restored,
        api_name=api_name or False, api_visibility="public" if api_name else "private", queue=False)
    read.success(apply, settings.restored, list(targets.values()), **UI_EVENT)


def with_model_notes(engine, params: dict) -> dict:
    """`params` plus a note when its scheduler is one this model does not offer (the tab then keeps its own)."""
    scheduler = params.get("scheduler")
    if scheduler is None or scheduler in engine.scheduler_names:
        return params
    note = (f"Scheduler {scheduler!r} is not offered for this model ({', '.join(engine.scheduler_names)}); "
            f"the scheduler was left as it is.")
    return {**params, NOTES_KEY: [*(params.get(NOTES_KEY) or []), note]}


def _coerce(component, value):
    """A restored value shaped for its component (numbers for sliders, known choices for dropdowns)."""
    if isinstance(component, gr.Dropdown):
        choices = [c[1] if isinstance(c, tuple) else c for c in (component.choices or [])]
        return value if value in choices else gr.skip()
    if isinstance(component, (gr.Slider, gr.Number)):
        try:
            return float(value) if isinstance(component, gr.Slider) and component.step % 1 else int(value) \
                if float(value).is_integer() else float(value)
        except (TypeError, ValueError):
            return gr.skip()
    if isinstance(component, gr.Checkbox):
        return bool(value)
    if isinstance(component, gr.CheckboxGroup):
        return list(value) if isinstance(value, (list, tuple)) else gr.skip()
    return value if isinstance(value, (str, int, float)) else gr.skip()


def unknown_words_warning(engine, prompt: gr.Textbox) -> gr.Markdown:
    """A warning under `prompt` listing words the model does not know (the built-in model has a small vocabulary)."""
    box = gr.Markdown("", visible=False, elem_classes=["lds-warning"])

    def check(text: str):
        words = engine.unknown_words(text or "")
        if not words:
            return gr.Markdown(value="", visible=False)
        vocab = engine.vocabulary()
        listed = f" Known words: {', '.join(vocab)}." if vocab else ""
        return gr.Markdown(value=f"⚠ The model does not know: **{', '.join(words)}**; they are ignored.{listed}",
                           visible=True)

    prompt.change(check, prompt, box, trigger_mode="always_last", **UI_EVENT)
    return box



def resolve_seed(engine, seed) -> int:
    """-1 (or empty) -> a fresh random seed within the engine's limit; anything else is passed on for the
    pipeline to check."""
    if seed is None or seed == "" or (isinstance(seed, (int, float)) and seed == RANDOM_SEED):
        return random.randint(0, engine.limits.max_seed)
    return seed
