"""A style classifier for the Shapes world, built from the world's own renders: which rendering style
(flat, outline, striped, dotted, glow) an object in a picture is drawn in.

    python -m training.style_classifier [--world 2] [--count 300]   # build, then accuracy per style on
                                                                   # held-out renders and their VAE round trips

The object is found as the evaluation's checker finds it (what differs from the prompt's empty background;
the largest component), the picture is brought to the 64x64 scale (objects and textures scale with the
canvas in world 2), and a CROP x CROP window around the object's box centre goes to a small CNN with four
channels: RGB and the difference from the empty background (an outline's inside is background; a glow
lights the background around the object). The CNN trains on world renders of every style, colour, shape,
person, size, position and background, slightly blurred or noised, in about a minute on one core; weights
are deterministic (fixed seeds, one thread) and cached under runs/style-classifier/, keyed by the world's
texture parameters, so a changed texture rebuilds it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from training import shapes

STYLES = shapes.STYLES
CROP = 32  # window (px at the 64x64 scale): a big shape (26 px) with its glow, or most of a person
FOREGROUND_THRESHOLD = 35  # as evaluate.FOREGROUND_THRESHOLD: the checker's idea of "object"
MIN_OBJECT_PIXELS = 12
CACHE = Path("runs/style-classifier")
# Scene seeds: the classifier's training renders and the held-out renders it is tested on (both apart from
# the LDM's training scenes below HELD_OUT_SEED and from the evaluation splits of training/splits.py).
TRAIN_SEED = 5_000_000_000
TEST_SEED = 5_500_000_000
VERSION = 1  # bump when the network or its data change, so cached weights are rebuilt


@dataclass(frozen=True)
class Setup:
    """What a classifier is built for: a world and its texture parameters (world 2; None: the world's own)."""

    world: int = 1
    params: shapes.StyleParams | None = None

    def key(self) -> str:
        text = json.dumps({"world": self.world, "params": asdict(self.params) if self.params else None,
                           "version": VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- data

def style_scene(rng: np.random.Generator, style: str, setup: Setup) -> shapes.Scene:
    """One object in `style`: any colour, shape or person (people are never outlined), size, place, background."""
    background = str(rng.choice(list(shapes.BACKGROUNDS)))
    colour = str(rng.choice(list(shapes.COLOURS)))
    person = style != "outline" and rng.random() < 0.2
    if person:
        position = str(rng.choice(["center", "left", "right"]))
        centre = (shapes.POSITIONS[position][1][0] + rng.uniform(-2, 2), 34 + rng.uniform(-2, 2))
        joints = shapes.random_joints(rng) if setup.world == 2 else None
        pose = shapes.pose_name(joints) if joints is not None else str(rng.choice(shapes.POSES))
        obj = shapes.SceneObject("person", colour, "big", centre, style, pose, joints)
    else:
        size = str(rng.choice(list(shapes.SIZES)))
        position = str(rng.choice(list(shapes.POSITIONS)))
        x, y = shapes.POSITIONS[position][1]
        centre = (x + rng.uniform(-3, 3), y + rng.uniform(-3, 3))
        if size == "big":
            centre = tuple(float(np.clip(c, 16, 48)) for c in centre)
        obj = shapes.SceneObject(str(rng.choice(shapes.SHAPES)), colour, size, centre, style)
    return shapes.Scene(caption="", background=background, objects=[obj], world=setup.world,
                        style_params=setup.params)


def style_renders(count_per_style: int, setup: Setup, start: int) -> tuple[np.ndarray, list[str], list[str]]:
    """(images (N, 64, 64, 3), backgrounds, styles): `count_per_style` one-object renders of each style."""
    images, backgrounds, labels = [], [], []
    for index, style in enumerate(STYLES):
        rng = np.random.default_rng([start, index])
        for _ in range(count_per_style):
            scene = style_scene(rng, style, setup)
            images.append(shapes.render(scene).image)
            backgrounds.append(scene.background)
            labels.append(style)
    return np.stack(images), backgrounds, labels


def to_unit_scale(image: np.ndarray) -> np.ndarray:
    """A picture brought to the 64x64 scale: world 2's objects and textures scale with the short side."""
    height, width = image.shape[:2]
    scale = min(width, height) / shapes.IMAGE_SIZE
    if scale == 1:
        return image
    size = (max(1, round(width / scale)), max(1, round(height / scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def object_crop(image: np.ndarray, background: str) -> np.ndarray | None:
    """(CROP, CROP, 4) float32 input of the classifier around the largest object, or None when none is found."""
    image = to_unit_scale(image)
    height, width = image.shape[:2]
    empty, _ = shapes.background_image(background, (width, height))
    diff = np.abs(image.astype(np.float32) - empty).max(axis=2)
    mask = (diff > FOREGROUND_THRESHOLD).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        return None
    label = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if stats[label, cv2.CC_STAT_AREA] < MIN_OBJECT_PIXELS:
        return None
    x, y, w, h = stats[label, :4]
    cx, cy = int(round(x + w / 2)), int(round(y + h / 2))
    planes = np.concatenate([image.astype(np.float32), diff[:, :, None]], axis=2) / 255.0
    half = CROP // 2
    padded = cv2.copyMakeBorder(planes, half, half, half, half, cv2.BORDER_REPLICATE)
    return padded[cy:cy + CROP, cx:cx + CROP].copy()


def crops(images: np.ndarray, backgrounds: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(inputs (M, 4, CROP, CROP), indices of the images an object was found in)."""
    found, index = [], []
    for i, (image, background) in enumerate(zip(images, backgrounds)):
        crop = object_crop(image, background)
        if crop is not None:
            found.append(crop.transpose(2, 0, 1))
            index.append(i)
    if not found:
        return np.zeros((0, 4, CROP, CROP), np.float32), np.zeros(0, int)
    return np.stack(found).astype(np.float32), np.array(index)


def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Half of the renders softened (Gaussian, sigma up to 0.6 px: a decoder's softness, not enough to erase
    a texture), all with a little pixel noise, as generated pictures are."""
    out = []
    for image in images:
        image = image.astype(np.float32)
        if rng.random() < 0.5:
            image = cv2.GaussianBlur(image, (0, 0), float(rng.uniform(0.3, 0.6)))
        image = image + rng.normal(0, 3.0, image.shape)
        out.append(np.clip(np.round(image), 0, 255).astype(np.uint8))
    return np.stack(out)


# ----------------------------------------------------------------------------- the network

def build_network():
    import torch.nn as nn

    def block(inputs, outputs):
        return [nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU()]

    return nn.Sequential(
        *block(4, 24), *block(24, 24), nn.MaxPool2d(2),  # 16x16
        *block(24, 48), nn.MaxPool2d(2),  # 8x8
        *block(48, 64),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, len(STYLES)),
    )


class StyleClassifier:
    def __init__(self, network, setup: Setup):
        self.network, self.setup = network.eval(), setup

    def classify(self, images: np.ndarray, backgrounds: list[str]) -> list[str | None]:
        """The style of the largest object in each picture (None where no object is found)."""
        import torch

        inputs, index = crops(images, backgrounds)
        result: list[str | None] = [None] * len(images)
        if len(index):
            with torch.no_grad():
                predicted = self.network(torch.from_numpy(inputs)).argmax(1).numpy()
            for i, p in zip(index, predicted):
                result[int(i)] = STYLES[int(p)]
        return result


def build(setup: Setup = Setup(), *, count_per_style: int = 300, epochs: int = 15, seed: int = 0,
          verbose: bool = False) -> StyleClassifier:
    """Trains the classifier on `count_per_style` renders of each style (doubled by augmentation)."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    images, backgrounds, labels = style_renders(count_per_style, setup, TRAIN_SEED)
    sets = [crops(images, backgrounds), crops(augment(images, rng), backgrounds)]
    inputs = torch.from_numpy(np.concatenate([s[0] for s in sets]))
    targets = torch.tensor([STYLES.index(labels[i]) for s in sets for i in s[1]])
    network = build_network().train()
    optimiser = torch.optim.AdamW(network.parameters(), lr=3e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(inputs) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, 3e-3, total_steps=epochs * steps_per_epoch)
    for epoch in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        total = 0.0
        for first in range(0, len(inputs), 64):
            batch = order[first:first + 64]
            loss = torch.nn.functional.cross_entropy(network(inputs[batch]), targets[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item() * len(batch)
        if verbose:
            print(f"epoch {epoch + 1}/{epochs}: loss {total / len(inputs):.4f}", flush=True)
    return StyleClassifier(network, setup)


def load_or_build(setup: Setup = Setup(), cache: Path = CACHE, **options) -> StyleClassifier:
    """The cached classifier for `setup`, built (and cached) on first use."""
    import torch

    path = Path(cache) / f"world{setup.world}-{setup.key()}.pt"
    if path.exists():
        network = build_network()
        network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return StyleClassifier(network, setup)
    classifier = build(setup, **options)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    torch.save(classifier.network.state_dict(), partial)
    partial.replace(path)
    return classifier


# ----------------------------------------------------------------------------- accuracy on ground truth

def per_style_accuracy(predicted: list[str | None], labels: list[str]) -> dict[str, float]:
    """Share of pictures of each style classified as that style (an object not found counts as wrong)."""
    result = {}
    for style in STYLES:
        picks = [p for p, label in zip(predicted, labels) if label == style]
        result[style] = float(np.mean([p == style for p in picks])) if picks else float("nan")
    result["all"] = float(np.mean([p == label for p, label in zip(predicted, labels)]))
    return result


def ground_truth_accuracy(classifier: StyleClassifier, *, count_per_style: int = 100, vae=None,
                          start: int = TEST_SEED) -> dict[str, dict[str, float]]:
    """Per-style accuracy on held-out renders and, with a `vae`, on their VAE round trips."""
    images, backgrounds, labels = style_renders(count_per_style, classifier.setup, start)
    result = {"renders": per_style_accuracy(classifier.classify(images, backgrounds), labels)}
    if vae is not None:
        from training.evaluate import vae_round_trip

        recon = vae_round_trip(vae, images)
        result["vae_round_trip"] = per_style_accuracy(classifier.classify(recon, backgrounds), labels)
    return result


def accuracy_table(result: dict[str, dict[str, float]]) -> str:
    rows = ["| pictures | " + " | ".join(STYLES) + " | all |", "|---|" + "---|" * (len(STYLES) + 1)]
    for name, scores in result.items():
        rows.append(f"| {name} | " + " | ".join(f"{scores[s]:.1%}" for s in STYLES + ("all",)) + " |")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, choices=shapes.WORLDS, default=shapes.DEFAULT_WORLD)
    parser.add_argument("--vae", type=Path, default=Path("assets/models/shapes-ldm/vae"),
                        help="VAE for the round-trip accuracy (a diffusers AutoencoderKL folder)")
    parser.add_argument("--test-count", type=int, default=100, help="held-out renders per style")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch
    from diffusers import AutoencoderKL

    torch.set_num_threads(args.threads)
    classifier = load_or_build(Setup(world=args.world))
    vae = AutoencoderKL.from_pretrained(args.vae).eval() if args.vae.exists() else None
    print(accuracy_table(ground_truth_accuracy(classifier, count_per_style=args.test_count, vae=vae)))


if __name__ == "__main__":
    main()
