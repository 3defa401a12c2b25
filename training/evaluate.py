"""Held-out evaluation of the Shapes LDM: VAE PSNR, prompt following, speed.

    python -m training.evaluate --model assets/models/shapes-ldm [--write-card]
    python -m training.evaluate --controls [--write-cards]     # annotators and ControlNets (see evaluate_controls)

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
from training.shapes import IMAGE_SIZE

EVAL_BACKGROUNDS = ("plain", "sky", "grass", "sand", "night")  # snow hides white objects from a diff checker
FOREGROUND_THRESHOLD = 35  # max channel difference from the empty background that counts as object
MIN_OBJECT_PIXELS = 12
# Shape masks: "half-contrast" outlines each object where its difference from the background reaches half
# of its own (the usual edge definition: where a sharp edge is, whatever the blur); "detection" takes the
# whole component at FOREGROUND_THRESHOLD, faint halo included, which rounds every blurred corner and star
# point. On held-out renders blurred by a 1 px Gaussian (a decoder's softness) the shape of 86.6% of
# objects is right with detection masks, 95.4% with half-contrast ones; on sharp renders 98.8% and 98.5%.
SHAPE_MASKS = ("half-contrast", "detection")


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
    positions = list(shapes.POSITIONS)
    held_pairs = sorted(shapes.HELD_OUT_PAIRS)
    prompts = []
    for i in range(count):
        background = str(rng.choice(EVAL_BACKGROUNDS))
        suffix = (" " + shapes.BACKGROUNDS[background][0]) if shapes.BACKGROUNDS[background][0] else ""
        kind = i % 5
        if kind in (0, 1):
            colour, shape = shapes._random_pair(rng)
            position = str(rng.choice(positions))
            phrase = shapes.POSITIONS[position][0]
            prompt = f"{shapes.article(colour)} {colour} {shape} {phrase}{suffix}"
            prompts.append(Expectation(prompt, background, [(colour, shape)], position=position))
        elif kind == 2:
            colour, shape = held_pairs[int(rng.integers(len(held_pairs)))]
            prompt = f"{shapes.article(colour)} {colour} {shape}{suffix}"
            prompts.append(Expectation(prompt, background, [(colour, shape)], held_out_pair=True))
        else:
            prompts.append(two_object_expectation(rng, background, suffix))
    return prompts


def two_object_expectation(rng: np.random.Generator, background: str, suffix: str) -> Expectation:
    """'a red circle left of a blue square<suffix>': two objects differing in colour and in shape, and a relation."""
    colours = list(shapes.COLOURS)
    first = (str(rng.choice(colours)), str(rng.choice(shapes.SHAPES)))
    second = first
    while second[0] == first[0] or second[1] == first[1]:
        second = (str(rng.choice(colours)), str(rng.choice(shapes.SHAPES)))
    relation = str(rng.choice(["and", "left of", "above"]))
    prompt = (f"{shapes.article(first[0])} {first[0]} {first[1]} {relation} "
              f"{shapes.article(second[0])} {second[0]} {second[1]}{suffix}")
    return Expectation(prompt, background, [first, second], relation=relation)


# ----------------------------------------------------------------------------- the checker

@dataclass
class Found:
    colour: str
    shape: str
    centroid: tuple[float, float]
    pixels: int


_PALETTE_NAMES = list(shapes.COLOURS)
_PALETTE = np.array([shapes.COLOURS[c] for c in _PALETTE_NAMES], np.float32)


def colour_names(pixels: np.ndarray) -> np.ndarray:
    """The palette colour nearest each of (N, 3) pixels."""
    distances = ((pixels[:, None, :].astype(np.float32) - _PALETTE[None]) ** 2).sum(2)
    return np.asarray(_PALETTE_NAMES)[distances.argmin(1)]


def classify_colour(rgb: np.ndarray) -> str:
    return str(colour_names(np.asarray(rgb, np.float32)[None])[0])


def classify_shape(mask: np.ndarray) -> str:
    """The shape whose template, fitted to the object's box, overlaps the mask best (IoU)."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    height, width = mask.shape  # templates are drawn on the mask's own canvas (64x64 in world 1)
    best, best_iou = shapes.SHAPES[0], -1.0
    for kind in shapes.SHAPES:
        # Fit the template's box to the object's box: render once at a known size, measure, rescale.
        probe = shapes.shape_mask(kind, (32, 32), 10.0) > 0.5
        pys, pxs = np.nonzero(probe)
        scale = max((x1 - x0) / (pxs.max() + 1 - pxs.min()), (y1 - y0) / (pys.max() + 1 - pys.min()))
        half = 10.0 * scale
        box_cx, box_cy = (pxs.min() + pxs.max() + 1) / 2, (pys.min() + pys.max() + 1) / 2
        centre = ((x0 + x1) / 2 + (32 - box_cx) * scale, (y0 + y1) / 2 + (32 - box_cy) * scale)
        template = shapes.shape_mask(kind, centre, half, IMAGE_SIZE if width == height == IMAGE_SIZE
                                     else (width, height)) > 0.5
        iou = (template & mask).sum() / max((template | mask).sum(), 1)
        if iou > best_iou:
            best, best_iou = kind, iou
    return best


