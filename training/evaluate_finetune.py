"""Fine-tuning evaluation: teach the built-in model the Shapes world's "checkered" style, which no training
caption ever named, from a handful of images, and measure how often prompts show it.

    python -m training.evaluate_finetune                 # LoRA, the Fine-tune tab's defaults, 3 runs; prints the table
    python -m training.evaluate_finetune --method full   # a full U-Net fine-tune instead
    python -m training.evaluate_finetune --write-examples assets/examples/finetune-checkered

It goes through the app's own code (`pipelines.finetune.finetune` on an `Engine`), so what it measures is
what a user of the Fine-tune tab gets. A texture statistic judges every image: inside the object (segmented
against the prompt's empty background) the high-passed luminance must anti-correlate with itself one checker
square (6 px) to the side and below, and correlate one square diagonally: the signature of a checkerboard,
which stripes, dots, outlines, glow and flat fills do not have (tested on ground-truth renders).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipelines.settings import FINETUNE_METHODS, LR_SCHEDULES
from training import shapes

STYLE = "checkered"
SQUARE_PX = shapes.CHECKER_PX  # the world's checker square side
FOREGROUND_THRESHOLD = 40.0  # max channel difference from the empty background that counts as object
MIN_OBJECT_PIXELS = 60
MIN_CONTRAST = 0.06  # std of the high-passed luminance inside the object, luminance in [0, 1]
MIN_CORRELATION = 0.15  # |autocorrelation| the pattern must reach at each of the four shifts

# The example set: big single shapes on varied backgrounds (none of the held-out colour-shape pairs), every
# colour of the world at least once and at varied places, so that what the examples share is the style
# alone, not a few colours or a centred layout.
EXAMPLE_OBJECTS = (("red", "circle", "plain", "left"), ("blue", "square", "grass", "top right"),
                   ("yellow", "star", "night", "center"), ("green", "heart", "sand", "bottom left"),
                   ("white", "triangle", "sky", "right"), ("orange", "square", "snow", "top"),
                   ("purple", "square", "sand", "bottom right"), ("pink", "heart", "night", "top left"),
                   ("blue", "circle", "snow", "bottom"), ("green", "triangle", "plain", "center"))
# Evaluation prompts: other colour-shape-background combinations than the examples.
EVAL_OBJECTS = (("purple", "circle", "plain"), ("pink", "star", "grass"), ("orange", "heart", "sky"),
                ("blue", "triangle", "sand"), ("red", "square", "night"), ("yellow", "circle", "snow"),
                ("green", "square", "plain"), ("white", "heart", "grass"), ("red", "triangle", "sky"),
                ("blue", "star", "plain"))


@dataclass
class StyledPrompt:
    colour: str
    shape: str
    background: str
    position: str = ""  # a key of shapes.POSITIONS, or "" (no place named)

    def caption(self, style_words: str = "") -> str:
        text = f"a big {self.colour} {self.shape}"
        if self.position:
            text += f" {shapes.POSITIONS[self.position][0]}"
        if style_words:
            text += f" {style_words}"
        phrase = shapes.BACKGROUNDS[self.background][0]
        return f"{text} {phrase}" if phrase else text


def render_styled(colour: str, shape: str, background: str, style: str = STYLE, *, position: str = "center",
                  seed: int = 0) -> np.ndarray:
    """A big shape in `style` at `position` (jittered a little, kept inside the frame): (64, 64, 3) uint8."""
    rng = np.random.default_rng(seed)
    x, y = shapes.POSITIONS[position][1]
    # 16 px from the border at most, as the world draws big shapes
    centre = tuple(float(np.clip(c + rng.uniform(-4, 4), 16, 48)) for c in (x, y))
    scene = shapes.Scene(caption="", background=background,
                         objects=[shapes.SceneObject(shape, colour, "big", centre, style)])
    return shapes.render(scene).image


def example_set() -> tuple[list[np.ndarray], list[str]]:
    """The example images and their captions (with `{token}` where the word goes)."""
    images = [render_styled(c, s, b, position=p, seed=i) for i, (c, s, b, p) in enumerate(EXAMPLE_OBJECTS)]
    captions = [StyledPrompt(c, s, b, p).caption("in {token} style") for c, s, b, p in EXAMPLE_OBJECTS]
    return images, captions


def object_mask(image: np.ndarray, background: str) -> np.ndarray | None:
    """The largest region that differs from the empty background, eroded off its anti-aliased rim."""
    empty, _ = shapes.background_image(background)
    diff = np.abs(image.astype(np.float32) - empty).max(axis=2)
    mask = (diff > FOREGROUND_THRESHOLD).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))  # dark checker squares stay inside
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        return None
    label = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if stats[label, cv2.CC_STAT_AREA] < MIN_OBJECT_PIXELS:
        return None
    filled = (labels == label).astype(np.uint8)
    contours, _ = cv2.findContours(filled, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = cv2.drawContours(np.zeros_like(filled), contours, -1, 1, thickness=-1)  # holes are part of the object
    return cv2.erode(filled, np.ones((3, 3), np.uint8)).astype(bool)


def checker_statistic(image: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Contrast and autocorrelations of the object's high-passed luminance at one checker square's shifts."""
    luminance = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    detail = luminance - cv2.GaussianBlur(luminance, (0, 0), 3.0)  # removes shading and the object's own edge
    values = detail[mask]
    out = {"contrast": float(values.std()) if values.size else 0.0}
    s = SQUARE_PX
    for name, (dx, dy) in {"right": (s, 0), "down": (0, s), "diag": (s, s), "anti": (s, -s)}.items():
        out[name] = _shifted_correlation(detail, mask, dx, dy)
    return out


