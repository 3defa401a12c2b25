"""Run every benchmark and print one table of ratios next to their goals.

    python -m benchmarks                 # all ten parts: a few minutes on 2 CPU cores, plus the soak's 500 requests
    python -m benchmarks --quick         # tiny smoke run (tests/test_benchmarks.py)
    python -m benchmarks --only 1,3      # some parts
    python -m benchmarks.gpu             # SD1.5-shaped it/s on a CUDA GPU (separate; exits cleanly without one)

Parts: 1 app overhead, 2 sharing (memory), 3 throughput, 4 latency, 5 LDM FLOPs claim, 6 soak (disk and
memory per request over hundreds of requests), 7 a Compare grid (5x5 of 64x64 at 20 steps), 8 the fast backend
(U-Net steps on ONNX Runtime vs eager: start cost, step and end-to-end times, what differs), 9 Live mode in Chromium,
10 the fast path (the distilled model with its tiny decoder on ONNX Runtime vs plain diffusers at 20 steps). Each
part is also a module of its own (`python -m benchmarks.app_overhead`, ...). Absolute times depend on the machine
and its load; the ratios are what to compare.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback

from benchmarks import (
    app_overhead,
    compare_grid,
    distilled,
    fast_path,
    latency,
    ldm_flops,
    live_mode,
    memory,
    soak,
    throughput,
)
from benchmarks.common import Row, add_arguments, machine_line, options_from, print_table, quiet_libraries, set_threads

PARTS = {
    "1": ("app overhead", app_overhead.run),
    "2": ("sharing", memory.run),
    "3": ("throughput", throughput.run),
    "4": ("latency", latency.run),
    "5": ("LDM FLOPs", ldm_flops.run),
    "6": ("soak", soak.run),
    "7": ("compare grid", compare_grid.run),
    "8": ("fast path", fast_path.run),
    "9": ("live mode", live_mode.run),
    "10": ("distilled fast path", distilled.run),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    add_arguments(parser)
    parser.add_argument("--only", default=",".join(PARTS), help="comma-separated parts to run (1-10)")
    args = parser.parse_args(argv)
    opts = options_from(args)
    quiet_libraries()
    threads = set_threads(opts)
    rows: list[Row] = []
    failed = False
    started = time.perf_counter()
    for key in [k.strip() for k in args.only.split(",") if k.strip()]:
        if key not in PARTS:
            parser.error(f"--only {key}: parts are {', '.join(PARTS)}")
        name, run = PARTS[key]
        print(f"[benchmarks] part {key}: {name} ...", file=sys.stderr, flush=True)
        part_started = time.perf_counter()
        try:
            rows += run(opts)
        except Exception as error:  # the other parts still run and the table still prints
            failed = True
            traceback.print_exc()
            rows.append(Row(f"{key} {name}", "FAILED", float("nan"), detail=f"{type(error).__name__}: {error}"[:200]))
        print(f"[benchmarks] part {key} took {time.perf_counter() - part_started:.0f} s", file=sys.stderr, flush=True)
    title = (f"Latent Diffusion Studio benchmarks{' (--quick)' if opts.quick else ''}: {machine_line(threads)}, "
             f"{time.perf_counter() - started:.0f} s")
    print_table(rows, opts.notes, title=title)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
