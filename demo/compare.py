"""Compare tab: one setting along X (and optionally another along Y), everything else the same, as a labelled
grid; each cell a PNG with its own parameters (drop it on any tab's "Restore parameters from PNG").

UI only; the grid is made by pipelines/compare.py (imported when the event runs).
"""
from __future__ import annotations

import time
import uuid
from typing import Any

import gradio as gr

from demo.cancelling import session_key
from demo.fields import Dropdown, Slider, open_image, safe_image
from demo.outputs import output_panel, wire_cancellable
from demo.running import BackgroundRun, user_error
from demo.settings_box import common_settings, resolve_seed, unknown_words_warning, wire_restore
from demo.studio import Studio
from demo.zerogpu import generation_seconds
from pipelines.common import params_to_png_info
from pipelines.settings import PREVIEW_EVERY_S

TAB = "compare"
NO_AXIS = "none"
NO_CONTROL = "none"
# axis -> label shown in the dropdowns (the names pipelines/compare.py AXES checks)
AXIS_CHOICES = [("Seed", "seed"), ("Steps", "steps"), ("Guidance (CFG)", "guidance"), ("Scheduler", "scheduler"),
                ("Strength (img2img: needs an input image)", "strength"),
                ("ControlNet scale (needs an input image and a control type)", "conditioning_scale"),
                ("Adapter strength (needs an adapter)", "adapter_scale"), ("Prompt search/replace", "prompt")]
HELP = """**Compare settings side by side.** Pick what changes along X (and optionally Y); every other setting
stays as below. Values are a list (`1, 2.5, 5`), a range (`1-5`, `1-10 (+3)`, `1-7.5 [4]` = 4 values evenly), for
the scheduler a list of names, and for the prompt a search term and its replacements (`red -> blue, green`, or
`red, blue, green` where the first is searched). Each cell is exactly what its own tab makes with those settings:
pick it in the gallery and send it on, or drop its PNG on any tab's *Restore parameters from PNG*."""


def build_tab(engine, *, studio: Studio | None = None) -> None:
    studio = studio or Studio()
    preset, limits = engine.preset, engine.limits
    gr.Markdown(HELP)
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            prompt = gr.Textbox(value=preset.example_prompts[0] if preset.example_prompts else "", label="Prompt",
                                lines=2, max_length=limits.max_prompt_chars, elem_id=f"{TAB}-prompt")
            unknown_words_warning(engine, prompt)
            with gr.Row():
                x_axis = Dropdown(AXIS_CHOICES, value="guidance", label="X axis", elem_id=f"{TAB}-x-axis")
                x_values = gr.Textbox(value="1, 2.5, 5, 7.5", label="X values", max_lines=1,
                                      max_length=limits.max_prompt_chars, elem_id=f"{TAB}-x-values")
            with gr.Row():
                y_axis = Dropdown([("none", NO_AXIS)] + AXIS_CHOICES, value="seed", label="Y axis",
                                  elem_id=f"{TAB}-y-axis")
                y_values = gr.Textbox(value="1-3", label="Y values", max_lines=1, max_length=limits.max_prompt_chars,
                                      elem_id=f"{TAB}-y-values")
            gr.Markdown(f"At most {limits.max_compare_cells} cells and {limits.max_compare_pixels:,} pixels in all "
                        f"cells together.", elem_id=f"{TAB}-limits")
            with gr.Accordion("Input image (for strength and ControlNet scale)", open=False):
                image = safe_image(label="Input image (img2img; with a control type, the control map's source)",
                                   type="pil", image_mode=None, format="png", sources=("upload", "clipboard"),
                                   height=200, elem_id=f"{TAB}-image", elem_classes=["lds-pixelated"],
                                   max_pixels=limits.max_image_pixels)
                with gr.Row():
                    control_type = Dropdown([NO_CONTROL, *engine.control_types], value=NO_CONTROL,
                                            label="Control type (none: img2img)", elem_id=f"{TAB}-control-type")
                    strength = Slider(label="Strength", minimum=0.05, maximum=1.0, step=0.05, value=0.6,
                                      elem_id=f"{TAB}-strength")
                    scale = Slider(label="ControlNet scale", minimum=0.0, maximum=2.0, step=0.05, value=1.0,
                                   elem_id=f"{TAB}-scale")
            adapter = gr.Textbox(value="", label="Adapter (for the adapter-strength axis: its name on the Fine-tune "
                                 "tab; the prompt must hold its word)", max_lines=1, elem_id=f"{TAB}-adapter")
            settings = common_settings(engine, tab=TAB, size=True)
            settings.batch_size.visible = False  # one image per cell
        with gr.Column(scale=3):
            panel = output_panel(TAB, studio, generate_label="Make grid")
            grid_file = gr.File(label="Grid (PNG)", interactive=False, elem_id=f"{TAB}-grid-file")

    def compare(prompt: str, negative_prompt: str, seed: float, steps: float, guidance: float, scheduler: str,
                width: float, height: float, x_axis: str, x_values: str, y_axis: str, y_values: str, image,
                control_type: str, strength: float, conditioning_scale: float, adapter: str,
                request: gr.Request, progress=gr.Progress()):
        """Make a grid of images, one setting along X (and one along Y). Returns (grid image, gallery of cell PNGs
        with their parameters, the grid's params, status, the grid as a PNG file)."""
        kwargs = dict(prompt=prompt, negative_prompt=negative_prompt, seed=resolve_seed(engine, seed), steps=steps,
                      guidance=guidance, scheduler=scheduler, width=width, height=height, x_axis=x_axis,
                      x_values=x_values, y_axis=None if y_axis in (None, "", NO_AXIS) else y_axis, y_values=y_values,
                      image=open_image(image), control_type=None if control_type in (None, "", NO_CONTROL)
                      else control_type, strength=strength, conditioning_scale=conditioning_scale,
                      adapter=(adapter or "").strip() or None)
        yield from run_grid(engine, studio, kwargs, request=request, progress=progress)

    # demo.outputs.wire_model_event with a ZeroGPU estimate of the whole grid (all its cells, not one image)
    wire_cancellable(studio, TAB, panel.generate, panel.cancel, panel.status,
                     studio.gpu_event(compare, lambda arguments: compare_seconds(engine, arguments)),
                     cancel_api_name=f"cancel_{TAB}", outputs=panel.outputs() + [grid_file], api_name="compare",
                     api_description="Make a labelled grid of images: one setting along X, optionally one along Y.",
                     inputs_kwargs=dict(prompt=prompt, **{k: v for k, v in settings.kwargs().items()
                                                          if k != "batch_size"},
                                        x_axis=x_axis, x_values=x_values, y_axis=y_axis, y_values=y_values,
                                        image=image, control_type=control_type, strength=strength,
                                        conditioning_scale=scale, adapter=adapter),
                     show_progress="minimal", show_progress_on=[panel.preview], **studio.model_event())
    wire_restore(engine, settings, {"prompt": prompt, "strength": strength})


