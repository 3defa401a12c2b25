"""Held-out evaluation of the Shapes LDM: VAE PSNR, prompt following, speed.

    python -m training.evaluate --model assets/models/shapes-ldm [--write-card]

Prompt following is judged by an OpenCV checker that knows the world's rules but not the model:
it renders the prompt's empty background, segments whatever differs from it, and for each object
classifies its colour (nearest palette colour of the median pixel), its shape (best IoU against each
shape's template fitted to the object's box) and its position (the cell of the 3x3 grid holding its
centroid). Held-out prompts come from seeds the training never used, and include the colour-shape
pairs that never occur in training scenes (`shapes.HELD_OUT_PAIRS`), scored separately as composition.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from training import shapes
from training.common import HELD_OUT_SEED

EVAL_BACKGROUNDS = ("plain", "sky", "grass", "sand", "night")  # snow hides white objects from a diff checker
FOREGROUND_THRESHOLD = 35  # max channel difference from the empty background that counts as object
MIN_OBJECT_PIXELS = 12


# ----------------------------------------------------------------------------- held-out prompts

@dataclass
class Expectation:
    prompt: str
    background: str
    objects: list[tuple[str, str]]  # (colour, shape) in prompt order
    position: str | None = None  # single-object prompts with a position
    relation: str | None = None  # "left of" / "right of" / "above" / "below" / "and"
    held_out_pair: bool = False


def held_out_prompts(count: int, seed: int = HELD_OUT_SEED) -> list[Expectation]:
    """A deterministic mix: 40% single object with position, 20% held-out colour-shape pairs, 40% two objects."""
    rng = np.random.default_rng(seed)
    colours, positions = list(shapes.COLOURS), list(shapes.POSITIONS)
    held_pairs = sorted(shapes.HELD_OUT_PAIRS)
    prompts = []
    for i in range(count):
        background = str(rng.choice(EVAL_BACKGROUNDS))
        suffix = (" " + shapes.BACKGROUNDS[background][0]) if shapes.BACKGROUNDS[background][0] else ""
        kind = i % 5
        if kind in (0, 1):
            colour, shape = str(rng.choice(colours)), str(rng.choice(shapes.SHAPES))
            while (colour, shape) in shapes.HELD_OUT_PAIRS:
                colour, shape = str(rng.choice(colours)), str(rng.choice(shapes.SHAPES))
            position = str(rng.choice(positions))
            phrase = shapes.POSITIONS[position][0]
            prompt = f"{shapes.article(colour)} {colour} {shape} {phrase}{suffix}"
            prompts.append(Expectation(prompt, background, [(colour, shape)], position=position))
        elif kind == 2:
            colour, shape = held_pairs[int(rng.integers(len(held_pairs)))]
            prompt = f"{shapes.article(colour)} {colour} {shape}{suffix}"
            prompts.append(Expectation(prompt, background, [(colour, shape)], held_out_pair=True))
        else:
            first = (str(rng.choice(colours)), str(rng.choice(shapes.SHAPES)))
            second = first
            while second[0] == first[0] or second[1] == first[1]:
                second = (str(rng.choice(colours)), str(rng.choice(shapes.SHAPES)))
            relation = str(rng.choice(["and", "left of", "above"]))
            prompt = f"{shapes.article(first[0])} {first[0]} {first[1]} {relation} {shapes.article(second[0])} {second[0]} {second[1]}{suffix}"
            prompts.append(Expectation(prompt, background, [first, second], relation=relation))
    return prompts


# ----------------------------------------------------------------------------- the checker

@dataclass
class Found:
    colour: str
    shape: str
    centroid: tuple[float, float]
    pixels: int


_PALETTE_NAMES = list(shapes.COLOURS)
_PALETTE = np.array([shapes.COLOURS[c] for c in _PALETTE_NAMES], np.float32)


def classify_colour(rgb: np.ndarray) -> str:
    return _PALETTE_NAMES[int(np.argmin(((_PALETTE - rgb[None, :]) ** 2).sum(1)))]


def classify_shape(mask: np.ndarray) -> str:
    """The shape whose template, fitted to the object's box, overlaps the mask best (IoU)."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    best, best_iou = shapes.SHAPES[0], -1.0
    for kind in shapes.SHAPES:
        # Fit the template's box to the object's box: render once at a known size, measure, rescale.
        probe = shapes.shape_mask(kind, (32, 32), 10.0) > 0.5
        pys, pxs = np.nonzero(probe)
        scale = max((x1 - x0) / (pxs.max() + 1 - pxs.min()), (y1 - y0) / (pys.max() + 1 - pys.min()))
        half = 10.0 * scale
        box_cx, box_cy = (pxs.min() + pxs.max() + 1) / 2, (pys.min() + pys.max() + 1) / 2
        centre = ((x0 + x1) / 2 + (32 - box_cx) * scale, (y0 + y1) / 2 + (32 - box_cy) * scale)
        template = shapes.shape_mask(kind, centre, half) > 0.5
        iou = (template & mask).sum() / max((template | mask).sum(), 1)
        if iou > best_iou:
            best, best_iou = kind, iou
    return best


