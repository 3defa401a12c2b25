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


# The painted mask of each Inpaint tab example (demo.inpaint.EXAMPLES: the scene and the prompt): a box at 64x64,
# over the empty ground (add), an object (replace) and the person (remove).
MASK_BOXES = {"mask_add": (38, 34, 60, 56), "mask_replace": (26, 35, 46, 54), "mask_remove": (32, 13, 64, 53)}
MASK_RGBA = (255, 0, 255, 255)  # demo/inpaint.MASK_COLOUR, opaque


def save_mask_layer(box: tuple[int, int, int, int], name: str, scene: Image.Image) -> None:
    """An RGBA layer, transparent but for the box painted in the brush colour, and the editor's composite (the
    scene with the layer on top), at 64 px and 4x."""
    layer = Image.new("RGBA", (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE), (0, 0, 0, 0))
    layer.paste(MASK_RGBA, box)
    composite = Image.alpha_composite(scene.convert("RGBA"), layer)
    for image, suffix in ((layer, ""), (composite, "_composite")):
        image.save(OUT / f"{name}{suffix}.png", optimize=True)
        big = image.resize((image.width * UPSCALE, image.height * UPSCALE), Image.NEAREST)
        big.save(OUT / f"{name}{suffix}_256.png", optimize=True)


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
    from demo.inpaint import EXAMPLES

    for name, scene, prompt in EXAMPLES:
        save_mask_layer(MASK_BOXES[name], name, Image.open(OUT / f"{scene}.png"))
        captions.append(f"{name}.png\tmask over {scene}.png {MASK_BOXES[name]}\t{prompt}")
    (OUT / "captions.txt").write_text("\n".join(captions) + "\n")
    print("\n".join(captions))


if __name__ == "__main__":
    main()
