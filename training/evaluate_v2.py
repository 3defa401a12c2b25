"""The measures of built-in model v2 (docs/MODEL_V2.md), on the validation or test split (training/splits.py):

    python -m training.evaluate_v2 --split test --measures prompts,styles,transfer,pose,silhouette,sizes \
        [--world 1] [--model assets/models/shapes-ldm] [--count 40] [--json out.json]

- prompts: prompt following at 64x64 (evaluate.judge), reported for all prompts, prompts seen verbatim among
  the training captions and prompts never seen;
- styles: text-to-image "... in <style> style": share of outputs whose object the style classifier
  (training/style_classifier.py) calls that style, per style;
- transfer: the Style transfer tab (pipelines.style.stylize through the app's Engine) on held-out flat
  content, img2img and structure mode: the chosen style recognised, and the content's colour, shape and
  position cell kept;
- pose: PCK@0.1 of the pose annotator's keypoints of outputs against the control skeleton, captions that do
  not name the pose, with the pose ControlNet and without it;
- silhouette: IoU between the generated object's silhouette and the control scene's, depth and canny
  ControlNets, captions that leave the form to the map (world 2's generic word; world 1 has no such word,
  so its "shape" is an unknown token), with and without the ControlNet;
- sizes: at 128x128, 128x64 and 64x128 beside 64x64: pictures with exactly one horizon, and prompt following.

Every measure is validated on ground truth first (`ground_truth`: renders score what the measure allows).
`--world` is the world whose textures and scenes the model was trained on (1: the shipped model).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

from training import shapes, splits
from training.evaluate import (
    EVAL_BACKGROUNDS,
    MIN_OBJECT_PIXELS,
    classify_shape,
    colour_names,
    find_objects,
    foreground,
    judge,
    pck,
    position_of,
    score,
)

SIZES = ((64, 64), (128, 128), (128, 64), (64, 128))  # (width, height)
TRANSFER_STRENGTH = {"img2img": 0.6, "structure": 0.8}  # the tab's default, and structure mode as tried by hand
TRANSFER_STYLES = ("outline", "striped", "dotted", "glow")  # the content is flat: the other four are changes
MEASURES = ("prompts", "styles", "transfer", "pose", "silhouette", "sizes")
# Scene sub-streams of a split, one per measure, so measures never share scenes.
OFFSETS = {"transfer": 0, "pose": 10_000_000, "silhouette": 20_000_000}


# ----------------------------------------------------------------------------- scenes of a split

def split_samples(split: str, count: int, world: int, keep, offset: int) -> list[shapes.Sample]:
    """The first `count` samples of a split's sub-stream whose scene passes `keep(scene)` (decided before drawing)."""
    make = shapes.random_scene if world == 1 else shapes.random_scene_v2
    found = []
    for seed in splits.scene_seeds(split, splits.SCENES_PER_SPLIT - offset, offset):
        scene = make(np.random.default_rng(seed))
        if keep(scene):
            found.append(shapes.render(scene))
            if len(found) == count:
                return found
    raise RuntimeError(f"{split}: fewer than {count} scenes of the kind asked for")


def one_object(scene, *, person: bool | None = None, flat: bool = False) -> bool:
    if scene.background not in EVAL_BACKGROUNDS or len(scene.objects) != 1:
        return False
    obj = scene.objects[0]
    if person is not None and (obj.kind == "person") != person:
        return False
    return obj.style == "flat" if flat else True


without_pose = shapes.caption_without_pose
form_free = shapes.form_free_caption


# ----------------------------------------------------------------------------- measures on pictures