def find_objects(image: np.ndarray, background: str) -> list[Found]:
    """Objects in a generated image, largest first."""
    empty, _ = shapes.background_image(background)
    diff = np.abs(image.astype(np.float32) - empty).max(axis=2)
    mask = (diff > FOREGROUND_THRESHOLD).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((2, 2), np.uint8))
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    found = []
    for label in range(1, count):
        pixels = int(stats[label, cv2.CC_STAT_AREA])
        if pixels < MIN_OBJECT_PIXELS:
            continue
        component = labels == label
        core = cv2.erode(component.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        colour_pixels = image[core] if core.sum() >= 4 else image[component]
        found.append(Found(classify_colour(np.median(colour_pixels, axis=0)), classify_shape(component),
                           (float(centroids[label][0]), float(centroids[label][1])), pixels))
    return sorted(found, key=lambda f: -f.pixels)


def position_of(centroid: tuple[float, float]) -> str:
    """The 3x3 grid cell of a centroid, named like the captions' positions."""
    size = shapes.IMAGE_SIZE
    col = "left" if centroid[0] < size / 3 else ("right" if centroid[0] >= 2 * size / 3 else "")
    row = "top" if centroid[1] < size / 3 else ("bottom" if centroid[1] >= 2 * size / 3 else "")
    return f"{row} {col}".strip() or "center"


def judge(image: np.ndarray, expected: Expectation) -> dict[str, bool | None]:
    """Per-criterion verdicts for one image (None where the criterion does not apply)."""
    found = find_objects(image, expected.background)
    verdict: dict[str, bool | None] = {"colour": None, "shape": None, "position": None, "count": None, "binding": None, "held_out_pair": None}
    verdict["count"] = len(found) == len(expected.objects)
    if len(expected.objects) == 1:
        main = found[0] if found else None
        colour, shape = expected.objects[0]
        ok_colour = main is not None and main.colour == colour
        ok_shape = main is not None and main.shape == shape
        if expected.held_out_pair:
            verdict["held_out_pair"] = ok_colour and ok_shape
        else:
            verdict["colour"], verdict["shape"] = ok_colour, ok_shape
            verdict["position"] = main is not None and position_of(main.centroid) == expected.position
    else:
        # Binding: each requested (colour, shape) is matched by a distinct object; relations checked too.
        matches = []
        remaining = list(found[:4])
        for colour, shape in expected.objects:
            hit = next((f for f in remaining if f.colour == colour and f.shape == shape), None)
            matches.append(hit)
            if hit is not None:
                remaining.remove(hit)
        ok = all(m is not None for m in matches)
        if ok and expected.relation == "left of":
            ok = matches[0].centroid[0] < matches[1].centroid[0]
        elif ok and expected.relation == "above":
            ok = matches[0].centroid[1] < matches[1].centroid[1]
        verdict["binding"] = ok
    return verdict


def score(verdicts: list[dict]) -> dict[str, float]:
    keys = ("colour", "shape", "position", "count", "binding", "held_out_pair")
    result = {}
    for key in keys:
        values = [v[key] for v in verdicts if v[key] is not None]
        result[key] = float(np.mean(values)) if values else float("nan")
    return result


# ----------------------------------------------------------------------------- running a model

def prompt_following(pipe, *, count: int = 200, steps: int = 20, guidance: float = 5.0, batch: int = 25, seed: int = 0) -> dict:
    """Generates `count` held-out prompts (DPM-Solver++, `steps`) and scores them."""
    import torch
    from diffusers import DPMSolverMultistepScheduler

    pipe.set_progress_bar_config(disable=True)
    scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    view = type(pipe).from_pipe(pipe, scheduler=scheduler)
    expectations = held_out_prompts(count)
    images = []
    started = time.time()
    for first in range(0, count, batch):
        chunk = expectations[first:first + batch]
        generators = [torch.Generator().manual_seed(seed + first + i) for i in range(len(chunk))]
        out = view([e.prompt for e in chunk], num_inference_steps=steps, guidance_scale=guidance,
                   generator=generators, output_type="np")
        images.append(np.round(out.images * 255).astype(np.uint8))
    images = np.concatenate(images)
    verdicts = [judge(image, e) for image, e in zip(images, expectations)]
    return {"scores": score(verdicts), "images": images, "prompts": [e.prompt for e in expectations],
            "verdicts": verdicts, "seconds": time.time() - started}


def vae_psnr(vae, count: int = 256) -> float:
    import torch
    from training.common import images_to_tensor, tensor_to_images
    from training.train_vae import psnr

    images, _ = shapes.batch(range(HELD_OUT_SEED, HELD_OUT_SEED + count))
    with torch.no_grad():
        recon = tensor_to_images(vae.decode(vae.encode(images_to_tensor(images)).latent_dist.mode()).sample)
    return psnr(images, recon)


def ms_per_image(pipe, steps: int = 20, repeats: int = 5) -> float:
    """Median wall time of one 64x64 image, batch 1, CFG, DPM-Solver++ `steps`."""
    import torch

    timings = []
    for i in range(repeats + 1):
        started = time.perf_counter()
        pipe("a red circle", num_inference_steps=steps, guidance_scale=5.0, generator=torch.Generator().manual_seed(i), output_type="np")
        timings.append(time.perf_counter() - started)
    return float(np.median(timings[1:]) * 1000)  # the first call warms up


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("assets/models/shapes-ldm"))
    parser.add_argument("--count", type=int, default=200, help="held-out prompts")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--grid", type=Path, default=None, help="write a grid of the first 40 results here")
    parser.add_argument("--json", type=Path, default=None, help="write the scores as JSON here")
    args = parser.parse_args(argv)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    result = prompt_following(pipe, count=args.count, steps=args.steps, guidance=args.guidance)
    scores = dict(result["scores"])
    scores["vae_psnr_db"] = vae_psnr(pipe.vae)
    scores["ms_per_image_20_steps"] = ms_per_image(pipe, steps=20)
    scores["prompts"] = args.count
    print(json.dumps(scores, indent=2))
    if args.grid:
        from training.common import save_grid
        save_grid(result["images"][:40], args.grid)
    if args.json:
        args.json.write_text(json.dumps(scores, indent=2) + "\n")


if __name__ == "__main__":
    main()
