"""Regenerate the example input PNGs in assets/examples/ from Shapes-world scenes.

    python scripts/make_examples.py

Each scene is written at its true 64x64 size, plus a 4x nearest-neighbour copy (`*_256.png`) that is
easier to paint a mask on. Control maps (canny edges, depth, OpenPose skeleton) come from the same
scenes so the ControlNet tab has ready-made maps for its "none" preprocessor. Deterministic: the same
seeds always give the same files.
"""
from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from training import shapes  # noqa: E402

OUT = ROOT / "assets" / "examples"
UPSCALE = 4  # the *_256.png copies

# name -> seed; chosen by looking at captions so the set covers shapes, two objects and a person.
SCENES = {"scene_a": 3, "scene_b": 11, "scene_c": 25, "scene_d": 42}


def find_person_seed(start: int = 0) -> int:
    seed = start
    while shapes.sample(seed).keypoints[:, 2].sum() == 0:
        seed += 1
    return seed


def save(array, name: str, *, upscaled: bool = True) -> None:
    image = Image.fromarray(array).convert("RGB")
    image.save(OUT / f"{name}.png", optimize=True)
    if upscaled:
        big = image.resize((image.width * UPSCALE, image.height * UPSCALE), Image.NEAREST)
        big.save(OUT / f"{name}_256.png", optimize=True)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    scenes = dict(SCENES, person=find_person_seed(100))
    captions = []
    for name, seed in scenes.items():
        sample = shapes.sample(seed)
        save(sample.image, name)
        captions.append(f"{name}.png\tseed {seed}\t{sample.caption}")
    person = shapes.sample(scenes["person"])
    save(person.pose_image, "control_pose", upscaled=False)
    first = shapes.sample(scenes["scene_a"])
    save(first.canny, "control_canny", upscaled=False)
    save(first.depth_image, "control_depth", upscaled=False)
    (OUT / "captions.txt").write_text("\n".join(captions) + "\n")
    print("\n".join(captions))


if __name__ == "__main__":
    main()