def foreground(image: np.ndarray, background: str) -> tuple[np.ndarray, np.ndarray]:
    """Where `image` differs from the empty `background` drawn at its size (the horizon at the same share of its
    height): the largest channel difference (H, W) float32, and the object mask (H, W) uint8, opened 2x2 so stray
    pixels are not objects."""
    height, width = image.shape[:2]
    empty, _ = shapes.background_image(background, (width, height))
    diff = np.abs(image.astype(np.float32) - empty).max(axis=2)
    mask = cv2.morphologyEx((diff > FOREGROUND_THRESHOLD).astype(np.uint8), cv2.MORPH_OPEN, np.ones((2, 2), np.uint8))
    return diff, mask


def find_objects(image: np.ndarray, background: str, shape_mask: str = "half-contrast") -> list[Found]:
    """Objects in a generated image, largest first; `shape_mask` (SHAPE_MASKS) says which outline is classified.
    Any canvas (`foreground`)."""
    diff, mask = foreground(image, background)
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    found = []
    for label in range(1, count):
        pixels = int(stats[label, cv2.CC_STAT_AREA])
        if pixels < MIN_OBJECT_PIXELS:
            continue
        component = labels == label
        core = cv2.erode(component.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        colour_pixels = image[core] if core.sum() >= 4 else image[component]
        outline = component
        if shape_mask == "half-contrast":
            half = component & (diff >= 0.5 * np.percentile(diff[component], 90))
            outline = half if half.sum() >= MIN_OBJECT_PIXELS // 2 else component
        found.append(Found(classify_colour(np.median(colour_pixels, axis=0)), classify_shape(outline),
                           (float(centroids[label][0]), float(centroids[label][1])), pixels))
    return sorted(found, key=lambda f: -f.pixels)


def position_of(centroid: tuple[float, float], width: int = IMAGE_SIZE, height: int = IMAGE_SIZE) -> str:
    """The 3x3 grid cell of a centroid on a width x height canvas, named like the captions' positions."""
    col = "left" if centroid[0] < width / 3 else ("right" if centroid[0] >= 2 * width / 3 else "")
    row = "top" if centroid[1] < height / 3 else ("bottom" if centroid[1] >= 2 * height / 3 else "")
    return f"{row} {col}".strip() or "center"


def judge(image: np.ndarray, expected: Expectation, shape_mask: str = "half-contrast") -> dict[str, bool | None]:
    """Per-criterion verdicts for one image (None where the criterion does not apply)."""
    found = find_objects(image, expected.background, shape_mask)
    verdict: dict[str, bool | None] = {"colour": None, "shape": None, "position": None, "count": None, "binding": None,
                                       "colour_binding": None, "held_out_pair": None}
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
            verdict["position"] = main is not None and position_of(
                main.centroid, image.shape[1], image.shape[0]) == expected.position
    else:
        # Binding: each requested (colour, shape) is matched by a distinct object; relations checked too.
        # Colour binding asks the same of the colours alone, to tell composition errors from shape errors.
        verdict["binding"] = _bound(found, expected, with_shape=True)
        verdict["colour_binding"] = _bound(found, expected, with_shape=False)
    return verdict


def _bound(found: list[Found], expected: Expectation, *, with_shape: bool) -> bool:
    matches = []
    remaining = list(found[:4])
    for colour, shape in expected.objects:
        hit = next((f for f in remaining if f.colour == colour and (f.shape == shape or not with_shape)), None)
        matches.append(hit)
        if hit is not None:
            remaining.remove(hit)
    if not all(m is not None for m in matches):
        return False
    if expected.relation == "left of":
        return matches[0].centroid[0] < matches[1].centroid[0]
    if expected.relation == "above":
        return matches[0].centroid[1] < matches[1].centroid[1]
    return True


def score(verdicts: list[dict]) -> dict[str, float]:
    keys = ("colour", "shape", "position", "count", "binding", "colour_binding", "held_out_pair")
    result = {}
    for key in keys:
        values = [v[key] for v in verdicts if v[key] is not None]
        result[key] = float(np.mean(values)) if values else float("nan")
    return result


# ----------------------------------------------------------------------------- running a model

def prompt_following(pipe, *, count: int = 200, steps: int = 20, guidance: float = 5.0, batch: int = 25, seed: int = 0,
                     prompt_seed: int = HELD_OUT_SEED, karras: bool = False,
                     expectations: list[Expectation] | None = None) -> dict:
    """Generates `count` held-out prompts (DPM-Solver++, `steps`) and scores them.

    `prompt_seed` picks another prompt set of the same mix: sampler settings are tuned on one, so the
    reported scores on the default set are not chosen on the prompts they are measured with.
    `expectations` gives the prompts instead (e.g. a split of training/splits.py); `count` is then theirs."""
    import torch
    from diffusers import DPMSolverMultistepScheduler

    pipe.set_progress_bar_config(disable=True)
    scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                        use_karras_sigmas=karras)
    view = type(pipe).from_pipe(pipe, scheduler=scheduler)
    view.set_progress_bar_config(disable=True)
    if expectations is None:
        expectations = held_out_prompts(count, seed=prompt_seed)
    count = len(expectations)
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
    scores = score(verdicts)
    # The same images judged with the previous checker's shape masks, so figures from before stay comparable
    previous = score([judge(image, e, "detection") for image, e in zip(images, expectations)])
    scores.update({f"{key}_detection_mask": previous[key] for key in ("shape", "binding", "held_out_pair")})
    return {"scores": scores, "images": images, "prompts": [e.prompt for e in expectations],
            "verdicts": verdicts, "seconds": time.time() - started}