def silhouette(image: np.ndarray, background: str) -> np.ndarray:
    """Filled outline of everything that differs from the empty background (bool, the image's size)."""
    _, mask = foreground(image, background)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    filled = np.zeros_like(mask)
    cv2.drawContours(filled, contours, -1, 1, thickness=-1)
    return filled.astype(bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def horizon_count(image: np.ndarray, background: str) -> int:
    """Sky/ground boundaries down the picture: each row's median colour is called sky or ground (nearest of the
    empty background's mean sky and ground colours); runs shorter than 3 rows are merged into their
    neighbours; 1 means one horizon with sky above it. A picture upside down or tiled scores otherwise."""
    height, width = image.shape[:2]
    empty, depth = shapes.background_image(background, (width, height))
    sky_rows = depth[:, 0] == 0
    sky, ground = empty[sky_rows].reshape(-1, 3).mean(0), empty[~sky_rows].reshape(-1, 3).mean(0)
    rows = np.median(image.astype(np.float32), axis=1)  # (H, 3)
    labels = (np.linalg.norm(rows - ground, axis=1) < np.linalg.norm(rows - sky, axis=1)).astype(int)
    labels = _merge_short_runs(labels, 3)
    changes = int((np.diff(labels) != 0).sum())
    return changes if labels[0] == 0 and labels[-1] == 1 else changes + 1


def _merge_short_runs(labels: np.ndarray, shortest: int) -> np.ndarray:
    labels = labels.copy()
    starts = np.flatnonzero(np.r_[True, np.diff(labels) != 0])
    ends = np.r_[starts[1:], len(labels)]
    for start, end in zip(starts, ends):
        if end - start < shortest and 0 < start and end < len(labels):
            labels[start:end] = labels[start - 1]
    return labels


# ----------------------------------------------------------------------------- generation

def load_base(model: Path):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompts: list[str], *, steps: int, guidance: float, size=(64, 64), seed: int = 0,
             batch: int = 20, **inputs) -> np.ndarray:
    """(N, H, W, 3) uint8 pictures, one seed per prompt (seed + index); `inputs` lists are split per batch."""
    import torch

    out = []
    for first in range(0, len(prompts), batch):
        chunk = prompts[first:first + batch]
        extra = {k: v[first:first + batch] for k, v in inputs.items()}
        result = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, width=size[0], height=size[1],
                      generator=[torch.Generator().manual_seed(seed + first + i) for i in range(len(chunk))],
                      output_type="np", **extra)
        out.append(np.round(result.images * 255).astype(np.uint8))
    return np.concatenate(out)


# ----------------------------------------------------------------------------- the measures

def prompt_following(pipe, split: str, count: int, *, world: int, steps: int, guidance: float,
                     size=(64, 64)) -> dict:
    """Checker scores on the split's prompts: all, seen verbatim in training, never seen."""
    expectations = splits.prompts(split, count)
    images = generate(pipe, [e.prompt for e in expectations], steps=steps, guidance=guidance, size=size)
    verdicts = [judge(image, e) for image, e in zip(images, expectations)]
    seen = [splits.seen_in_training(e.prompt, world) for e in expectations]
    result = {"all": score(verdicts), "seen": score([v for v, s in zip(verdicts, seen) if s]),
              "unseen": score([v for v, s in zip(verdicts, seen) if not s]),
              "prompts": count, "seen_prompts": int(sum(seen))}
    return {"scores": result, "images": images, "expectations": expectations}


def style_prompts(split: str, count_per_style: int) -> list[tuple[str, str, str]]:
    """(prompt, background, style): the split's one-object prompts with "in <style> style" before the background."""
    singles = [e for e in splits.prompts(split, count_per_style * 5 * 2) if len(e.objects) == 1][:count_per_style]
    result = []
    for style in shapes.STYLES:
        for e in singles:
            phrase = shapes.BACKGROUNDS[e.background][0]
            head = e.prompt[: -len(phrase) - 1] if phrase else e.prompt
            result.append((f"{head} in {style} style" + (f" {phrase}" if phrase else ""), e.background, style))
    return result


