"""Compare: one setting along X (and optionally another along Y), every other setting the same, one image per
cell, laid out as a labelled grid (AUTOMATIC1111's X/Y plot).

    result = compare(engine, prompt="a red circle", seed=1, steps=20, guidance=2.5,
                     x_axis="guidance", x_values="1, 2.5, 5", y_axis="prompt", y_values="red -> blue, green")
    result.grid                         # the labelled grid (PIL)
    result.images[i], result.cell_params[i]   # cell i (row-major), and what makes it again in its own tab

Every cell is the request its own tab makes with those settings (`txt2img.generate`, `style.stylize` in
img2img mode with an input image, `controlnet.generate` with an input image and a control type), so each cell's
PNG restores into that tab and gives the same bytes there. Each cell takes engine.lock on its own: other users'
requests run between cells. Cancel stops the running cell within one step; the cells made so far are kept.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from PIL import Image, ImageDraw, ImageFont

from pipelines.common import Cancelled, GenerationResult, InputError, check_choice, check_float, check_int, check_text

# axis -> (label, kind): kind says how its values are read and checked (`axis_values`)
AXES: dict[str, tuple[str, str]] = {
    "seed": ("Seed", "int"),
    "steps": ("Steps", "int"),
    "guidance": ("Guidance (CFG)", "float"),
    "scheduler": ("Scheduler", "choice"),
    "strength": ("Strength (img2img)", "float"),
    "conditioning_scale": ("ControlNet scale", "float"),
    "adapter_scale": ("Adapter strength", "float"),
    "prompt": ("Prompt search/replace", "text"),
}
MAX_SCALE = 2.0  # ControlNet conditioning scale and adapter strength (as their own tabs allow)
LABEL_PX = 14  # label font size in the grid
MIN_CELL_PX = 128  # smaller cells (the built-in 64x64) are enlarged in the grid image, not in their PNGs
_RANGE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*-\s*(-?\d+(?:\.\d+)?)\s*(?:\(\s*\+?\s*(\d+(?:\.\d+)?)\s*\)|"
                    r"\[\s*(\d+)\s*\])?\s*$")


@dataclass
class Axis:
    name: str
    values: list[Any]
    labels: list[str]

    @property
    def title(self) -> str:
        return AXES[self.name][0]


@dataclass
class CompareResult(GenerationResult):
    cell_params: list[dict[str, Any]] = field(default_factory=list)  # per cell, what its own tab needs
    grid: Image.Image | None = None
    x: Axis | None = None
    y: Axis | None = None
    cancelled: str = ""  # why the grid stopped early ("" when it is complete)

    def image_params(self, i: int) -> dict[str, Any]:
        return self.cell_params[i]


# --- reading the axes ---------------------------------------------------------------------------------------

def _split(text: str) -> list[str]:
    return [item.strip() for item in str(text).split(",") if item.strip()]


def _range(text: str, kind: str, name: str) -> list[float] | None:
    """"1-5" -> 1..5; "1-10 (+3)" -> 1, 4, 7, 10; "1-7.5 [4]" -> 4 values evenly from 1 to 7.5; else None."""
    match = _RANGE.match(text)
    if not match:
        return None
    start, end, step, count = match.groups()
    start, end = float(start), float(end)
    if count is not None:
        n = int(count)
        if n < 1:
            raise InputError(f"{name} values {text!r}: [{n}] must ask for at least one value")
        values = [start + (end - start) * i / (n - 1) for i in range(n)] if n > 1 else [start]
    else:
        step = float(step) if step is not None else 1.0
        if step <= 0:
            raise InputError(f"{name} values {text!r}: the step must be above 0")
        direction = 1 if end >= start else -1
        n = int(math.floor(abs(end - start) / step + 1e-9)) + 1
        if n > 10_000:
            raise InputError(f"{name} values {text!r} make {n} values")
        values = [start + direction * step * i for i in range(n)]
    return [round(v) if kind == "int" else round(v, 6) for v in values]


def axis_values(engine, name: str, text: Any, *, prompt: str = "") -> Axis:
    """The checked values of one axis from a list ("1, 2, 5"), a range ("1-5", "1-10 (+3)", "1-7.5 [4]"), or
    for the prompt a search term and its replacements ("red, blue, green" or "red -> blue, green")."""
    name = check_choice("axis", name, tuple(AXES))
    kind = AXES[name][1]
    if isinstance(text, (list, tuple)):
        text = ", ".join(str(v) for v in text)
    text = check_text(f"{name} values", text, engine.limits.max_prompt_chars)
    if not text.strip():
        raise InputError(f"{name} values are empty: give a list (1, 2, 5) or a range (1-5)")
    limits = engine.limits
    if kind == "text":
        search, arrow, rest = text.partition("->")
        items = [search.strip()] + _split(rest) if arrow else _split(text)
        if not items[0]:
            raise InputError(f"prompt values {text!r} name no search term (e.g. red -> blue, green)")
        if items[0] not in prompt:
            raise InputError(f"prompt search term {items[0]!r} is not in the prompt {prompt!r}")
        values = [prompt.replace(items[0], item) for item in items]
        return Axis(name, values, items)
    if kind == "choice":
        values = [engine.check_scheduler(item) for item in _split(text)]
        return Axis(name, values, list(values))
    numbers = _range(text, kind, name)
    if numbers is None:
        numbers = []
        for item in _split(text):
            try:
                numbers.append(int(item) if kind == "int" else float(item))
            except ValueError:
                raise InputError(f"{name} value {item!r} is not a {'whole number' if kind == 'int' else 'number'}") \
                    from None
    bounds = {"seed": (0, limits.max_seed), "steps": (1, limits.max_steps), "guidance": (0.0, limits.max_guidance),
              "strength": (0.01, 1.0), "conditioning_scale": (0.0, MAX_SCALE), "adapter_scale": (0.0, MAX_SCALE)}
    low, high = bounds[name]
    check = check_int if kind == "int" else check_float
    values = [check(name, v, low, high) for v in numbers]
    return Axis(name, values, [f"{v:g}" if kind == "float" else str(v) for v in values])


def check_grid(engine, x: Axis, y: Axis | None, width: int, height: int) -> None:
    """The grid within the server's limits: cells (LDS_MAX_COMPARE_CELLS) and pixels of all cells together
    (LDS_MAX_COMPARE_PIXELS)."""
    cells = len(x.values) * (len(y.values) if y else 1)
    limit = engine.limits.max_compare_cells
    if cells > limit:
        shape = f"{len(x.values)} x {len(y.values)}" if y else f"{len(x.values)}"
        raise InputError(f"the grid has {cells} cells ({shape}), above the limit of {limit}")
    pixels = cells * width * height
    if pixels > engine.limits.max_compare_pixels:
        raise InputError(f"the grid's cells hold {pixels:,} pixels ({cells} of {width}x{height}), above the limit of "
                         f"{engine.limits.max_compare_pixels:,}: fewer cells or a smaller size")


# --- running the grid ----------------------------------------------------------------------------------------

def _mode(image, control_type: str | None) -> str:
    if image is None:
        return "txt2img"
    return "controlnet" if control_type else "img2img"


def _check_axes(engine, axes: list[Axis], mode: str, adapter: str | None, prompt: str) -> None:
    names = [a.name for a in axes]
    if len(set(names)) != len(names):
        raise InputError(f"x_axis and y_axis are both {names[0]!r}: pick two different settings")
    if "strength" in names and mode != "img2img":
        raise InputError("the strength axis needs an input image (img2img) and no control type")
    if "conditioning_scale" in names and mode != "controlnet":
        raise InputError("the conditioning_scale axis needs an input image and a control type")
    if "adapter_scale" in names:
        if not adapter:
            raise InputError("the adapter_scale axis needs an adapter: pick one")
        found = engine.adapters.get(adapter)
        prompts = [prompt] + [v for a in axes if a.name == "prompt" for v in a.values]
        if any(adapter not in engine.adapters.active_for(p) for p in prompts):
            word = f"add its word {found.token!r}" if found.token else "switch it on"
            raise InputError(f"adapter {adapter!r} is not used by the prompt{'s' if len(prompts) > 1 else ''}: {word}")


def compare(engine, *, prompt: str, negative_prompt: str = "", seed: int, steps: int, guidance: float,
            scheduler: str | None = None, width: int | None = None, height: int | None = None,
            x_axis: str, x_values: Any, y_axis: str | None = None, y_values: Any = "", image=None,
            strength: float = 0.6, control_type: str | None = None, conditioning_scale: float = 1.0,
            adapter: str | None = None, on_step=None, on_cell: Callable | None = None,
            cancel=None) -> CompareResult:
    """Make every cell of the grid (row-major: Y rows, X columns) and the labelled grid image.

    `on_cell(index, image, params, grid)` is called as each cell is done (grid: the cells so far);
    `on_step(step, total, preview)` counts the steps of all cells as one run. Cancel keeps the cells made so
    far (`result.cancelled` says where it stopped).
    """
    from pipelines import controlnet, style, txt2img
    from pipelines.request import check_settings, check_size, working_size

    # 1. Check everything before the first cell: the shared settings, the axes, the combination, the limits
    settings = check_settings(engine, prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps,
                              guidance=guidance, scheduler=scheduler, batch_size=1)
    mode = _mode(image, control_type or None)
    if mode == "txt2img":
        width, height = check_size(engine, width or engine.preset.default_size, height or engine.preset.default_size)
    x = axis_values(engine, x_axis, x_values, prompt=settings["prompt"])
    y = axis_values(engine, y_axis, y_values, prompt=settings["prompt"]) if y_axis else None
    axes = [x] + ([y] if y else [])
    _check_axes(engine, axes, mode, adapter or None, settings["prompt"])
    base = dict(settings, strength=check_float("strength", strength, 0.01, 1.0),
                conditioning_scale=check_float("conditioning_scale", conditioning_scale, 0.0, MAX_SCALE),
                adapter_scale=engine.adapters.get(adapter).scale if adapter else None)
    work = control_map = None
    if mode != "txt2img":
        from pipelines import preprocess

        original = preprocess.load_image(image, max_pixels=engine.limits.max_image_pixels)
        width, height = working_size(engine, original.size)
        work = original.resize((width, height), Image.LANCZOS) if original.size != (width, height) else original
    check_grid(engine, x, y, width, height)
    if mode == "controlnet":
        engine.check_control_type(control_type)
        control_map = controlnet.preprocess(engine, image=work, control_type=control_type)

    cells = [(xi, yi) for yi in range(len(y.values) if y else 1) for xi in range(len(x.values))]
    cell_settings = []
    for xi, yi in cells:
        values = dict(base, **{x.name: x.values[xi]})
        if y:
            values[y.name] = y.values[yi]
        cell_settings.append(values)
    total = sum(int(v["steps"]) for v in cell_settings)

    def run_cell(values: dict, on_cell_step) -> GenerationResult:
        shared = {k: values[k] for k in ("prompt", "negative_prompt", "seed", "steps", "guidance", "scheduler")}
        if mode == "txt2img":
            return txt2img.generate(engine, **shared, width=width, height=height, on_step=on_cell_step,
                                    cancel=cancel)
        if mode == "img2img":
            return style.stylize(engine, image=work, style="", **shared, strength=values["strength"],
                                 mode="img2img", on_step=on_cell_step, cancel=cancel)
        return controlnet.generate(engine, control_images=[control_map], control_types=[control_type], **shared,
                                   conditioning_scales=values["conditioning_scale"], width=width, height=height,
                                   on_step=on_cell_step, cancel=cancel)

    # 2. The cells, in order; each takes engine.lock on its own, so other requests run in between
    images, cell_params, done, stopped = [], [], 0, ""
    for index, values in enumerate(cell_settings):
        def on_cell_step(step, _total, preview=None, offset=done):
            on_step(offset + step, total, preview)

        try:
            # without a watcher no step callback, so no live previews are made (as txt2img.generate without one)
            result = _with_adapter_scale(engine, adapter, values["adapter_scale"], run_cell, values,
                                         on_cell_step if on_step is not None else None)
        except Cancelled as error:
            stopped = f"cell {index + 1} of {len(cell_settings)}: {error}"
            break
        params = dict(result.params)
        if adapter:
            params["adapter_scale"] = values["adapter_scale"]
        params["compare_cell"] = {"x": {x.name: x.labels[cells[index][0]]},
                                  **({"y": {y.name: y.labels[cells[index][1]]}} if y else {})}
        images.append(result.images[0])
        cell_params.append(params)
        done += int(values["steps"])
        if on_cell is not None:
            on_cell(index, result.images[0], params, grid_image(images, x, y, (width, height)))

    grid_params = {"task": "compare", "model": engine.preset.name, **settings, "width": width, "height": height,
                   "mode": mode, "x_axis": x.name, "x_values": x.labels, "y_axis": y.name if y else None,
                   "y_values": y.labels if y else None, "cells": len(cell_settings), "cells_done": len(images)}
    if mode == "img2img":
        grid_params["strength"] = base["strength"]
    if mode == "controlnet":
        grid_params.update(control_type=control_type, conditioning_scale=base["conditioning_scale"])
    if adapter:
        grid_params.update(adapter=adapter, adapter_scale=base["adapter_scale"])
    grid = grid_image(images, x, y, (width, height))
    return CompareResult(images=images, params=grid_params, cell_params=cell_params, grid=grid, x=x, y=y,
                         cancelled=stopped, previews=[control_map] if control_map is not None else [])


def _with_adapter_scale(engine, adapter: str | None, scale: float | None, run_cell, values, on_cell_step):
    """Run one cell with `adapter` at `scale`: set and put back under engine.lock, so no other request ever runs
    with the cell's strength (AdapterSet.set_scale takes the same lock)."""
    if not adapter:
        return run_cell(values, on_cell_step)
    with engine.lock:
        found = engine.adapters.get(adapter)
        before = found.scale
        try:
            engine.adapters.set_scale(adapter, scale)
            return run_cell(values, on_cell_step)
        finally:
            engine.adapters.set_scale(adapter, before)