def vae_round_trip(vae, images: np.ndarray, chunk: int = 50) -> np.ndarray:
    """`images` (N, H, W, 3) uint8 encoded and decoded by `vae` (posterior mode), `chunk` at a time."""
    from training.train_vae import reconstruct

    return np.concatenate([reconstruct(vae, images[i:i + chunk]) for i in range(0, len(images), chunk)])


def vae_psnr(vae, count: int = 256) -> float:
    from training.train_vae import psnr

    images, _ = shapes.batch(range(HELD_OUT_SEED, HELD_OUT_SEED + count))
    return psnr(images, vae_round_trip(vae, images))


def held_out_renders(count: int) -> tuple[list[Expectation], np.ndarray]:
    """Held-out world scenes of the kinds the prompts ask for (flat shapes, one or two, on the checker's
    backgrounds), each with the expectation its own caption sets."""
    expectations, images, seed = [], [], HELD_OUT_SEED + 500_000
    while len(expectations) < count:
        seed += 1
        scene = shapes.random_scene(np.random.default_rng(seed))
        if scene.background not in EVAL_BACKGROUNDS or any(
            o.kind == "person" or o.style != "flat" for o in scene.objects
        ):
            continue
        relation = None
        if len(scene.objects) == 2:
            first, second = scene.objects
            if first.colour == second.colour or first.kind == second.kind:  # the prompts never ask for those
                continue
            relation = next((r for r in shapes.RELATIONS if f" {r} " in scene.caption), "and")
            if relation in ("right of", "below"):  # judged as the mirrored relation with the objects swapped
                relation = {"right of": "left of", "below": "above"}[relation]
                scene.objects.reverse()
        expectations.append(Expectation(scene.caption, scene.background, [(o.colour, o.kind) for o in scene.objects],
                                        relation=relation))
        images.append(shapes.render(scene).image)
    return expectations, np.stack(images)