def compare_seconds(engine, arguments: dict[str, Any]) -> float:
    """GPU seconds of a grid for ZeroGPU: its cells as a batch of images at the largest steps value."""
    from pipelines.compare import axis_values

    cells, steps = 1, arguments.get("steps")
    try:
        for axis, values in (("x_axis", "x_values"), ("y_axis", "y_values")):
            if arguments.get(axis) in (None, "", NO_AXIS):
                continue
            found = axis_values(engine, arguments[axis], arguments.get(values), prompt=arguments.get("prompt") or "")
            cells *= len(found.values)
            if found.name == "steps":
                steps = max(found.values)
    except Exception:  # the run itself names the bad value; ask for the most a grid may take
        cells = engine.limits.max_compare_cells
    return generation_seconds({**arguments, "steps": steps, "batch_size": cells})


def _save(image, params: dict, folder, name: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{uuid.uuid4().hex[:8]}.png"
    image.save(path, format="PNG", pnginfo=params_to_png_info(params))
    return str(path)


def _caption(params: dict) -> str:
    cell = params.get("compare_cell", {})
    return " · ".join(f"{k} {v}" for part in ("x", "y") for k, v in cell.get(part, {}).items())


def run_grid(engine, studio: Studio, kwargs: dict[str, Any], *, request, progress):
    """The grid in a worker thread with this session's Cancel; yields (grid so far, cell PNGs, params, status,
    grid file) as cells finish."""
    from pipelines.compare import compare

    started = time.perf_counter()
    step = total = 0
    cells: list[tuple[str, str]] = []
    skip = gr.skip()
    with BackgroundRun(studio, session_key(request, TAB), lambda cancel, report: compare(
            engine, **kwargs, cancel=cancel, on_step=lambda s, t, preview=None: report(("step", s, t)),
            on_cell=lambda i, image, params, grid: report(("cell", i, image, params, grid)))) as run:
        if run.cancelled_before_start:
            yield (skip, skip, skip, "Cancelled before it started.", skip)
            return
        yield (skip, skip, skip, "Waiting for the model…", skip)
        for reports in run.batches(PREVIEW_EVERY_S):
            grid = None
            for item in reports:
                if item[0] == "step":
                    step, total = item[1], item[2]
                else:
                    _, index, image, params, grid = item
                    cells.append((_save(image, params, studio.output_dir, f"{TAB}-cell{index + 1}"), _caption(params)))
            if not reports:
                yield (skip,) * 5
                continue
            if progress is not None and total:
                progress((step, total), desc=f"Step {step}/{total} of the grid")
            yield (skip if grid is None else grid, list(cells) if grid is not None else skip, skip,
                   f"{len(cells)} cell(s) done · step {step}/{total}", skip)
    if run.error is not None:
        raise user_error(run.error)
    result = run.result
    seconds = time.perf_counter() - started
    grid_path = _save(result.grid, result.params, studio.output_dir, f"{TAB}-grid")
    status = f"Done: {len(result.images)} cells in {seconds:.1f} s · seed {result.params.get('seed')}"
    if result.cancelled:
        status = f"Cancelled at {result.cancelled}; {len(result.images)} cell(s) kept ({seconds:.1f} s)."
    unknown = engine.unknown_words(kwargs.get("prompt") or "")
    if unknown:
        status += f"\n\n⚠ Words the model does not know were ignored: {', '.join(unknown)}"
    yield (result.grid, list(cells), result.params, status, grid_path)