def text_to_image_styles(pipe, classifier, split: str, count_per_style: int, *, steps: int,
                         guidance: float) -> dict:
    from training.style_classifier import per_style_accuracy

    items = style_prompts(split, count_per_style)
    images = generate(pipe, [p for p, _, _ in items], steps=steps, guidance=guidance)
    predicted = classifier.classify(images, [b for _, b, _ in items])
    return {"scores": {**per_style_accuracy(predicted, [s for _, _, s in items]), "per_style": count_per_style},
            "images": images}


def style_transfer(engine, classifier, split: str, count: int, *, world: int, steps: int, guidance: float,
                   modes=("img2img", "structure"), control: str = "canny", upload_scale: int = 1) -> dict:
    """The Style transfer tab on `count` held-out flat one-shape pictures, every TRANSFER_STYLES style, each mode;
    `upload_scale`: each picture given that many times larger (an upload from elsewhere), the result judged at the
    picture's own size."""
    from PIL import Image

    from pipelines.style import stylize

    contents = split_samples(split, count, world, lambda s: one_object(s, person=False, flat=True),
                             OFFSETS["transfer"])
    result: dict = {}
    pictures = {}
    for mode in modes:
        for style in TRANSFER_STYLES:
            recognised, kept, outputs = [], [], []
            for i, content in enumerate(contents):
                prompt = content.caption.replace(" in flat style", "")
                height, width = content.image.shape[:2]
                upload = Image.fromarray(content.image).resize((width * upload_scale, height * upload_scale),
                                                               Image.LANCZOS)
                out = stylize(engine, image=upload, style=style, prompt=prompt, seed=i, steps=steps,
                              guidance=guidance, strength=TRANSFER_STRENGTH[mode], mode=mode, control=control)
                picture = np.asarray(out.images[0].convert("RGB").resize((width, height), Image.BOX))
                outputs.append(picture)
                background = content.scene.background
                recognised.append(classifier.classify(picture[None], [background])[0] == style)
                kept.append(content_kept(content, picture))
            result[f"{mode} {style}"] = {"style": float(np.mean(recognised)),
                                         "content_kept": float(np.mean(kept))}
            pictures[f"{mode} {style}"] = np.stack(outputs)
    for mode in modes:
        rows = [v for k, v in result.items() if k.startswith(mode + " ")]
        result[f"{mode} mean"] = {key: float(np.mean([r[key] for r in rows])) for key in ("style", "content_kept")}
    return {"scores": {**result, "contents": count, "strength": TRANSFER_STRENGTH, "control": control,
                       "upload_scale": upload_scale},
            "images": pictures, "contents": np.stack([c.image for c in contents])}


# A styled object is only partly its colour (stripes and dots are light, a glow fades into the background), and a
# glow's halo rounds its outline, so the content is judged on the pixels in its colour: at least this share of the
# object's, their outline closed over the texture's gaps (styled_contents scores the world's own styled renders)
KEPT_COLOUR_SHARE = 0.3
KEPT_CLOSING_PX = 5