def vae_ceiling(vae, count: int = 300) -> dict[str, float]:
    """The checker's shape and binding scores on held-out renders after a VAE round trip.

    A generated image reaches the screen through the decoder, so these bound what any U-Net can score:
    a decoder that draws a small star as a blob fails the shape check whatever the latent says."""
    expectations, images = held_out_renders(count)
    recon = vae_round_trip(vae, images)
    result = {}
    for name, batch in (("renders", images), ("vae", recon)):
        scores = score([judge(image, expected) for image, expected in zip(batch, expectations)])
        result[f"{name}_shape"], result[f"{name}_binding"] = scores["shape"], scores["binding"]
    return result


def checker_accuracy(count: int = 600, blurs=(0.7, 1.0), vae=None) -> dict[str, float]:
    """Share of objects whose shape each SHAPE_MASKS mode gets right on held-out renders: sharp, blurred by a
    Gaussian of each sigma in `blurs` (px), and after a round trip through `vae` if given. Ground truth is the
    scene's own object list (each object found by its colour), so this measures the checker, not a model."""
    expectations, images = held_out_renders(count)
    variants = {"sharp": images}
    variants.update(
        {f"blur {sigma:g} px": np.stack([cv2.GaussianBlur(im, (0, 0), sigma) for im in images]) for sigma in blurs}
    )
    if vae is not None:
        variants["VAE round trip"] = vae_round_trip(vae, images)
    result = {}
    for mode in SHAPE_MASKS:
        for name, batch in variants.items():
            right = total = 0
            for image, expected in zip(batch, expectations):
                found = find_objects(image, expected.background, mode)
                for colour, kind in expected.objects:
                    match = next((f for f in found if f.colour == colour), None)
                    if match is not None:
                        total += 1
                        right += match.shape == kind
            result[f"{mode}, {name}"] = right / max(total, 1)
    return result


def ms_per_image(pipe, steps: int = 20, repeats: int = 5) -> float:
    """Median wall time of one 64x64 image, batch 1, CFG, DPM-Solver++ `steps`."""
    import torch

    timings = []
    for i in range(repeats + 1):
        started = time.perf_counter()
        pipe(
            "a red circle",
            num_inference_steps=steps,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(i),
            output_type="np",
        )
        timings.append(time.perf_counter() - started)
    return float(np.median(timings[1:]) * 1000)  # the first call warms up


# ----------------------------------------------------------------------------- control maps: metrics

DEPTH_VALID_MIN = (
    0.0  # abs-rel is averaged over pixels whose true depth is above this: the sky (0 = infinitely far) is left out
)
PCK_ALPHA = 0.1  # a keypoint is correct within PCK_ALPHA * max(width, height) of the person's box
EDGE_TOLERANCE_PX = 2  # an edge pixel matches if the other map has an edge within this Chebyshev distance


