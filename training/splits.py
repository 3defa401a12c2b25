"""Evaluation splits held out for real: validation (for every choice) and test (for the reported figure).

    python -m training.splits [--world 2] [--count 200]     # check the splits and print their make-up

- Scenes: training uses seeds below HELD_OUT_SEED (train_ldm: 0 .. train_scenes - 1); the validation split's
  scenes start at VALIDATION_SEED and the test split's at TEST_SEED, each SCENES_PER_SPLIT wide, so no scene is
  in two of them.
- Prompts: a prompt belongs to one split by a hash of its text (`split_of`), so the two splits never share a
  prompt, whatever their sizes. The grammar is small and many prompts also occur verbatim among the
  training captions: every report gives the prompts seen in training and those never seen separately
  (`seen_in_training`, from the captions of the trainer's own seeds).
- `check` recomputes all of it and refuses (SystemExit naming the overlap) when two splits share a scene or a
  prompt, or a split's scene seed falls in the training range; every evaluation of this module calls it.
"""
from __future__ import annotations

import argparse
import functools
import hashlib

import numpy as np

from training import shapes
from training.common import HELD_OUT_SEED
from training.evaluate import EVAL_BACKGROUNDS, Expectation, two_object_expectation

SPLITS = ("validation", "test")
VALIDATION_SEED = 3_000_000_000  # first scene (and prompt-stream) seed of the validation split
TEST_SEED = 4_000_000_000
SCENES_PER_SPLIT = 100_000_000
FIRST_SEED = {"validation": VALIDATION_SEED, "test": TEST_SEED}
TRAIN_SCENES = 24_000  # train_ldm's LDMConfig.train_scenes: its captions are the "seen in training" set


def split_of(prompt: str) -> str:
    """The split a prompt text belongs to (a hash of the text: stable, about half each)."""
    return SPLITS[hashlib.sha256(prompt.encode()).digest()[0] % 2]


def scene_seeds(split: str, count: int, offset: int = 0) -> range:
    """`count` scene seeds of a split (offset: a sub-stream, e.g. one per measure)."""
    if split not in FIRST_SEED:
        raise ValueError(f"split={split!r}; choose one of {SPLITS}")
    if offset + count > SCENES_PER_SPLIT:
        raise ValueError(f"offset + count = {offset + count} > {SCENES_PER_SPLIT} scenes per split")
    return range(FIRST_SEED[split] + offset, FIRST_SEED[split] + offset + count)


def _candidate(rng: np.random.Generator, kind: int) -> Expectation:
    """One prompt of a kind: 0/1 a single object (position), 2 a never-trained colour-shape pair, 3/4 two objects.
    Sizes and positions are said sometimes, so the prompt space is large enough to hold two disjoint splits."""
    background = str(rng.choice(EVAL_BACKGROUNDS))
    suffix = (" " + shapes.BACKGROUNDS[background][0]) if shapes.BACKGROUNDS[background][0] else ""
    positions = list(shapes.POSITIONS)
    if kind in (0, 1, 2):
        if kind == 2:
            held = sorted(shapes.HELD_OUT_PAIRS)
            colour, shape = held[int(rng.integers(len(held)))]
        else:
            colour, shape = shapes._random_pair(rng)
        words = [colour, shape]
        if rng.random() < 0.4:
            words.insert(0, str(rng.choice(list(shapes.SIZES))))
        words.insert(0, shapes.article(words[0]))
        position = str(rng.choice(positions)) if kind != 2 or rng.random() < 0.5 else None
        if position is not None:
            words.append(shapes.POSITIONS[position][0])
        return Expectation(" ".join(words) + suffix, background, [(colour, shape)], position=position,
                           held_out_pair=kind == 2)
    return two_object_expectation(rng, background, suffix)


@functools.cache
def _prompts(split: str, count: int) -> tuple[Expectation, ...]:
    rng = np.random.default_rng(FIRST_SEED[split])
    chosen: list[Expectation] = []
    taken: set[str] = set()
    while len(chosen) < count:
        kind = len(chosen) % 5  # the mix of the earlier held-out set: 40% single, 20% unseen pairs, 40% two objects
        for _ in range(10_000):
            candidate = _candidate(rng, kind)
            if split_of(candidate.prompt) == split and candidate.prompt not in taken:
                break
        else:
            raise RuntimeError(f"no new {split} prompt of kind {kind} after 10,000 draws")
        chosen.append(candidate)
        taken.add(candidate.prompt)
    return tuple(chosen)


def prompts(split: str, count: int) -> list[Expectation]:
    """`count` distinct prompts of a split, in a fixed order (a longer list starts with a shorter one)."""
    if split not in FIRST_SEED:
        raise ValueError(f"split={split!r}; choose one of {SPLITS}")
    return list(_prompts(split, count))


@functools.cache
def training_captions(world: int = shapes.DEFAULT_WORLD, count: int = TRAIN_SCENES) -> frozenset[str]:
    """Captions of the LDM trainer's scenes (seeds 0 .. count - 1, as train_ldm.encode_scenes draws them)."""
    make = shapes.random_scene if world == 1 else shapes.random_scene_v2
    return frozenset(make(np.random.default_rng(seed)).caption for seed in range(count))


def seen_in_training(prompt: str, world: int = shapes.DEFAULT_WORLD, count: int = TRAIN_SCENES) -> bool:
    return prompt in training_captions(world, count)


def check(count: int = 200, *, world: int = shapes.DEFAULT_WORLD, train_scenes: int = TRAIN_SCENES) -> dict:
    """Recomputes the splits and refuses any overlap; returns their make-up (prompts seen in training per split)."""
    problems = []
    ranges = {split: range(FIRST_SEED[split], FIRST_SEED[split] + SCENES_PER_SPLIT) for split in SPLITS}
    if train_scenes > HELD_OUT_SEED:
        problems.append(f"training scenes 0..{train_scenes - 1} reach the held-out seeds ({HELD_OUT_SEED})")
    for split, seeds in ranges.items():
        if seeds.start < HELD_OUT_SEED:
            problems.append(f"{split} scene seeds start at {seeds.start}, inside the training range")
    first, second = ranges["validation"], ranges["test"]
    if first.start < second.stop and second.start < first.stop:
        problems.append(f"validation scenes {first.start}.. and test scenes {second.start}.. overlap")
    texts = {split: [e.prompt for e in prompts(split, count)] for split in SPLITS}
    shared = set(texts["validation"]) & set(texts["test"])
    if shared:
        problems.append(f"{len(shared)} prompts in both splits, e.g. {sorted(shared)[0]!r}")
    for split in SPLITS:
        if len(set(texts[split])) != count:
            problems.append(f"{split} has repeated prompts")
    if problems:
        raise SystemExit("evaluation splits refused: " + "; ".join(problems))
    captions = training_captions(world, train_scenes)
    return {split: {"prompts": count, "seen_in_training": sum(t in captions for t in texts[split]),
                    "first_scene_seed": FIRST_SEED[split]} for split in SPLITS}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, choices=shapes.WORLDS, default=shapes.DEFAULT_WORLD)
    parser.add_argument("--count", type=int, default=200)
    args = parser.parse_args(argv)
    for split, info in check(args.count, world=args.world).items():
        print(f"{split}: {info['prompts']} prompts, {info['seen_in_training']} of them verbatim among the "
              f"{TRAIN_SCENES} training captions (world {args.world}); scenes from seed {info['first_scene_seed']}")


if __name__ == "__main__":
    main()