def _shifted_correlation(values: np.ndarray, mask: np.ndarray, dx: int, dy: int) -> float:
    h, w = values.shape
    ys, xs = np.nonzero(mask)
    ys2, xs2 = ys + dy, xs + dx
    keep = (ys2 >= 0) & (ys2 < h) & (xs2 >= 0) & (xs2 < w)
    ys, xs, ys2, xs2 = ys[keep], xs[keep], ys2[keep], xs2[keep]
    keep = mask[ys2, xs2]
    a, b = values[ys[keep], xs[keep]], values[ys2[keep], xs2[keep]]
    if a.size < 20 or a.std() < 1e-6 or b.std() < 1e-6:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def is_checkered(image: np.ndarray, background: str) -> bool:
    mask = object_mask(image, background)
    if mask is None or mask.sum() < MIN_OBJECT_PIXELS // 2:
        return False
    stat = checker_statistic(image, mask)
    return (stat["contrast"] >= MIN_CONTRAST and stat["right"] <= -MIN_CORRELATION and stat["down"] <= -MIN_CORRELATION
            and stat["diag"] >= MIN_CORRELATION and stat["anti"] >= MIN_CORRELATION)


def write_examples(folder: Path) -> list[Path]:
    """The Fine-tune tab's example set: PNGs + captions.txt (one per line, `{token}` where the word goes)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    images, captions = example_set()
    paths = []
    for i, (image, (colour, shape, _, _)) in enumerate(zip(images, EXAMPLE_OBJECTS)):
        paths.append(folder / f"{i + 1:02d}-{colour}-{shape}.png")
        Image.fromarray(image).save(paths[-1])
    (folder / "captions.txt").write_text("\n".join(captions) + "\n")
    return paths


def evaluate(engine, adapter_token: str, *, seeds: int = 4, steps: int = 20, guidance: float | None = None,
             images_out: dict | None = None) -> dict:
    """Share of images showing the style, with and without the word; `images_out[label]` collects the images.
    `guidance` None: the model's default CFG scale, what the app's tabs start with."""
    from pipelines import txt2img

    if guidance is None:
        guidance = engine.preset.default_guidance
    results = {}
    prompts = [StyledPrompt(*o) for o in EVAL_OBJECTS]
    for label, words in (("with the word", f"in {adapter_token} style"), ("without the word", "")):
        hits, total = 0, 0
        for p in prompts:
            images = []
            for first in range(0, seeds, engine.limits.max_batch):  # seeds 1000, 1001, ... in batches the app allows
                images += txt2img.generate(
                    engine,
                    prompt=p.caption(words),
                    seed=1000 + first,
                    steps=steps,
                    guidance=guidance,
                    batch_size=min(engine.limits.max_batch, seeds - first),
                ).images
            for image in images:
                hits += is_checkered(np.asarray(image.convert("RGB")), p.background)
                total += 1
                if images_out is not None:
                    images_out.setdefault(label, []).append(np.asarray(image.convert("RGB")))
        results[label] = hits / total
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes", help="preset or diffusers folder (default: the built-in model)")
    parser.add_argument("--method", choices=FINETUNE_METHODS, default="lora")
    parser.add_argument("--steps", type=int, default=None, help="fine-tune steps (default: the tab's default)")
    parser.add_argument("--learning-rate", type=float, default=0.0, help="0: the method's default")
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (default: the tab's)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per fine-tune step (default: the tab's)")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="", help="default: the tab's")
    parser.add_argument("--token", default="zqx")
    parser.add_argument("--seeds", type=int, default=4, help="images per evaluation prompt (10 prompts)")
    parser.add_argument(
        "--guidance", type=float, default=None, help="CFG scale of the evaluation images (default: the model's)"
    )
    parser.add_argument(
        "--runs", type=int, default=3, help="fine-tunes with seeds 0, 1, ...; the figures are their mean"
    )
    parser.add_argument("--prior-preservation", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--write-examples", type=Path, default=None, help="write the example set here and stop")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument(
        "--grid", type=Path, default=None, help="write the fine-tuned model's images here (with / without the word)"
    )
    args = parser.parse_args(argv)
    if args.write_examples:
        for path in write_examples(args.write_examples):
            print(path)
        return
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from PIL import Image

    from app import build_engine
    from pipelines.adapters import EVERY_PROMPT
    from pipelines.finetune import FineTuneSettings, finetune

    engine = build_engine(args.model)
    guidance = args.guidance or engine.preset.default_guidance
    arrays, captions = example_set()
    images = [Image.fromarray(a) for a in arrays]
    before = evaluate(engine, args.token, seeds=args.seeds, guidance=guidance)
    runs = []
    for run in range(args.runs):
        # Runs differ only in the fine-tune's seed (LoRA init, noise, timesteps). One run's images of a prompt
        # look alike whatever the sampling seed, so the spread between runs is the one that matters.
        settings = FineTuneSettings(token=args.token, method=args.method, prior_preservation=args.prior_preservation,
                                    learning_rate=args.learning_rate, lr_schedule=args.lr_schedule, seed=run,
                                    name=f"eval-{run}")
        if args.steps:
            settings.steps = args.steps
        if args.rank:
            settings.rank = args.rank
        if args.batch_size:
            settings.batch_size = args.batch_size
        started = time.perf_counter()
        result = finetune(engine, images, settings, captions=captions)
        seconds = time.perf_counter() - started
        drawn: dict = {}
        after = evaluate(engine, args.token, seeds=args.seeds, guidance=guidance, images_out=drawn)
        if args.grid and run == 0:
            from training.common import save_grid

            save_grid(np.stack(drawn["with the word"] + drawn["without the word"]), args.grid)
        # The same weights loaded for every prompt: what they alone would do to prompts without the word.
        with tempfile.TemporaryDirectory() as folder:
            saved = engine.adapters.save(result.adapter, Path(folder) / "adapter.safetensors")
            engine.adapters.remove(result.adapter)
            forced = engine.adapters.load_file(saved, name=f"{result.adapter}-everywhere", token=EVERY_PROMPT)
        leak = evaluate(engine, args.token, seeds=args.seeds, guidance=guidance)["without the word"]
        engine.adapters.remove(forced.name)
        runs.append({"seed": run, "seconds": seconds, "steps": result.steps_done, "with": after["with the word"],
                     "without": after["without the word"], "forced_on_without": leak})
        print(f"run {run}: {seconds:.0f} s, with the word {after['with the word']:.0%}, "
              f"without {after['without the word']:.0%}, forced on {leak:.0%}", flush=True)

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in runs]))

    def spread(key: str) -> str:
        values = [r[key] for r in runs]
        return f"{mean(key):.0%}" + (f" ({min(values):.0%}-{max(values):.0%})" if len(runs) > 1 else "")

    rows = [
        ("fine-tune time (s)", f"{mean('seconds'):.0f}", "about 180 on 2 CPU cores"),
        ("steps / images", f"{runs[-1]['steps']} / {len(images)}", ""),
        ("with the word, before fine-tuning", f"{before['with the word']:.0%}", ""),
        ("with the word", spread("with"), ">= 70%"),
        ("without the word", spread("without"), "<= 10%"),
        ("without the word, adapter forced on for every prompt", spread("forced_on_without"),
         "(drift of the fine-tuned weights)"),
    ]
    print(f"Fine-tune evaluation: {args.method}, model {engine.preset.name}, {args.runs} fine-tune run(s), "
          f"{len(EVAL_OBJECTS)} prompts x {args.seeds} seeds each, 20 steps, guidance {guidance}, "
          f"{torch.get_num_threads()} thread(s); "
          f"mean (min-max over runs)")
    width = max(len(r[0]) for r in rows)
    for name, value, goal in rows:
        print(f"{name:<{width}} | {value:>14} | {goal}")
    if args.json:
        args.json.write_text(json.dumps({"before": before["with the word"], "runs": runs, "method": args.method,
                                         "steps": runs[-1]["steps"], "images": len(images)}, indent=2))


if __name__ == "__main__":
    main()