def depth_abs_rel(pred: np.ndarray, true: np.ndarray, valid_min: float = DEPTH_VALID_MIN) -> float:
    """Mean |pred - true| / true over pixels with true depth > valid_min (any shapes, same size)."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    valid = true > valid_min
    return float(np.mean(np.abs(pred[valid] - true[valid]) / true[valid])) if valid.any() else float("nan")


def pck(pred: np.ndarray, true: np.ndarray, sizes, alpha: float = PCK_ALPHA) -> float:
    """Share of visible true keypoints that the prediction marks visible within alpha * size pixels.

    pred, true: (N, 18, 3) x, y, visibility; sizes: (N,) per-person normaliser (max side of the person's box).
    """
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    sizes = np.asarray(sizes, np.float64)[:, None]
    distance = np.hypot(pred[..., 0] - true[..., 0], pred[..., 1] - true[..., 1])
    visible = true[..., 2] > 0
    correct = (pred[..., 2] > 0) & (distance <= alpha * sizes)
    return float(correct[visible].mean()) if visible.any() else float("nan")


def edge_f1(pred_edges: np.ndarray, true_edges: np.ndarray, tolerance: int = EDGE_TOLERANCE_PX) -> float:
    """F1 of two binary edge maps where a pixel matches an edge of the other map within `tolerance` px.

    Precision: predicted edge pixels with a true edge within the tolerance; recall: the reverse.
    Both empty -> 1.0; one empty -> 0.0.
    """
    pred, true = np.asarray(pred_edges) > 0, np.asarray(true_edges) > 0
    if pred.ndim == 3:
        pred, true = pred.any(-1), true.any(-1)
    if not pred.any() and not true.any():
        return 1.0
    if not pred.any() or not true.any():
        return 0.0
    kernel = np.ones((2 * tolerance + 1, 2 * tolerance + 1), np.uint8)
    near_true = cv2.dilate(true.astype(np.uint8), kernel) > 0
    near_pred = cv2.dilate(pred.astype(np.uint8), kernel) > 0
    precision = (pred & near_true).sum() / pred.sum()
    recall = (true & near_pred).sum() / true.sum()
    return float(2 * precision * recall / (precision + recall)) if precision + recall > 0 else 0.0


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two maps' pixel values (0 if either is constant)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def held_out_depth_set(count: int, start: int = HELD_OUT_SEED):
    """(images (N, 64, 64, 3) uint8, depth (N, 64, 64) float32) of held-out scenes."""
    samples = [shapes.sample(start + i) for i in range(count)]
    return np.stack([s.image for s in samples]), np.stack([s.depth for s in samples])


def held_out_pose_set(count: int, start: int = HELD_OUT_SEED):
    """(images, keypoints (N, 18, 3), person sizes (N,)) of the first `count` held-out scenes with a person."""
    from training.annotators import person_seeds, person_size

    samples = [shapes.sample(seed) for seed in person_seeds(start, count)]
    return (np.stack([s.image for s in samples]), np.stack([s.keypoints for s in samples]),
            np.array([person_size(s) for s in samples], np.float32))


# ------------------------------------------------------------------------- control maps: annotators and ControlNets

ANNOTATOR_ROOT = Path("assets/models/shapes-annotators")
MODELS_ROOT = Path("assets/models")


def annotator_accuracy(folder: Path = ANNOTATOR_ROOT, *, count: int = 500, vae=None) -> dict:
    """Held-out accuracy of the annotators in folder/depth and folder/pose (those that exist).

    depth: abs-rel over pixels with true depth > 0 (the sky, depth 0, is left out) and MAE over all pixels;
    pose: PCK@0.1 (and @0.05) with the threshold a share of max(width, height) of the person's rendered box.
    With a `vae`, also on the VAE's reconstructions of the same renders (closer to what a model generates).
    """
    from training import annotators

    result: dict = {}
    if (Path(folder) / "depth" / annotators.WEIGHTS_NAME).exists():
        model = annotators.load_model("depth", Path(folder) / "depth")
        images, depth = held_out_depth_set(count)
        pred = annotators.predict_depth(model, images)
        result["depth"] = {
            "abs_rel": depth_abs_rel(pred, depth),
            "mae": float(np.abs(pred - depth).mean()),
            "scenes": count,
        }
        if vae is not None:
            result["depth"]["abs_rel_vae_round_trip"] = depth_abs_rel(
                annotators.predict_depth(model, vae_round_trip(vae, images)), depth
            )
    if (Path(folder) / "pose" / annotators.WEIGHTS_NAME).exists():
        model = annotators.load_model("pose", Path(folder) / "pose")
        images, keypoints, sizes = held_out_pose_set(count)
        pred = annotators.predict_keypoints(model, images)
        result["pose"] = {
            "pck": pck(pred, keypoints, sizes),
            "pck_0.05": pck(pred, keypoints, sizes, alpha=0.05),
            "mean_error_px": float(np.hypot(*(pred[..., :2] - keypoints[..., :2]).transpose(2, 0, 1)).mean()),
            "person_scenes": count,
            "mean_person_size_px": float(sizes.mean()),
        }
        if vae is not None:
            result["pose"]["pck_vae_round_trip"] = pck(
                annotators.predict_keypoints(model, vae_round_trip(vae, images)), keypoints, sizes
            )
        # Scenes without a person must give an empty map (every keypoint invisible).
        empty = [s for s in (shapes.sample(HELD_OUT_SEED + i) for i in range(count)) if not s.keypoints[:, 2].any()][
            :200
        ]
        found = annotators.predict_keypoints(model, np.stack([s.image for s in empty]))
        result["pose"]["empty_map_rate_without_person"] = float((found[..., 2].sum(-1) == 0).mean())
    return result


def control_following(
    base,
    controlnet,
    control: str,
    *,
    annotator_folder: Path = ANNOTATOR_ROOT,
    count: int = 100,
    steps: int = 20,
    guidance: float = 4.0,
    batch: int = 25,
    seed: int = 0,
    baseline: bool = True,
) -> dict:
    """How closely images generated from held-out control maps follow them.

    canny: edge F1 between canny(output) and the control edges, an edge pixel matching within
    EDGE_TOLERANCE_PX (2 px, Chebyshev); depth: Pearson correlation between the depth annotator's map of
    the output and the control depth, per image, averaged; pose: PCK@0.1 of the pose annotator's keypoints
    of the output against the control keypoints (threshold 0.1 * max side of the person's box).
    `reference` scores the held-out renders themselves (the ceiling the measure allows); `baseline` scores
    the LDM alone on the same captions and seeds (the floor: what the text alone gives).
    """
    import torch

    from training import annotators
    from training.train_controlnet import control_pipeline, control_tensor, training_seeds

    samples = [shapes.sample(s) for s in training_seeds(control, count, start=HELD_OUT_SEED)]
    maps = np.stack([{"canny": s.canny, "depth": s.depth_image, "pose": s.pose_image}[control] for s in samples])
    captions = [s.caption for s in samples]
    if control == "canny":
        def measure(images):
            return [edge_f1(shapes.canny_map(im), s.canny) for im, s in zip(images, samples)]
    elif control == "depth":
        depth_model = annotators.load_model("depth", Path(annotator_folder) / "depth")

        def measure(images):
            return [pearson(d, s.depth) for d, s in zip(annotators.predict_depth(depth_model, images), samples)]
    else:
        pose_model = annotators.load_model("pose", Path(annotator_folder) / "pose")
        from training.annotators import person_size

        def measure(images):
            pred = annotators.predict_keypoints(pose_model, images)
            return [pck(p[None], s.keypoints[None], [person_size(s)]) for p, s in zip(pred, samples)]

    def generate(pipe, with_control: bool) -> np.ndarray:
        out = []
        for first in range(0, count, batch):
            kwargs = {"image": list(control_tensor(maps[first:first + batch]))} if with_control else {}
            result = pipe(
                captions[first : first + batch],
                num_inference_steps=steps,
                guidance_scale=guidance,
                height=shapes.IMAGE_SIZE,
                width=shapes.IMAGE_SIZE,
                output_type="np",
                generator=[
                    torch.Generator().manual_seed(seed + first + i)
                    for i in range(len(captions[first : first + batch]))
                ],
                **kwargs,
            )
            out.append(np.round(result.images * 255).astype(np.uint8))
        return np.concatenate(out)

    started = time.time()
    images = generate(control_pipeline(base, controlnet), True)
    seconds = time.time() - started
    key = {"canny": "edge_f1", "depth": "depth_pearson", "pose": "pose_pck"}[control]
    scores = {
        key: float(np.mean(measure(images))),
        f"{key}_reference": float(np.mean(measure(np.stack([s.image for s in samples])))),
        "maps": count,
        "steps": steps,
        "guidance": guidance,
        "seconds": round(seconds, 1),
    }
    if baseline:
        from diffusers import DPMSolverMultistepScheduler

        view = type(base).from_pipe(
            base,
            scheduler=DPMSolverMultistepScheduler.from_config(base.scheduler.config, algorithm_type="dpmsolver++"),
        )
        view.set_progress_bar_config(disable=True)
        scores[f"{key}_without_controlnet"] = float(np.mean(measure(generate(view, False))))
    return {"scores": scores, "images": images, "maps": maps, "references": np.stack([s.image for s in samples])}


def evaluate_controls(
    *,
    ldm: Path = MODELS_ROOT / "shapes-ldm",
    annotator_folder: Path = ANNOTATOR_ROOT,
    models_root: Path = MODELS_ROOT,
    annotator_count: int = 500,
    control_count: int = 100,
    steps: int = 20,
    guidance: float = 4.0,
    write_cards: bool = False,
    grid_dir: Path | None = None,
) -> dict:
    """Annotator accuracy, then control following of every ControlNet folder that exists (needs the LDM)."""
    from training import cards

    base = None
    if (Path(ldm) / "model_index.json").exists():
        from diffusers import StableDiffusionPipeline

        base = StableDiffusionPipeline.from_pretrained(ldm, safety_checker=None, requires_safety_checker=False)
        base.set_progress_bar_config(disable=True)
    report: dict = {
        "annotators": annotator_accuracy(annotator_folder, count=annotator_count, vae=base.vae if base else None),
        "controlnets": {},
    }
    if write_cards:
        for kind, scores in report["annotators"].items():
            cards.write_annotator_card(Path(annotator_folder) / kind, kind, scores)
    for control in ("canny", "depth", "pose"):
        folder = Path(models_root) / f"shapes-controlnet-{control}"
        if not (folder / "config.json").exists():
            continue
        if base is None:
            report["controlnets"][control] = {"skipped": f"no LDM at {ldm}"}
            continue
        if control != "canny" and not (Path(annotator_folder) / control / "config.json").exists():
            report["controlnets"][control] = {"skipped": f"no {control} annotator in {annotator_folder}"}
            continue
        from diffusers import ControlNetModel

        controlnet = ControlNetModel.from_pretrained(folder).eval()
        result = control_following(base, controlnet, control, annotator_folder=annotator_folder, count=control_count,
                                   steps=steps, guidance=guidance)
        report["controlnets"][control] = result["scores"]
        if grid_dir is not None:
            from training.common import save_grid
            save_grid(np.concatenate([result["maps"][:10], result["images"][:10], result["references"][:10]]),
                      Path(grid_dir) / f"controlnet-{control}.png", columns=10)
        if write_cards:
            cards.write_controlnet_card(folder, control, result["scores"])
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("assets/models/shapes-ldm"))
    parser.add_argument("--count", type=int, default=200, help="held-out prompts")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--guidance", type=float, default=None, help="CFG scale (default: the built-in model's, as the app uses it)"
    )
    parser.add_argument("--karras", action="store_true", help="DPM-Solver++ on Karras sigmas")
    parser.add_argument("--prompt-seed", type=int, default=HELD_OUT_SEED,
                        help="another held-out prompt set of the same mix, to tune sampler settings on")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 beside a training run)")
    parser.add_argument(
        "--prompts-only", action="store_true", help="prompt following only: skip VAE and speed measures"
    )
    parser.add_argument(
        "--checker",
        action="store_true",
        help="measure the checker itself (shape masks on sharp, blurred and VAE round-trip renders) and stop",
    )
    parser.add_argument("--grid", type=Path, default=None, help="write a grid of the first 40 results here")
    parser.add_argument("--json", type=Path, default=None, help="write the scores as JSON here")
    parser.add_argument("--card", type=Path, default=None, help="write the scores into this model card (README.md)")
    parser.add_argument(
        "--curve",
        nargs="+",
        default=None,
        metavar="[LABEL=]LOG_CSV",
        help="train_ldm log.csv files (optionally labelled, e.g. eps=runs/ldm/log.csv): "
        "their in-training scores go into the card",
    )
    controls = parser.add_argument_group(
        "control maps (--controls): annotator accuracy and ControlNet control following"
    )
    controls.add_argument(
        "--controls", action="store_true", help="evaluate the annotators and ControlNets instead of prompt following"
    )
    controls.add_argument("--annotators", type=Path, default=ANNOTATOR_ROOT, help="folder holding depth/ and pose/")
    controls.add_argument(
        "--models-root", type=Path, default=MODELS_ROOT, help="folder holding shapes-controlnet-{canny,depth,pose}"
    )
    controls.add_argument("--annotator-count", type=int, default=500, help="held-out scenes per annotator")
    controls.add_argument("--control-count", type=int, default=100, help="held-out control maps per ControlNet")
    controls.add_argument(
        "--control-guidance", type=float, default=None, help="CFG scale of the ControlNet runs (default: the app's)"
    )
    controls.add_argument("--write-cards", action="store_true", help="write the scores into each folder's README.md")
    args = parser.parse_args(argv)
    from training.common import set_threads

    set_threads(args.threads)
    from pipelines.registry import PRESETS

    if args.guidance is None:
        args.guidance = PRESETS["shapes"].default_guidance
    if args.control_guidance is None:
        args.control_guidance = PRESETS["shapes"].default_guidance
    if args.checker:
        from diffusers import AutoencoderKL

        accuracy = checker_accuracy(vae=AutoencoderKL.from_pretrained(args.model / "vae").eval())
        for name, value in accuracy.items():
            print(f"{name:<40} {value:.1%} of objects' shapes right")
        return
    if args.controls:
        report = evaluate_controls(
            ldm=args.model,
            annotator_folder=args.annotators,
            models_root=args.models_root,
            annotator_count=args.annotator_count,
            control_count=args.control_count,
            steps=args.steps,
            guidance=args.control_guidance,
            write_cards=args.write_cards,
            grid_dir=args.grid,
        )
        print(json.dumps(report, indent=2))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        return
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    result = prompt_following(pipe, count=args.count, steps=args.steps, guidance=args.guidance,
                              prompt_seed=args.prompt_seed, karras=args.karras)
    scores = dict(result["scores"])
    if not args.prompts_only:
        scores["vae_psnr_db"] = vae_psnr(pipe.vae)
        scores.update({f"ceiling_{k}": v for k, v in vae_ceiling(pipe.vae).items()})
        scores["ms_per_image_20_steps"] = ms_per_image(pipe, steps=20)
    scores["prompts"] = args.count
    print(json.dumps(scores, indent=2))
    if args.grid:
        from training.common import save_grid
        save_grid(result["images"][:40], args.grid)
    if args.json:
        args.json.write_text(json.dumps(scores, indent=2) + "\n")
    if args.card:
        write_card_section(args.card, "scores", scores_markdown(scores, args))
        if args.curve:
            write_card_section(args.card, "curve", curve_markdown(args.curve))
        print(f"updated {args.card}")


GOALS = {"colour": 0.90, "shape": 0.85, "position": 0.85, "binding": 0.60, "vae_psnr_db": 30.0}


def scores_markdown(scores: dict, args) -> str:
    rows = ["| measure | score | goal |", "|---|---|---|"]
    names = {
        "colour": "colour (single object)",
        "shape": "shape (single object)",
        "position": "position (3x3 cell)",
        "count": "object count",
        "binding": "two-object binding (+ relation)",
        "colour_binding": "two-object colour binding (+ relation), shapes not judged",
        "held_out_pair": "colour-shape pairs never seen in training",
        "vae_psnr_db": "VAE PSNR, held-out scenes (dB)",
        "ms_per_image_20_steps": "ms per image, 20 steps, CFG, batch 1 (this CPU)",
        "ceiling_vae_shape": "ceiling: shape on held-out renders after a VAE round trip",
        "ceiling_vae_binding": "ceiling: binding on held-out renders after a VAE round trip",
        "shape_detection_mask": "shape, previous checker (detection-threshold masks)",
        "binding_detection_mask": "binding, previous checker (detection-threshold masks)",
        "held_out_pair_detection_mask": "unseen pairs, previous checker (detection-threshold masks)",
    }
    for key, name in names.items():
        value = scores.get(key)
        if value is None:
            continue
        shown = f"{value:.1f}" if key in ("vae_psnr_db", "ms_per_image_20_steps") else f"{value:.1%}"
        goal = GOALS.get(key)
        goal_text = "" if goal is None else (f">= {goal:.0f} dB" if key == "vae_psnr_db" else f">= {goal:.0%}")
        rows.append(f"| {name} | {shown} | {goal_text} |")
    rows.append("")
    rows.append(f"{args.count} held-out prompts, DPM-Solver++ {args.steps} steps, guidance {args.guidance}, "
                f"one seed per prompt; `python -m training.evaluate --model {args.model}`.")
    return "\n".join(rows)


def curve_markdown(logs: list[str]) -> str:
    import csv

    rows = ["| run | step | loss | colour | shape | position | binding |", "|---|---|---|---|---|---|---|"]
    shown = set()  # a branched run's folder is a copy of its trunk's, log included: its trunk rows are shown once
    for entry in logs:
        label, _, path = entry.rpartition("=")
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("colour") not in (None, "", "nan"):
                    cells = f"{row['step']} | {float(row['loss']):.4f} | " + " | ".join(
                        f"{float(row[k]):.0%}" for k in ("colour", "shape", "position", "binding"))
                    if cells not in shown:
                        shown.add(cells)
                        rows.append(f"| {label or Path(path).parent.name} | {cells} |")
    rows.append("")
    rows.append(
        "In-training scores: 48 held-out prompts per point (EMA weights, 20 steps; about 19 single-object and 19\n"
        "two-object prompts), so a point moves by 5-10% from noise alone."
    )
    return "\n".join(rows)


def write_card_section(card: Path, name: str, body: str) -> None:
    """Replaces the text between `<!-- name:start -->` and `<!-- name:end -->` in the card."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = card.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{card} has no {start} ... {end} section")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    card.write_text(f"{head}{start}\n{body}\n{end}{tail}")


if __name__ == "__main__":
    main()
