"""7. A Compare grid: a 5 x 5 grid of 64x64 images at 20 steps on the built-in model (goal: <= 30 s on 2 idle
cores), next to 25 single text-to-image runs of the same settings, so the grid's own cost (labels, live cells,
one lock per cell) shows as a ratio.

    python -m benchmarks.compare_grid [--model FOLDER] [--threads N] [--repeats N] [--quick]
"""
from __future__ import annotations

import time

from benchmarks.common import Options, Row, build_engine, interleaved_medians, model_folder, standalone

PART = "7 compare grid"
GRID_GOAL = "<= 30"
SIDE = 5  # cells per axis


def run(opts: Options) -> list[Row]:
    from pipelines import compare, txt2img

    folder, note = model_folder(opts)
    if note:
        opts.notes.append(note)
    engine = build_engine(folder)
    side = 2 if opts.quick else SIDE
    steps = opts.steps
    size = engine.preset.default_size
    settings = dict(prompt="a big red circle on the left", negative_prompt="", seed=1, steps=steps,
                    guidance=engine.preset.default_guidance, width=size, height=size)
    axes = dict(x_axis="seed", x_values=f"1-{side}", y_axis="guidance", y_values=f"1-7 [{side}]")

    def grid():
        result = compare.compare(engine, **settings, **axes)
        assert len(result.images) == side * side and not result.cancelled

    def singles():
        for seed in range(1, side * side + 1):
            txt2img.generate(engine, **{**settings, "seed": seed})

    repeats = 1 if opts.quick else max(1, min(3, opts.repeats))
    started = time.perf_counter()
    # in turns (grid, singles, grid, ...), so a machine whose load changes slows both alike
    times = interleaved_medians({"grid": grid, "singles": singles}, repeats=repeats, warmup=1)
    grid_s, singles_s = times["grid"], times["singles"]
    cells = side * side
    return [
        Row(PART, f"{side}x{side} grid of {size}x{size}, {steps} steps (median of {repeats})", grid_s, "s",
            GRID_GOAL, f"{grid_s / cells:.3f} s per cell; {engine.threads} model thread(s)"),
        Row(PART, "grid vs the same images as single txt2img runs", grid_s / singles_s, "x", "",
            f"grid {grid_s:.2f} s vs {cells} single runs {singles_s:.2f} s "
            f"(part took {time.perf_counter() - started:.0f} s)"),
    ]


if __name__ == "__main__":
    raise SystemExit(standalone(PART, run))