# --- the grid image ----------------------------------------------------------------------------------------------

def grid_image(images: list[Image.Image], x: Axis, y: Axis | None, size: tuple[int, int]) -> Image.Image:
    """Cells in rows of len(x.values) on white, X labels above the columns, Y labels left of the rows, each
    axis's name in its corner; missing cells (a cancelled grid) stay blank. Small cells are enlarged (nearest)."""
    factor = max(1, math.ceil(MIN_CELL_PX / max(1, min(size))))
    cw, ch = size[0] * factor, size[1] * factor
    font = ImageFont.load_default(size=LABEL_PX)
    rows = len(y.values) if y else 1
    columns = len(x.values)
    gap = 4
    line = LABEL_PX + 6
    x_lines = [_wrap(label, font, cw) for label in x.labels]
    top = line * (1 + max(len(lines) for lines in x_lines))
    y_lines = [_wrap(label, font, max(cw, 160)) for label in y.labels] if y else []
    left = (max((font.getbbox(s)[2] for lines in y_lines for s in lines), default=0) + 12) if y else 0
    left = max(left, font.getbbox(y.title)[2] + 12) if y else 0
    canvas = Image.new("RGB", (left + columns * (cw + gap), top + rows * (ch + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((left, 2), f"X: {x.title}" + (f"   Y: {y.title}" if y else ""), fill=(90, 90, 90), font=font)
    for c, lines in enumerate(x_lines):
        for k, text in enumerate(lines):
            draw.text((left + c * (cw + gap), line * (1 + k)), text, fill="black", font=font)
    for r in range(rows):
        if y:
            for k, text in enumerate(y_lines[r]):
                draw.text((4, top + r * (ch + gap) + k * line), text, fill="black", font=font)
        for c in range(columns):
            i = r * columns + c
            if i < len(images):
                cell = images[i].convert("RGB")
                cell = cell.resize((cw, ch), Image.NEAREST) if cell.size != (cw, ch) else cell
                canvas.paste(cell, (left + c * (cw + gap), top + r * (ch + gap)))
    return canvas


def _wrap(text: str, font, width: int) -> list[str]:
    """`text` in lines no wider than `width` pixels (words kept whole where they fit)."""
    lines, current = [], ""
    for word in str(text).split():
        trial = f"{current} {word}".strip()
        if current and font.getbbox(trial)[2] > width:
            lines.append(current)
            current = word
        else:
            current = trial
    return lines + [current] if current else lines or [""]
