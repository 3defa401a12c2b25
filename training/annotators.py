"""Training-side helpers of the learned Shapes-world annotators: which scenes hold a person, and how big.

The networks, their file format and their inference live in `pipelines.world.annotators` (the app loads
them too); they are imported here under their usual names for the trainer, the evaluation and the tests.
"""
from __future__ import annotations

import numpy as np

from pipelines.world.annotators import (  # noqa: F401  (re-exported: training.annotators.build_model, ...)
    ANNOTATORS,
    CONFIG_NAME,
    CONFIGS,
    INPUT_SIZE,
    KINDS,
    NETS,
    WEIGHTS_NAME,
    DepthAnnotator,
    DepthConfig,
    DepthNet,
    PoseAnnotator,
    PoseConfig,
    PoseNet,
    build_model,
    draw_pose,
    load_annotator,
    load_model,
    predict_depth,
    predict_keypoints,
    save_model,
    to_input,
    with_coordinates,
)
from training import shapes

# ----------------------------------------------------------------------------- data helpers

def has_person(seed: int) -> bool:
    """Whether scene `seed` holds a person, decided from the scene grammar alone (no rendering)."""
    scene = shapes.random_scene(np.random.default_rng(seed))
    return any(obj.kind == "person" for obj in scene.objects)


def person_seeds(start: int, count: int) -> list[int]:
    """The first `count` seeds from `start` up whose scenes hold a person (about 1 in 5)."""
    seeds, seed = [], start
    while len(seeds) < count:
        if has_person(seed):
            seeds.append(seed)
        seed += 1
    return seeds


def person_size(sample: shapes.Sample) -> float:
    """max(width, height) of the rendered person's box in pixels: the PCK normaliser (0 without a person)."""
    for obj in sample.objects:
        if obj["kind"] == "person":
            x0, y0, x1, y1 = obj["box"]
            return float(max(x1 - x0, y1 - y0))
    return 0.0
