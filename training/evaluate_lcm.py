"""Prompt following of the distilled (LCM) model at 1, 2 and 4 steps beside the base at 20 DPM-Solver++ steps.

    python -m training.evaluate_lcm --model runs/lcm/pipeline --split validation --guidance 1.5,2.5,4  # choose
    python -m training.evaluate_lcm --model runs/lcm/pipeline [--count 200] [--json runs/lcm/scores.json]   # report

The prompts of a split of training/splits.py (validation for choices, test for the reported figures; the script
checks that they share no prompt) and the checker of training/evaluate.py, the same seeds for every row; each table
is printed again for the prompts never seen verbatim among the training captions. Rows:
the base (assets/models/shapes-ldm) at 20 DPM-Solver++ steps, as the app runs it; the base U-Net under
LCMScheduler with classifier-free guidance and without it (what the step counts give without distillation; the
latter is the student at step 0); the distilled model under its LCMScheduler (guidance by embedding, one U-Net
pass a step), at each `--guidance` scale.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from training import evaluate, splits
from training.train_lcm import DEFAULT_BASE, GRID_STEPS, default_guidance, lcm_scheduler

KEYS = ("colour", "shape", "position", "binding", "held_out_pair")


def following(pipe, expectations, *, steps: int, guidance: float, batch: int = 25, seed: int = 0) -> dict:
    """Verdicts and seconds per image of `pipe` (its own scheduler) on `expectations`, seeds as evaluate's."""
    pipe.set_progress_bar_config(disable=True)
    images, started = [], time.time()
    for first in range(0, len(expectations), batch):
        chunk = expectations[first:first + batch]
        generators = [torch.Generator().manual_seed(seed + first + i) for i in range(len(chunk))]
        out = pipe([e.prompt for e in chunk], num_inference_steps=steps, guidance_scale=guidance,
                   generator=generators, output_type="np")
        images.append(np.round(out.images * 255).astype(np.uint8))
    seconds = (time.time() - started) / len(expectations)
    verdicts = [evaluate.judge(image, e) for image, e in zip(np.concatenate(images), expectations)]
    return {"verdicts": verdicts, "s_per_image": seconds}


def summary(run: dict, keep: list[bool] | None = None) -> dict:
    """Scores of a run (over the prompts where `keep` is True, else all) and its seconds per image."""
    verdicts = [v for i, v in enumerate(run["verdicts"]) if keep is None or keep[i]]
    scores = evaluate.score(verdicts)
    return {**{key: scores[key] for key in KEYS}, "s_per_image": run["s_per_image"], "prompts": len(verdicts)}


def table(rows: dict, title: str) -> str:
    lines = [f"| {title} | " + " | ".join(KEYS) + " | s/image |", "|---" * (len(KEYS) + 2) + "|"]
    for name, row in rows.items():
        cells = [f"{row[key]:.1%}" for key in KEYS] + [f"{row['s_per_image']:.3f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("runs/lcm/pipeline"), help="train_lcm's exported folder")
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE)
    parser.add_argument("--split", choices=splits.SPLITS, default="test",
                        help="validation: where steps and guidance are chosen; test: the reported figures")
    parser.add_argument("--count", type=int, default=200, help="prompts of the split")
    parser.add_argument("--steps", default=",".join(str(s) for s in GRID_STEPS), help="distilled step counts")
    parser.add_argument("--guidance", default=None,
                        help="distilled guidance scales, comma-separated (default: the built-in preset's)")
    parser.add_argument("--fast-decoder", type=Path, default=None,
                        help="also score the distilled rows decoded by this AutoencoderTiny folder (the fast path's "
                             "decoder, training/train_tiny_vae.py)")
    parser.add_argument("--no-undistilled", dest="undistilled", action="store_false",
                        help="skip the rows of the base U-Net under LCMScheduler")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    from diffusers import StableDiffusionPipeline

    from training.common import set_threads

    set_threads(args.threads)
    splits.check(args.count)  # refuses splits that share a prompt or a scene with each other or with training
    base_guidance = default_guidance()
    scales = [float(g) for g in args.guidance.split(",")] if args.guidance else [base_guidance]
    step_counts = [int(s) for s in args.steps.split(",")]
    expectations = splits.prompts(args.split, args.count)
    unseen = [not splits.seen_in_training(e.prompt) for e in expectations]
    base = StableDiffusionPipeline.from_pretrained(args.base, safety_checker=None, requires_safety_checker=False)
    reference = evaluate.prompt_following(base, steps=20, guidance=base_guidance, expectations=expectations)
    runs = {f"base, 20 DPM-Solver++ steps, guidance {base_guidance:g}": {
        "verdicts": reference["verdicts"], "s_per_image": reference["seconds"] / len(expectations)}}
    undistilled = type(base).from_pipe(base, scheduler=lcm_scheduler(base.scheduler.config))
    distilled = StableDiffusionPipeline.from_pretrained(args.model)
    fast = None
    if args.fast_decoder:
        from diffusers import AutoencoderTiny

        # the tiny model takes the U-Net's latents (scaling_factor 1.0): a drop-in `vae` for decoding
        fast = type(distilled).from_pipe(distilled, vae=AutoencoderTiny.from_pretrained(args.fast_decoder).eval())
    for steps in step_counts:
        if args.undistilled:
            runs[f"base U-Net, LCMScheduler, {steps} steps"] = following(undistilled, expectations, steps=steps,
                                                                         guidance=base_guidance)
            # guidance 1 (no unconditional pass) is what the student computes at step 0: the gain of distillation
            # is over this row
            runs[f"base U-Net, LCMScheduler, no guidance, {steps} steps"] = following(
                undistilled, expectations, steps=steps, guidance=1.0)
        for scale in scales:
            runs[f"distilled, {steps} steps, guidance {scale:g}"] = following(distilled, expectations, steps=steps,
                                                                              guidance=scale)
            if fast is not None:
                runs[f"distilled, {steps} steps, guidance {scale:g}, tiny decoder"] = following(
                    fast, expectations, steps=steps, guidance=scale)
    rows = {name: summary(run) for name, run in runs.items()}
    unseen_rows = {name: summary(run, unseen) for name, run in runs.items()}
    print(table(rows, f"{args.split}: {args.count} prompts"))
    print()
    print(table(unseen_rows, f"{args.split}: the {sum(unseen)} prompts never seen verbatim in training"))
    if args.json:
        args.json.write_text(json.dumps({"split": args.split, "count": args.count, "unseen": sum(unseen),
                                         "rows": rows, "unseen_rows": unseen_rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