def content_kept(content: shapes.Sample, picture: np.ndarray) -> bool:
    """The largest object of `picture` still shows the content object (its colour, shape and 3x3 position cell as
    the checker finds them on the content picture itself) in any style: at least KEPT_COLOUR_SHARE of its pixels are
    the content's colour, and those pixels, closed over the texture's gaps, have its shape and cell."""
    background = content.scene.background
    before = find_objects(content.image, background)
    if not before:
        return False
    wanted = before[0]
    height, width = picture.shape[:2]
    _, found = foreground(picture, background)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(found, connectivity=8)
    if count < 2:
        return False
    largest = labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    coloured = np.zeros_like(largest)
    coloured[largest] = colour_names(picture[largest]) == wanted.colour
    if coloured.sum() < max(KEPT_COLOUR_SHARE * largest.sum(), MIN_OBJECT_PIXELS):
        return False
    kernel = np.ones((KEPT_CLOSING_PX, KEPT_CLOSING_PX), np.uint8)
    outline = cv2.morphologyEx(coloured.astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(bool)
    ys, xs = np.nonzero(outline)
    return (classify_shape(outline) == wanted.shape
            and position_of((xs.mean(), ys.mean()), width, height) == position_of(wanted.centroid, width, height))


def styled_contents(world: int, count: int) -> dict[str, dict[str, float]]:
    """content_kept on the world's own renders of held-out flat contents redrawn in each style (the ceiling of the
    transfer measure), and on the same redrawn in the next content's colour (white contents aside) or shape (which
    must fail)."""
    contents = split_samples("validation", count, world, lambda s: one_object(s, person=False, flat=True),
                             OFFSETS["transfer"])

    def drawn(content, style, **change):
        objects = [replace(content.scene.objects[0], style=style, **change)]
        return shapes.render(replace(content.scene, objects=objects)).image

    result = {}
    for style in ("flat", *TRANSFER_STYLES):
        kept, other_colour, other_shape = [], [], []
        for i, content in enumerate(contents):
            obj, other = content.scene.objects[0], contents[(i + 1) % count].scene.objects[0]
            kept.append(content_kept(content, drawn(content, style)))
            # not a white content: another colour's light stripes are near white, and pass for it
            if other.colour != obj.colour and obj.colour != "white":
                other_colour.append(content_kept(content, drawn(content, style, colour=other.colour)))
            if other.kind != obj.kind:
                other_shape.append(content_kept(content, drawn(content, style, kind=other.kind)))
        result[style] = {"kept": float(np.mean(kept)), "other_colour": float(np.mean(other_colour)),
                         "other_shape": float(np.mean(other_shape))}
    return result


def pose_following(base, controlnet, split: str, count: int, *, world: int, steps: int, guidance: float,
                   annotator_folder: Path) -> dict:
    """PCK@0.1 against the control skeleton, captions without pose words, with the ControlNet and without it."""
    from training import annotators
    from training.train_controlnet import control_pipeline, control_tensor

    samples = split_samples(split, count, world, lambda s: one_object(s, person=True), OFFSETS["pose"])
    captions = [without_pose(s) for s in samples]
    model = annotators.load_model("pose", Path(annotator_folder) / "pose")
    truth = np.stack([s.keypoints for s in samples])
    sizes = [annotators.person_size(s) for s in samples]

    def measure(images):
        return pck(annotators.predict_keypoints(model, images), truth, sizes)

    maps = np.stack([s.pose_image for s in samples])
    with_control = generate(control_pipeline(base, controlnet), captions, steps=steps, guidance=guidance,
                            image=list(control_tensor(maps)))
    without = generate(base, captions, steps=steps, guidance=guidance)
    return {"scores": {"pck": measure(with_control), "pck_without_controlnet": measure(without),
                       "pck_renders": measure(np.stack([s.image for s in samples])), "maps": count},
            "images": with_control, "maps": maps, "captions": captions}


def silhouette_following(base, controlnet, control: str, split: str, count: int, *, world: int, steps: int,
                         guidance: float, captions: str = "form-free") -> dict:
    """Silhouette IoU (generated vs the control scene's), depth or canny maps, with and without the ControlNet."""
    from training.train_controlnet import CONTROL_MAP, control_pipeline, control_tensor

    samples = split_samples(split, count, world, one_object, OFFSETS["silhouette"])
    texts = [form_free(s) if captions == "form-free" else s.caption for s in samples]
    truth = [silhouette(s.image, s.scene.background) for s in samples]

    def measure(images):
        return float(np.mean([iou(silhouette(im, s.scene.background), t) for im, s, t in zip(images, samples, truth)]))

    maps = np.stack([getattr(s, CONTROL_MAP[control]) for s in samples])
    with_control = generate(control_pipeline(base, controlnet), texts, steps=steps, guidance=guidance,
                            image=list(control_tensor(maps)))
    without = generate(base, texts, steps=steps, guidance=guidance)
    return {"scores": {"iou": measure(with_control), "iou_without_controlnet": measure(without), "maps": count,
                       "captions": captions},
            "images": with_control, "maps": maps, "captions": texts}


def sizes(pipe, split: str, count: int, *, world: int, steps: int, guidance: float) -> dict:
    """One horizon and prompt following on the split's prompts at each of SIZES."""
    result, pictures = {}, {}
    for width, height in SIZES:
        run = prompt_following(pipe, split, count, world=world, steps=steps, guidance=guidance,
                               size=(width, height))
        horizons = [horizon_count(im, e.background) for im, e in zip(run["images"], run["expectations"])]
        result[f"{width}x{height}"] = {"one_horizon": float(np.mean([h == 1 for h in horizons])),
                                       **{k: v for k, v in run["scores"]["all"].items() if v == v}}
        pictures[f"{width}x{height}"] = run["images"]
    return {"scores": {**result, "prompts": count}, "images": pictures}


# ----------------------------------------------------------------------------- ground truth

def ground_truth(world: int = shapes.DEFAULT_WORLD, count: int = 60, vae=None) -> dict:
    """What each measure gives on the world's own renders (and their VAE round trips, with a `vae`): the ceiling,
    and a check that the measure can fail (tiled backgrounds have two horizons; swapped scenes overlap little)."""
    from training.evaluate import vae_round_trip

    result: dict = {}
    singles = split_samples("validation", count, world, one_object, OFFSETS["silhouette"])
    truth = [silhouette(s.image, s.scene.background) for s in singles]
    result["silhouette_iou_renders"] = float(np.mean([
        iou(silhouette(s.image, s.scene.background), t) for s, t in zip(singles, truth)]))
    result["silhouette_iou_other_scene"] = float(np.mean([
        iou(silhouette(singles[(i + 1) % count].image, s.scene.background), t)
        for i, (s, t) in enumerate(zip(singles, truth))]))
    if vae is not None:
        recon = vae_round_trip(vae, np.stack([s.image for s in singles]))
        result["silhouette_iou_vae_round_trip"] = float(np.mean([
            iou(silhouette(r, s.scene.background), t) for r, s, t in zip(recon, singles, truth)]))
    flat = [s for s in singles if s.scene.objects[0].kind != "person"]
    result["content_kept_renders"] = float(np.mean([content_kept(s, s.image) for s in flat]))
    result["content_kept_styled_renders"] = styled_contents(world, count)
    for width, height in SIZES:
        if world == 1 and (width, height) != (64, 64):
            continue
        renders = [shapes.sample(seed, world=world, size=None if world == 1 else (width, height))
                   for seed in splits.scene_seeds("validation", count)]
        ok = [horizon_count(s.image, s.scene.background) == 1 for s in renders]
        result[f"one_horizon_renders_{width}x{height}"] = float(np.mean(ok))
    for width, height in SIZES:
        if world == 1 and (width, height) != (64, 64):
            continue
        scores = checker_on_renders(world, (width, height), count)
        result.update({f"checker_{key}_renders_{width}x{height}": scores[key]
                       for key in ("colour", "shape", "binding")})
    tiled = []
    for s in (shapes.sample(seed, world=world) for seed in splits.scene_seeds("validation", count)):
        stacked = np.concatenate([s.image, s.image], axis=0)  # two 64x64 pictures: a 64x128 with two horizons
        tiled.append(horizon_count(stacked, s.scene.background) == 1)
    result["one_horizon_tiled_64x128"] = float(np.mean(tiled))
    return result


def checker_on_renders(world: int, size: tuple[int, int], count: int) -> dict[str, float]:
    """The prompt checker's scores on the world's own flat one- and two-shape scenes drawn at `size`, each judged
    against its own caption (the ceiling of prompt following at that size)."""
    from training.evaluate import Expectation

    verdicts = []
    make = shapes.random_scene if world == 1 else shapes.random_scene_v2
    for seed in splits.scene_seeds("validation", splits.SCENES_PER_SPLIT):
        rng = np.random.default_rng(seed)
        scene = make(rng) if world == 1 else make(rng, width=size[0], height=size[1])
        if (scene.background not in EVAL_BACKGROUNDS or shapes.GENERIC_WORD in scene.caption.split()
                or any(o.kind == "person" or o.style != "flat" for o in scene.objects)):
            continue
        relation = None
        if len(scene.objects) == 2:
            first, second = scene.objects
            if first.colour == second.colour or first.kind == second.kind:
                continue
            relation = next((r for r in shapes.RELATIONS if f" {r} " in scene.caption), "and")
            if relation in ("right of", "below"):  # judged as the mirrored relation with the objects swapped
                relation = {"right of": "left of", "below": "above"}[relation]
                scene.objects.reverse()
        expected = Expectation(scene.caption, scene.background, [(o.colour, o.kind) for o in scene.objects],
                               relation=relation)
        verdicts.append(judge(shapes.render(scene).image, expected))
        if len(verdicts) == count:
            break
    return score(verdicts)


# ----------------------------------------------------------------------------- report

GOALS = {  # issue "Built-in model v2", done when (test split, app defaults)
    "styles": ">= 85% each",
    "transfer style": ">= 80%",
    "transfer kept": ">= 90% (structure)",
    "pose": ">= 0.8, >= 0.3 above without",
    "silhouette": ">= 0.7, >= 0.3 above without",
    "one horizon": ">= 95%",
}


def markdown(report: dict) -> str:
    """The report as the tables of docs/MODEL_V2.md (python -m training.evaluate_v2 --markdown REPORT.json)."""
    pct = "{:.0%}".format
    rows = [f"Split `{report['split']}`, world {report['world']} model `{report['model']}`, {report['steps']} steps, "
            f"guidance {report['guidance']} (the app's defaults); one seed per prompt or map.", ""]
    if "prompts" in report:
        p = report["prompts"]
        rows += [f"**Prompt following at 64x64** ({p['prompts']} prompts, {p['seen_prompts']} seen verbatim in "
                 "training):", "", "| prompts | colour | shape | position | binding | unseen pairs |",
                 "|---|---|---|---|---|---|"]
        for name in ("all", "seen", "unseen"):
            cells = [p[name].get(k) for k in ("colour", "shape", "position", "binding", "held_out_pair")]
            rows.append(f"| {name} | " + " | ".join("-" if c is None or c != c else pct(c) for c in cells) + " |")
        rows.append("")
    if "styles" in report:
        st = report["styles"]
        rows += [f"**Text-to-image styles** ({st['per_style']} prompts per style; goal {GOALS['styles']}):", "",
                 "| " + " | ".join(shapes.STYLES) + " |", "|" + "---|" * len(shapes.STYLES),
                 "| " + " | ".join(pct(st[s]) for s in shapes.STYLES) + " |", ""]
    if "transfer" in report:
        tr = report["transfer"]
        rows += [f"**Style transfer** ({tr['contents']} flat contents per style; img2img at "
                 f"{tr['strength']['img2img']}, structure ({tr['control']}) at {tr['strength']['structure']}; goals: "
                 f"style {GOALS['transfer style']}, content {GOALS['transfer kept']}):", "",
                 "| mode | " + " | ".join(f"{s}: style / content kept" for s in TRANSFER_STYLES) + " |",
                 "|---|" + "---|" * len(TRANSFER_STYLES)]
        for mode in TRANSFER_STRENGTH:
            if f"{mode} mean" in tr:
                rows.append(f"| {mode} | " + " | ".join(
                    f"{pct(tr[f'{mode} {s}']['style'])} / {pct(tr[f'{mode} {s}']['content_kept'])}"
                    for s in TRANSFER_STYLES) + " |")
        rows.append("")
    controls = [(k, v) for k, v in report.items() if k == "pose" or k.startswith("silhouette ")]
    if controls:
        rows += [f"**Control maps** (goals: pose PCK@0.1 {GOALS['pose']}; silhouette IoU {GOALS['silhouette']}):", "",
                 "| ControlNet | captions | maps | with | without | renders |", "|---|---|---|---|---|---|"]
        for key, v in controls:
            if key == "pose":
                rows.append(f"| pose, PCK@0.1 | without pose words | {v['maps']} | {v['pck']:.3f} | "
                            f"{v['pck_without_controlnet']:.3f} | {v['pck_renders']:.3f} |")
            else:
                kind = key.split()[1]
                rows.append(f"| {kind}, silhouette IoU | {v['captions']} | {v['maps']} | {v['iou']:.3f} | "
                            f"{v['iou_without_controlnet']:.3f} | 1.000 |")
        rows.append("")
    if "sizes" in report:
        sz = report["sizes"]
        rows += [f"**Sizes** ({sz['prompts']} prompts each; goal: one horizon {GOALS['one horizon']}, prompt "
                 "following within 10 points of 64x64):", "",
                 "| size | one horizon | colour | shape | position | binding |", "|---|---|---|---|---|---|"]
        for width, height in SIZES:
            v = sz.get(f"{width}x{height}")
            if v:
                cells = [v.get(k) for k in ("one_horizon", "colour", "shape", "position", "binding")]
                rows.append(f"| {width}x{height} | " + " | ".join("-" if c is None else pct(c) for c in cells) + " |")
        rows.append("")
    return "\n".join(rows).rstrip()


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("assets/models/shapes-ldm"))
    parser.add_argument("--models-root", type=Path, default=Path("assets/models"),
                        help="folder holding shapes-controlnet-{canny,depth,pose} and shapes-annotators")
    parser.add_argument("--controlnet", action="append", default=[], metavar="KIND=FOLDER",
                        help="a ControlNet folder other than MODELS_ROOT/shapes-controlnet-KIND (e.g. a run's export)")
    parser.add_argument("--split", choices=splits.SPLITS, default="validation")
    parser.add_argument("--world", type=int, choices=shapes.WORLDS, default=shapes.DEFAULT_WORLD,
                        help="the world the model was trained on (its textures and scenes)")
    parser.add_argument("--measures", default=",".join(MEASURES), help=f"comma-separated, of {', '.join(MEASURES)}")
    parser.add_argument("--count", type=int, default=40, help="prompts / maps / contents per measure")
    parser.add_argument("--style-count", type=int, default=20, help="prompts per style (styles)")
    parser.add_argument("--transfer-count", type=int, default=10, help="content pictures per style and mode")
    parser.add_argument("--upload-scale", type=int, default=1,
                        help="transfer: give each content picture this many times larger, as an upload from elsewhere")
    parser.add_argument("--steps", type=int, default=None, help="default: the built-in model's (the app's)")
    parser.add_argument("--guidance", type=float, default=None, help="default: the built-in model's (the app's)")
    parser.add_argument("--ground-truth", action="store_true", help="only validate the measures on renders")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--grids", type=Path, default=None, help="write sample grids into this folder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--markdown", type=Path, default=None, metavar="REPORT_JSON",
                        help="print a saved report (--json) as tables, and stop")
    parser.add_argument("--write", type=Path, default=None, metavar="DOC",
                        help="with --markdown: put the tables into DOC's --section section")
    parser.add_argument("--section", default="baselines")
    args = parser.parse_args(argv)
    if args.markdown:
        text = markdown(json.loads(args.markdown.read_text()))
        print(text)
        if args.write:
            from training.evaluate import write_card_section

            write_card_section(args.write, args.section, text)
        return
    import torch

    torch.set_num_threads(args.threads)
    from pipelines.registry import PRESETS

    preset = PRESETS["shapes"]
    steps = args.steps or preset.default_steps
    guidance = args.guidance if args.guidance is not None else preset.default_guidance
    measures = [m.strip() for m in args.measures.split(",") if m.strip()]
    unknown = sorted(set(measures) - set(MEASURES))
    if unknown:
        raise SystemExit(f"--measures: unknown {', '.join(unknown)}; known: {', '.join(MEASURES)}")
    report: dict = {"split": args.split, "world": args.world, "model": str(args.model), "steps": steps,
                    "guidance": guidance, "splits": splits.check(max(args.count, 200), world=args.world)}
    from diffusers import AutoencoderKL

    if args.ground_truth:
        vae = AutoencoderKL.from_pretrained(args.model / "vae").eval()
        report["ground_truth"] = ground_truth(args.world, vae=vae)
        print(json.dumps(report, indent=2))
        return
    base = load_base(args.model)
    grids: dict[str, np.ndarray] = {}

    def timed(name, function, *a, **k):
        started = time.time()
        out = function(*a, **k)
        report[name] = {**out["scores"], "seconds": round(time.time() - started, 1)}
        print(name, json.dumps(report[name]), flush=True)
        return out

    if "prompts" in measures:
        out = timed("prompts", prompt_following, base, args.split, args.count, world=args.world, steps=steps,
                    guidance=guidance)
        grids["prompts"] = out["images"][:20]
    classifier = None
    if {"styles", "transfer"} & set(measures):
        from training.style_classifier import Setup, load_or_build

        classifier = load_or_build(Setup(world=args.world))
    if "styles" in measures:
        out = timed("styles", text_to_image_styles, base, classifier, args.split, args.style_count, steps=steps,
                    guidance=guidance)
        grids["styles"] = out["images"][:: max(1, args.style_count // 4)][:20]
    if "transfer" in measures:
        from pipelines.engine import Engine
        from pipelines.registry import resolve_preset

        engine = Engine(resolve_preset("shapes"), device="cpu", threads=args.threads)
        out = timed("transfer", style_transfer, engine, classifier, args.split, args.transfer_count,
                    world=args.world, steps=steps, guidance=guidance, upload_scale=args.upload_scale)
        grids["transfer"] = np.concatenate([out["contents"][:5]] + [v[:5] for v in out["images"].values()])
    if {"pose", "silhouette"} & set(measures):
        from diffusers import ControlNetModel

        folders = {kind: args.models_root / f"shapes-controlnet-{kind}" for kind in ("canny", "depth", "pose")}
        for item in args.controlnet:
            kind, _, folder = item.partition("=")
            if kind not in folders or not folder:
                raise SystemExit(f"--controlnet {item!r}: expected KIND=FOLDER with KIND one of {', '.join(folders)}")
            folders[kind] = Path(folder)

        def controlnet(kind):
            return ControlNetModel.from_pretrained(folders[kind]).eval()

        if "pose" in measures:
            out = timed("pose", pose_following, base, controlnet("pose"), args.split, args.count, world=args.world,
                        steps=steps, guidance=guidance, annotator_folder=args.models_root / "shapes-annotators")
            grids["pose"] = np.concatenate([out["maps"][:10], out["images"][:10]])
        if "silhouette" in measures:
            for kind in ("depth", "canny"):
                for captions in ("form-free", "named"):
                    out = timed(f"silhouette {kind} {captions}", silhouette_following, base, controlnet(kind), kind,
                                args.split, args.count, world=args.world, steps=steps, guidance=guidance,
                                captions=captions)
                    grids[f"silhouette-{kind}-{captions}"] = np.concatenate([out["maps"][:10], out["images"][:10]])
    if "sizes" in measures:
        out = timed("sizes", sizes, base, args.split, args.count, world=args.world, steps=steps, guidance=guidance)
        for name, images in out["images"].items():
            grids[f"size-{name}"] = images[:10]
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.grids:
        from training.common import save_grid

        for name, images in grids.items():
            save_grid(images, args.grids / f"{name}.png", columns=10)


if __name__ == "__main__":
    main()
