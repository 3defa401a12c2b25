"""Prompt following of the distilled (LCM) model at 1, 2 and 4 steps beside the base at 20 DPM-Solver++ steps.

    python -m training.evaluate_lcm --model runs/lcm/pipeline [--count 200] [--json runs/lcm/scores.json]

The held-out test prompts and the checker of training/evaluate.py, the same seeds for every row. Rows:
the base (assets/models/shapes-ldm) at 20 DPM-Solver++ steps, as the app runs it; the base U-Net under
LCMScheduler with classifier-free guidance and without it (what the step counts give without distillation; the
latter is the student at step 0); the distilled model under its LCMScheduler (guidance by embedding, one U-Net
pass a step). All at the built-in preset's guidance scale.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from training import evaluate
from training.train_lcm import DEFAULT_BASE, GRID_STEPS, default_guidance, lcm_scheduler

KEYS = ("colour", "shape", "position", "binding", "held_out_pair")


def following(pipe, expectations, *, steps: int, guidance: float, batch: int = 25, seed: int = 0) -> dict:
    """Scores and seconds per image of `pipe` (its own scheduler) on `expectations`, seeds as evaluate's."""
    pipe.set_progress_bar_config(disable=True)
    images, started = [], time.time()
    for first in range(0, len(expectations), batch):
        chunk = expectations[first:first + batch]
        generators = [torch.Generator().manual_seed(seed + first + i) for i in range(len(chunk))]
        out = pipe([e.prompt for e in chunk], num_inference_steps=steps, guidance_scale=guidance,
                   generator=generators, output_type="np")
        images.append(np.round(out.images * 255).astype(np.uint8))
    seconds = (time.time() - started) / len(expectations)
    scores = evaluate.score([evaluate.judge(image, e) for image, e in zip(np.concatenate(images), expectations)])
    return {**{key: scores[key] for key in KEYS}, "s_per_image": seconds}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("runs/lcm/pipeline"), help="train_lcm's exported folder")
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE)
    parser.add_argument("--count", type=int, default=200, help="held-out test prompts")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    from diffusers import StableDiffusionPipeline

    from training.common import set_threads

    set_threads(args.threads)
    guidance = default_guidance()
    expectations = evaluate.held_out_prompts(args.count)
    base = StableDiffusionPipeline.from_pretrained(args.base, safety_checker=None, requires_safety_checker=False)
    reference = evaluate.prompt_following(base, steps=20, guidance=guidance, expectations=expectations)
    rows = {"base, 20 DPM-Solver++ steps": {**{key: reference["scores"][key] for key in KEYS},
                                            "s_per_image": reference["seconds"] / len(expectations)}}
    undistilled = type(base).from_pipe(base, scheduler=lcm_scheduler(base.scheduler.config))
    distilled = StableDiffusionPipeline.from_pretrained(args.model)
    for steps in GRID_STEPS:
        rows[f"base U-Net, LCMScheduler, {steps} steps"] = following(undistilled, expectations, steps=steps,
                                                                     guidance=guidance)
        # guidance 1 (no unconditional pass) is what the student computes at step 0: the gain of distillation
        # is over this row
        rows[f"base U-Net, LCMScheduler, no guidance, {steps} steps"] = following(undistilled, expectations,
                                                                                  steps=steps, guidance=1.0)
        rows[f"distilled, {steps} steps"] = following(distilled, expectations, steps=steps, guidance=guidance)
    print(f"| {args.count} held-out prompts, guidance {guidance:g} | " + " | ".join(KEYS) + " | s/image |")
    print("|---" * (len(KEYS) + 2) + "|")
    for name, row in rows.items():
        cells = [f"{row[key]:.1%}" for key in KEYS] + [f"{row['s_per_image']:.3f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"guidance": guidance, "count": args.count, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
