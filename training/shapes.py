"""The Shapes world: deterministic procedural scenes with captions, depth, pose and control maps.

Every scene is a 64x64 RGB picture of one or two coloured shapes, or one stick-figure person, in a
named background with a ground plane, drawn in a named rendering style. `sample(seed)` returns the
picture together with everything the models and their evaluation need: caption, object list, depth
map, OpenPose keypoints and the three control maps (canny edges, depth image, skeleton image).

    python -m training.shapes --preview out.png     # a captioned grid of samples
"""
from __future__ import annotations

import argparse
import functools
import math
from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from pipelines.world import IMAGE_SIZE, NUM_KEYPOINTS

SUPERSAMPLE = 4  # shapes are drawn at 4x and area-downsampled, so edges are anti-aliased
HORIZON_Y = 36  # rows above are sky, rows below are the ground plane
# The world's versions (`sample(seed, world=...)`); see "World v2" below. Every shipped model, the inpainting
# data and every evaluation are world 1, which stays byte-identical.
WORLDS = (1, 2)
DEFAULT_WORLD = 1

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 180),
    "pink": (245, 120, 180),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "star", "heart")
SIZES = {"small": 7.0, "big": 13.0}  # half-extent in pixels at 64x64

# Background name -> (caption phrase or "" for the default scene, sky RGB, ground RGB).
BACKGROUNDS: dict[str, tuple[str, tuple[int, int, int], tuple[int, int, int]]] = {
    "plain": ("", (176, 180, 190), (128, 128, 134)),
    "sky": ("under a blue sky", (110, 165, 235), (160, 170, 180)),
    "grass": ("on grass", (160, 205, 240), (85, 140, 55)),
    "sand": ("on sand", (160, 205, 240), (215, 190, 130)),
    "night": ("at night", (18, 22, 58), (45, 48, 66)),
    "snow": ("in snow", (195, 205, 220), (232, 236, 242)),
}

# Position name -> (caption phrase, centre (x, y) at 64x64).
POSITIONS: dict[str, tuple[str, tuple[int, int]]] = {
    "center": ("in the center", (32, 32)),
    "left": ("on the left", (15, 32)),
    "right": ("on the right", (49, 32)),
    "top": ("at the top", (32, 15)),
    "bottom": ("at the bottom", (32, 49)),
    "top left": ("in the top left", (15, 15)),
    "top right": ("in the top right", (49, 15)),
    "bottom left": ("in the bottom left", (15, 49)),
    "bottom right": ("in the bottom right", (49, 49)),
}

# Styles named in training captions. "checkered" is rendered by the world but never captioned in
# training, so fine-tuning can teach the model a style it has provably never been told about.
STYLES = ("flat", "outline", "striped", "dotted", "glow")
UNSEEN_STYLES = ("checkered",)
CHECKER_PX = 6  # side of a checkered style's square

POSES = ("standing", "waving", "jumping", "sitting", "running", "arms up")
POSE_PHRASES = {pose: ("with arms up" if pose == "arms up" else pose) for pose in POSES}

RELATIONS = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1)}

# Colour-shape pairs that never occur in training scenes; evaluation asks for them to measure
# whether the model composes attributes rather than memorising pairs.
HELD_OUT_PAIRS = frozenset({("purple", "heart"), ("orange", "star"), ("green", "triangle"), ("pink", "square")})

# OpenPose body-18 order (the order controlnet-aux draws): nose, neck, r-shoulder, r-elbow, r-wrist,
# l-shoulder, l-elbow, l-wrist, r-hip, r-knee, r-ankle, l-hip, l-knee, l-ankle, r-eye, l-eye, r-ear, l-ear
# (NUM_KEYPOINTS of them).
LIMBS = ((1, 2), (2, 3), (3, 4), (1, 5), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13), (1, 0))


def vocabulary() -> list[str]:
    """Every word a training caption can contain, sorted."""
    words = {"a", "an", "and", "in", "style", "person", "with"}
    words.update(COLOURS)
    words.update(SHAPES)
    words.update(SIZES)
    words.update(STYLES)
    for phrase, _, _ in BACKGROUNDS.values():
        words.update(phrase.split())
    for phrase, _ in POSITIONS.values():
        words.update(phrase.split())
    for relation in RELATIONS:
        words.update(relation.split())
    for phrase in POSE_PHRASES.values():
        words.update(phrase.split())
    return sorted(words)


@dataclass
class SceneObject:
    kind: str  # a shape name or "person"
    colour: str
    size: str  # "small" | "big"
    centre: tuple[float, float]  # (x, y) in 64x64 pixels
    style: str = "flat"
    pose: str | None = None  # people only
    joints: PoseJoints | None = None  # world 2 people: free joint angles (pose names one only when near)

    @property
    def half_extent(self) -> float:
        return SIZES[self.size] * (1.5 if self.kind == "person" else 1.0)


@dataclass
class Scene:
    caption: str
    background: str
    objects: list[SceneObject]
    world: int = 1  # WORLDS; world 2 draws its own textures, free poses and canvases (see "World v2" below)
    width: int = IMAGE_SIZE
    height: int = IMAGE_SIZE
    control_caption: str | None = None  # world 2: the caption with the form left to a control map ("a red shape")
    style_params: StyleParams | None = None  # world 2: textures (None: WORLD2_STYLE_PARAMS)


@dataclass
class Sample:
    image: np.ndarray  # (64, 64, 3) uint8 RGB
    caption: str
    objects: list[dict]  # {"kind", "colour", "size", "style", "box": (x0, y0, x1, y1)}
    depth: np.ndarray  # (64, 64) float32, 1 = near, 0 = far (the convention of ControlNet depth maps)
    keypoints: np.ndarray  # (18, 3) float32: x, y in pixels and visibility 0/1 (zeros without a person)
    scene: Scene = field(repr=False)

    # Control maps are derived on first use: training the LDM needs only image and caption.
    @functools.cached_property
    def canny(self) -> np.ndarray:
        """(64, 64, 3) uint8, white edges on black."""
        return canny_map(self.image)

    @functools.cached_property
    def depth_image(self) -> np.ndarray:
        """(64, 64, 3) uint8, the depth map as a grey image."""
        return depth_to_image(self.depth)

    @functools.cached_property
    def pose_image(self) -> np.ndarray:
        """(H, W, 3) uint8 (64x64 in world 1), OpenPose-colour skeleton on black."""
        height, width = self.image.shape[:2]
        return pose_to_image(self.keypoints, IMAGE_SIZE if width == height == IMAGE_SIZE else (width, height))

    @property
    def control_caption(self) -> str:
        """The caption for a ControlNet whose map decides the form (world 2); world 1 has only its caption."""
        return self.scene.control_caption or self.caption


# ----------------------------------------------------------------------------- scene sampling

def random_scene(rng: np.random.Generator, *, allow_unseen_styles: bool = False) -> Scene:
    """Draws a scene and its caption from the world's grammar."""
    background, style, roll = _scene_frame(rng, allow_unseen_styles)
    if roll < 0.2:
        objects, phrase = _person_scene(rng, style)
    elif roll < 0.6:
        objects, phrase = _single_object_scene(rng, style)
    else:
        objects, phrase = _two_object_scene(rng, style)
    return Scene(caption=phrase + _caption_suffix(rng, style, background), background=background, objects=objects)


def _scene_frame(rng: np.random.Generator, allow_unseen_styles: bool) -> tuple[str, str, float]:
    """A scene's background, style and the roll that picks its kind (person, one object, two), in both worlds."""
    background = str(rng.choice(list(BACKGROUNDS)))
    if rng.random() < 0.35:
        background = "plain"
    styles = STYLES + (UNSEEN_STYLES if allow_unseen_styles else ())
    style = "flat" if rng.random() < 0.6 else str(rng.choice(styles[1:]))
    return background, style, float(rng.random())


def _caption_suffix(rng: np.random.Generator, style: str, background: str) -> str:
    """What a caption says after its objects: the style (always unless flat) and the background's phrase."""
    suffix = ""
    if style != "flat" or rng.random() < 0.1:
        suffix += f" in {style} style"
    if BACKGROUNDS[background][0]:
        suffix += f" {BACKGROUNDS[background][0]}"
    return suffix


def _random_pair(rng: np.random.Generator, exclude: tuple[str, str] | None = None) -> tuple[str, str]:
    while True:
        colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
        if (colour, shape) not in HELD_OUT_PAIRS and (colour, shape) != exclude:
            return colour, shape


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _jitter(rng: np.random.Generator, centre: tuple[int, int], amount: float = 3.0) -> tuple[float, float]:
    return (centre[0] + rng.uniform(-amount, amount), centre[1] + rng.uniform(-amount, amount))


def _single_object_scene(rng, style):
    colour, shape = _random_pair(rng)
    size = str(rng.choice(list(SIZES)))
    position = str(rng.choice(list(POSITIONS)))
    if size == "big":  # a big shape in a corner would be cut off; keep it 13 px from the border
        centre = tuple(float(np.clip(c, 16, 48)) for c in _jitter(rng, POSITIONS[position][1]))
    else:
        centre = _jitter(rng, POSITIONS[position][1])
    words = []
    if rng.random() < 0.7:
        words.append(size)
    words += [colour, shape]
    words.insert(0, article(words[0]))
    if rng.random() < 0.8:
        words.append(POSITIONS[position][0])
    return [SceneObject(shape, colour, size, centre, style)], " ".join(words)


def _two_object_scene(rng, style):
    first = _random_pair(rng)
    second = _random_pair(rng, exclude=first)
    relation = str(rng.choice(["and"] + list(RELATIONS)))
    if relation == "and":
        cells = rng.choice(list(POSITIONS), size=2, replace=False)
        centres = [_jitter(rng, POSITIONS[str(c)][1]) for c in cells]
        # Two cells next to each other are 17 px apart: keep small shapes so they never overlap.
    else:
        dx, dy = RELATIONS[relation]
        mid = _jitter(rng, (32, 32), 6.0)
        offset = 15.0
        centres = [(mid[0] + dx * offset, mid[1] + dy * offset), (mid[0] - dx * offset, mid[1] - dy * offset)]
    objects = [SceneObject(s, c, "small", centre, style) for (c, s), centre in zip((first, second), centres)]
    joiner = "and" if relation == "and" else relation
    caption = f"{article(first[0])} {first[0]} {first[1]} {joiner} {article(second[0])} {second[0]} {second[1]}"
    return objects, caption


def _person_scene(rng, style):
    colour = str(rng.choice(list(COLOURS)))
    pose = str(rng.choice(POSES))
    position = str(rng.choice(["center", "left", "right"]))
    centre = _jitter(rng, (POSITIONS[position][1][0], 34), 2.0)
    caption = f"{article(colour)} {colour} person {POSE_PHRASES[pose]}"
    if position != "center" or rng.random() < 0.3:
        caption += f" {POSITIONS[position][0]}"
    return [SceneObject("person", colour, "big", centre, "flat" if style == "outline" else style, pose)], caption


# ----------------------------------------------------------------------------- rendering

def _shape_polygon(kind: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Outline of a shape as an (N, 2) float array in pixel coordinates."""
    if kind == "circle":
        angles = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        return np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1)
    if kind == "square":
        s = r * 0.88
        return np.array([[cx - s, cy - s], [cx + s, cy - s], [cx + s, cy + s], [cx - s, cy + s]])
    if kind == "triangle":
        return np.array([[cx, cy - r], [cx + r, cy + r * 0.8], [cx - r, cy + r * 0.8]])
    if kind == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)
    if kind == "heart":
        t = np.linspace(0, 2 * np.pi, 80, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return np.stack([cx + x * r / 16.5, cy + (y + 2.5) * r / 16.5], 1)
    raise ValueError(f"unknown shape {kind!r}; known: {SHAPES}")


def _canvas(size: int | tuple[int, int]) -> tuple[int, int]:
    """(width, height) of a canvas given as one side (square) or as (width, height)."""
    return (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))


def shape_mask(
    kind: str, centre: tuple[float, float], half_extent: float, size: int | tuple[int, int] = IMAGE_SIZE
) -> np.ndarray:
    """Anti-aliased coverage (0..1, float32) of one shape on a size x size (or (width, height)) canvas."""
    width, height = _canvas(size)
    big = np.zeros((height * SUPERSAMPLE, width * SUPERSAMPLE), np.uint8)
    polygon = _shape_polygon(kind, centre[0] * SUPERSAMPLE, centre[1] * SUPERSAMPLE, half_extent * SUPERSAMPLE)
    cv2.fillPoly(big, [np.round(polygon).astype(np.int32)], 255, lineType=cv2.LINE_AA)
    return cv2.resize(big, (width, height), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def person_keypoints(pose: str, centre: tuple[float, float], height: float) -> np.ndarray:
    """OpenPose body-18 keypoints (18, 3) of a stick figure standing at `centre` (x, y in pixels)."""
    cx, cy = centre
    u = height / 40.0  # one unit ~ 1 px of a 40 px tall figure
    neck = np.array([cx, cy - 10 * u])
    hip_y = cy + 5 * u
    # Limb end points relative to their joints, per pose: (elbow, wrist) per arm, (knee, ankle) per leg.
    arm_down = ((4, 7), (5, 14))
    arms = {
        "standing": (arm_down, arm_down),
        "waving": (arm_down, ((6, -5), (8, -13))),
        "jumping": (((6, -4), (9, -11)), ((6, -4), (9, -11))),
        "sitting": (((4, 6), (9, 10)), ((4, 6), (9, 10))),
        "running": (((-5, 5), (-2, 11)), ((5, 3), (10, -3))),
        "arms up": (((2, -8), (3, -16)), ((2, -8), (3, -16))),
    }[pose]
    leg_straight = ((2, 9), (3, 18))
    legs = {
        "standing": (leg_straight, leg_straight),
        "waving": (leg_straight, leg_straight),
        "jumping": (((5, 6), (3, 13)), ((5, 6), (3, 13))),
        "sitting": (((9, 0), (9, 9)), ((9, 0), (9, 9))),
        "running": (((-6, 7), (-11, 13)), ((7, 6), (8, 15))),
        "arms up": (leg_straight, leg_straight),
    }[pose]
    if pose == "jumping":
        neck = neck + np.array([0, -4 * u])
        hip_y -= 4 * u
    keypoints = np.zeros((NUM_KEYPOINTS, 3), np.float32)
    keypoints[:, 2] = 1

    def put(index, point):
        keypoints[index, :2] = point

    put(1, neck)
    put(0, neck + np.array([0, -5 * u]))
    put(14, neck + np.array([-1.5 * u, -6.5 * u]))
    put(15, neck + np.array([1.5 * u, -6.5 * u]))
    put(16, neck + np.array([-3 * u, -5.5 * u]))
    put(17, neck + np.array([3 * u, -5.5 * u]))
    # The figure faces the viewer, so its right side is on the image's left (mirror sign -1).
    for side, (shoulder_i, elbow_i, wrist_i), (hip_i, knee_i, ankle_i) in (
        (-1, (2, 3, 4), (8, 9, 10)),
        (1, (5, 6, 7), (11, 12, 13)),
    ):
        arm = arms[0] if side == -1 else arms[1]
        leg = legs[0] if side == -1 else legs[1]
        shoulder = neck + np.array([side * 5 * u, 0])
        put(shoulder_i, shoulder)
        put(elbow_i, shoulder + np.array([side * arm[0][0] * u, arm[0][1] * u]))
        put(wrist_i, shoulder + np.array([side * arm[1][0] * u, arm[1][1] * u]))
        hip = np.array([cx + side * 3 * u, hip_y])
        put(hip_i, hip)
        put(knee_i, hip + np.array([side * leg[0][0] * u, leg[0][1] * u]))
        put(ankle_i, hip + np.array([side * leg[1][0] * u, leg[1][1] * u]))
    return keypoints


def person_mask(keypoints: np.ndarray, height: float, size: int | tuple[int, int] = IMAGE_SIZE) -> np.ndarray:
    """Anti-aliased coverage of a stick figure: a filled head plus thick limbs and torso."""
    s = SUPERSAMPLE
    canvas_w, canvas_h = _canvas(size)
    big = np.zeros((canvas_h * s, canvas_w * s), np.uint8)
    u = height / 40.0
    points = np.round(keypoints[:, :2] * s).astype(np.int32)
    thickness = max(2, int(round(3 * u * s)))
    for a, b in LIMBS[:-1]:
        cv2.line(big, tuple(points[a]), tuple(points[b]), 255, thickness, cv2.LINE_AA)
    neck, hip_mid = points[1], (points[8] + points[11]) // 2
    cv2.line(big, tuple(neck), tuple(hip_mid), 255, thickness + s, cv2.LINE_AA)
    cv2.circle(big, tuple(points[0]), int(round(4.5 * u * s)), 255, -1, cv2.LINE_AA)
    return cv2.resize(big, (canvas_w, canvas_h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def background_image(name: str, size: int | tuple[int, int] = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(RGB float32 image, depth) of an empty scene: a sky gradient over a ground plane; `size` is a square's
    side or (width, height), the horizon at the same share of the height."""
    _, sky, ground = BACKGROUNDS[name]
    width, size = _canvas(size)  # `size` is the height below
    horizon = HORIZON_Y * size // IMAGE_SIZE
    rows = np.arange(size, dtype=np.float32)[:, None]
    sky_shade = 0.85 + 0.15 * rows / max(horizon, 1)  # a little lighter toward the horizon
    ground_shade = 1.0 - 0.12 * (rows - horizon) / max(size - horizon, 1)
    is_sky = rows < horizon
    shade = np.where(is_sky, sky_shade, ground_shade)[:, :, None]
    colour = np.where(is_sky[:, :, None], np.array(sky, np.float32), np.array(ground, np.float32))
    image = np.clip(np.broadcast_to(colour * shade, (size, width, 3)), 0, 255).astype(np.float32)
    # Depth: the sky is infinitely far (0); the ground comes nearer toward the bottom edge.
    ground_depth = 0.15 + 0.85 * (rows - horizon) / max(size - 1 - horizon, 1)
    depth = np.broadcast_to(np.where(is_sky, 0.0, ground_depth), (size, width)).astype(np.float32)
    return image.copy(), depth.copy()


def _style_fill(
    style: str, colour: np.ndarray, coverage: np.ndarray, box_centre, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel colour and coverage of a filled shape in a rendering style."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    fill = np.broadcast_to(colour, (size, size, 3)).copy()
    if style == "outline":
        eroded = cv2.erode(coverage, np.ones((5, 5), np.uint8))
        coverage = np.clip(coverage - eroded, 0, 1)
    elif style == "striped":
        stripe = ((xs + ys) // 3 % 2 == 0)[:, :, None]
        fill = np.where(stripe, fill, fill * 0.35 + 255 * 0.65)
    elif style == "dotted":
        dots = (((xs - box_centre[0]) % 5 - 2) ** 2 + ((ys - box_centre[1]) % 5 - 2) ** 2 <= 1.5)[:, :, None]
        fill = np.where(dots, 255.0, fill * 0.9)
    elif style == "checkered":
        # 6 px squares: 1.5 latent positions of the f=4 VAE, so the pattern survives the latent space
        checker = (((xs - box_centre[0]) // CHECKER_PX + (ys - box_centre[1]) // CHECKER_PX) % 2 == 0)[:, :, None]
        fill = np.where(checker, fill, fill * 0.25)
    return fill, coverage


def render(scene: Scene) -> Sample:
    """Draws a scene and derives its depth, keypoints and control maps."""
    if scene.world != 1:
        return _render_v2(scene)
    size = IMAGE_SIZE
    image, depth = background_image(scene.background)
    keypoints = np.zeros((NUM_KEYPOINTS, 3), np.float32)
    records = []
    for obj in scene.objects:
        colour = np.array(COLOURS[obj.colour], np.float32)
        if obj.kind == "person":
            height = obj.half_extent * 2
            keypoints = person_keypoints(obj.pose, obj.centre, height)
            coverage = person_mask(keypoints, height)
        else:
            coverage = shape_mask(obj.kind, obj.centre, obj.half_extent)
        ys, xs = np.nonzero(coverage > 0.5)
        if len(xs) == 0:
            continue
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        # Depth: an object stands where its base is; lower in the frame = nearer. Shapes bulge a little.
        base_depth = 0.3 + 0.6 * (box[3] / size)
        radial = 1 - np.clip(
            np.hypot(np.arange(size)[None, :] - obj.centre[0], np.arange(size)[:, None] - obj.centre[1])
            / max(obj.half_extent, 1),
            0,
            1,
        )
        object_depth = base_depth + 0.08 * radial
        if obj.style == "glow":
            halo = cv2.GaussianBlur(coverage, (0, 0), 2.5)
            image = image * (1 - 0.8 * halo[:, :, None]) + (colour * 0.6 + 255 * 0.4) * 0.8 * halo[:, :, None]
        fill, alpha = _style_fill(obj.style, colour, coverage, obj.centre, size)
        image = image * (1 - alpha[:, :, None]) + fill * alpha[:, :, None]
        solid = coverage > 0.5
        depth = np.where(solid, np.maximum(depth, object_depth), depth).astype(np.float32)
        records.append(
            {
                "kind": obj.kind,
                "colour": obj.colour,
                "size": obj.size,
                "style": obj.style,
                "box": box,
                "pose": obj.pose,
            }
        )
    rgb = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return Sample(
        image=rgb,
        caption=scene.caption,
        objects=records,
        depth=depth,
        keypoints=keypoints,
        scene=scene,
    )


def sample(seed: int, *, allow_unseen_styles: bool = False, world: int = DEFAULT_WORLD,
           size: tuple[int, int] | None = None, style_params: StyleParams | None = None) -> Sample:
    """The scene for one seed: the same seed always gives the same sample.

    `world` picks the world's version (WORLDS); `size` (width, height) is world 2's canvas (default 64x64),
    and the same seed draws the same scene, scaled, on every canvas; `style_params`: world 2's scene drawn with
    other textures (e.g. STYLE_PARAMS_V1, world 1's)."""
    rng = np.random.default_rng(seed)
    if world == 1:
        if size is not None and tuple(size) != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"size={size}: world 1 is {IMAGE_SIZE}x{IMAGE_SIZE} only; world 2 has other canvases")
        if style_params is not None:
            raise ValueError("style_params: world 1 draws its own textures; other textures are world 2's")
        return render(random_scene(rng, allow_unseen_styles=allow_unseen_styles))
    if world != 2:
        raise ValueError(f"world={world!r}; known: {WORLDS}")
    width, height = check_canvas(*(size or (IMAGE_SIZE, IMAGE_SIZE)))
    scene = random_scene_v2(rng, width=width, height=height, allow_unseen_styles=allow_unseen_styles)
    return render(replace(scene, style_params=style_params) if style_params else scene)


# ----------------------------------------------------------------------------- control maps

CANNY_LOW, CANNY_HIGH = 100, 200  # OpenCV thresholds, the ControlNet v1.1 canny defaults


MOVE_PX = 10  # how far a moved scene's objects may sit from their places, in each direction


def moved_sample(seed: int, *, allow_unseen_styles: bool = False) -> Sample:
    """World 1's scene of `seed` with every object moved by up to MOVE_PX each way, kept inside the picture. The
    world keeps objects within 3 px of nine places; a model trained only on those draws forms best there, and
    inpainting or a ControlNet asks for them anywhere. The caption stays (a move rarely leaves its third)."""
    base = sample(seed, allow_unseen_styles=allow_unseen_styles)
    rng = np.random.default_rng(seed)
    objects = []
    for obj in base.scene.objects:
        low, high = obj.half_extent, IMAGE_SIZE - obj.half_extent
        centre = np.clip(np.asarray(obj.centre) + rng.uniform(-MOVE_PX, MOVE_PX, size=2), low, high)
        objects.append(replace(obj, centre=(float(centre[0]), float(centre[1]))))
    return render(replace(base.scene, objects=objects))


def canny_map(rgb: np.ndarray, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> np.ndarray:
    edges = cv2.Canny(rgb, low, high)
    return np.repeat(edges[:, :, None], 3, axis=2)


def depth_to_image(depth: np.ndarray) -> np.ndarray:
    grey = np.clip(np.round(depth * 255), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


POSE_DRAW_SCALE = 8  # controlnet-aux draws 4 px sticks; drawing at 8x and shrinking keeps proportions


def pose_to_image(keypoints: np.ndarray, size: int | tuple[int, int] = IMAGE_SIZE) -> np.ndarray:
    """OpenPose-colour skeleton on black, drawn by controlnet-aux so built-in and Hub maps agree; `size` is a
    square's side or (width, height)."""
    from controlnet_aux.open_pose.body import Keypoint
    from controlnet_aux.open_pose.util import draw_bodypose

    width, height = _canvas(size)
    canvas = np.zeros((height * POSE_DRAW_SCALE, width * POSE_DRAW_SCALE, 3), np.uint8)
    if keypoints[:, 2].sum() > 0:
        points = [Keypoint(float(x) / width, float(y) / height) if v > 0 else None for x, y, v in keypoints]
        canvas = draw_bodypose(canvas, points)
    return cv2.resize(canvas, (width, height), interpolation=cv2.INTER_AREA)


# ----------------------------------------------------------------------------- world v2
#
# World 1 (above) is what the shipped models were trained on and stays as it is, byte for byte. World 2 keeps its
# grammar, colours, shapes, backgrounds and seeds-to-scenes rule, and changes four things:
# - textures a 64 px picture and the f=4 latent can carry: stripe and dot periods and glow widths chosen by
#   measurement (`python -m training.measure_styles`: a VAE round trip keeps every style recognisable);
# - people with free joint angles, drawn around and between the named poses; a caption names a pose only when
#   the figure is within POSE_TOLERANCE_DEG of a named one, and not always then;
# - a generic word (GENERIC_WORD, "a green shape") for an object whose form a control map decides: every
#   scene carries such a `control_caption`, and a share of text-to-image captions use it too, so the text
#   encoder learns the word with the U-Net;
# - canvases from 64x64 to 128x128, square and not: the horizon at the same share of the height, objects scaled
#   by the canvas' short side over 64, positions at the same shares of width and height.

# Canvas sides are multiples of 16: whole latents at f=4 (4 px) that the U-Net's two 2x downsamplings halve
# twice without a remainder (16 px -> 4 latents -> 2 -> 1).
CANVAS_SIDES = (64, 80, 96, 112, 128)
CANVAS_MULTIPLE = 16
MAX_ASPECT = 2.0  # 128x64 and 64x128 are the most elongated canvases
GENERIC_WORD = "shape"
GENERIC_CAPTION_SHARE = 0.1  # text-to-image captions that use the generic word instead of the form
POSE_TOLERANCE_DEG = 20.0  # a figure is "sitting" when every limb segment is within this of sitting's
NAMED_POSE_SHARE = 0.4  # people drawn around a named pose; the rest are between two named poses
POSE_JITTER_DEG = 6.0  # per-segment angle noise (sd) of every drawn pose
POSE_WORD_SHARE = 0.7  # a named pose is said in the caption this often; otherwise the caption leaves it out


@dataclass(frozen=True)
class StyleParams:
    """A world's textures, in pixels of a 64x64 canvas (scaled with the canvas)."""

    stripe_period: float  # diagonal stripes: light and coloured bands, this period across the bands
    dot_pitch: float  # white dots on a square grid centred on the object
    dot_radius: float
    glow_sigma: float  # Gaussian halo around the object
    glow_strength: float  # 0..1: how far the halo replaces the background at its peak
    outline_width: int  # outline style: the ring's width


# World 1's textures, as this parameterisation describes them (world 1 itself is drawn by `_style_fill`):
# stripes (x + y) // 3 % 2 are 3 * sqrt(2) = 4.24 px apart across the bands; dots every 5 px, radius sqrt(1.5).
STYLE_PARAMS_V1 = StyleParams(stripe_period=4.24, dot_pitch=5.0, dot_radius=1.22, glow_sigma=2.5,
                              glow_strength=0.8, outline_width=2)
# World 2's textures: chosen by `python -m training.measure_styles` (docs/MODEL_V2.md, "Style textures").
WORLD2_STYLE_PARAMS = StyleParams(stripe_period=12.0, dot_pitch=12.0, dot_radius=3.0, glow_sigma=6.0,
                                  glow_strength=0.95, outline_width=3)


def check_canvas(width: int, height: int) -> tuple[int, int]:
    """(width, height) of a world-2 canvas, or ValueError naming the value and the rule."""
    for name, side in (("width", width), ("height", height)):
        if side not in CANVAS_SIDES:
            raise ValueError(f"{name}={side}: world 2 canvases have sides in {CANVAS_SIDES}")
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise ValueError(f"{width}x{height}: world 2 canvases are at most {MAX_ASPECT:g}:1")
    return int(width), int(height)


def canvases() -> list[tuple[int, int]]:
    """Every world-2 canvas (width, height), square first."""
    sizes = [(w, h) for w in CANVAS_SIDES for h in CANVAS_SIDES if max(w, h) / min(w, h) <= MAX_ASPECT]
    return sorted(sizes, key=lambda wh: (wh[0] != wh[1], wh[0] * wh[1], wh))


def canvas_of(seed: int, sizes: list[tuple[int, int]] | None = None) -> tuple[int, int]:
    """The canvas a mixed-size training set gives `seed`: drawn from its own stream, so the scene is the same."""
    sizes = sizes or canvases()
    return sizes[int(np.random.default_rng([seed, 2]).integers(len(sizes)))]


def canvas_scale(width: int, height: int) -> float:
    """Object sizes and texture periods scale with the canvas' short side (64 px = 1)."""
    return min(width, height) / IMAGE_SIZE


def vocabulary_v2() -> list[str]:
    """World 2's caption words: world 1's in their order (their token ids stay), then the new words, sorted."""
    old = vocabulary()
    return old + sorted({GENERIC_WORD} - set(old))


# People: joint angles. A pose is 8 limb segments (upper and lower arm, upper and lower leg, right side then
# left), each an (angle in degrees, length in units of a 40 px figure) in the figure's outward-mirrored frame
# (x grows away from the body's midline), plus a lift (jumping raises the body).
LIMB_SEGMENTS = (("r-arm", (2, 3, 4)), ("l-arm", (5, 6, 7)), ("r-leg", (8, 9, 10)), ("l-leg", (11, 12, 13)))


@dataclass(frozen=True)
class PoseJoints:
    segments: tuple[tuple[float, float], ...]  # 8 x (angle_deg, length)
    lift: float = 0.0


@functools.cache
def named_joints() -> dict[str, PoseJoints]:
    """Each named pose's joint angles, read off world 1's figure (so a named pose draws world 1's skeleton)."""
    standing_neck = person_keypoints("standing", (0.0, 0.0), 40.0)[1, 1]
    result = {}
    for pose in POSES:
        points = person_keypoints(pose, (0.0, 0.0), 40.0)
        segments = []
        for name, (a, b, c) in LIMB_SEGMENTS:
            mirror = -1.0 if name.startswith("r-") else 1.0
            for start, end in ((a, b), (b, c)):
                dx, dy = (points[end, 0] - points[start, 0]) * mirror, points[end, 1] - points[start, 1]
                segments.append((math.degrees(math.atan2(dy, dx)), math.hypot(dx, dy)))
        result[pose] = PoseJoints(tuple(segments), lift=float(standing_neck - points[1, 1]))
    return result


def _angle_difference(a: float, b: float) -> float:
    return (a - b + 180.0) % 360.0 - 180.0


def pose_distance(joints: PoseJoints, other: PoseJoints) -> float:
    """Largest per-segment angle difference in degrees (the lift counts 10 degrees per unit)."""
    angles = [abs(_angle_difference(a, b)) for (a, _), (b, _) in zip(joints.segments, other.segments)]
    return max(max(angles), 10.0 * abs(joints.lift - other.lift))


def pose_name(joints: PoseJoints, tolerance: float = POSE_TOLERANCE_DEG) -> str | None:
    """The named pose within `tolerance` degrees of every segment, or None for a pose between names."""
    distances = {pose: pose_distance(joints, named) for pose, named in named_joints().items()}
    best = min(distances, key=distances.get)
    return best if distances[best] <= tolerance else None


def random_joints(rng: np.random.Generator) -> PoseJoints:
    """Around a named pose (NAMED_POSE_SHARE) or between two, with POSE_JITTER_DEG of noise per segment."""
    named = named_joints()
    first = named[str(rng.choice(POSES))]
    if rng.random() < NAMED_POSE_SHARE:
        second, t = first, 0.0
    else:
        second, t = named[str(rng.choice([p for p in POSES if named[p] != first]))], float(rng.uniform(0.25, 0.75))
    noise = rng.normal(0.0, POSE_JITTER_DEG, len(first.segments))
    segments = tuple(
        (a + t * _angle_difference(b, a) + float(n), la + t * (lb - la))
        for (a, la), (b, lb), n in zip(first.segments, second.segments, noise)
    )
    return PoseJoints(segments, lift=first.lift + t * (second.lift - first.lift))


def person_keypoints_v2(joints: PoseJoints, centre: tuple[float, float], height: float) -> np.ndarray:
    """OpenPose body-18 keypoints (18, 3) of a figure with free joint angles (world 1's head and torso)."""
    cx, cy = centre
    u = height / 40.0
    keypoints = person_keypoints("standing", (cx, cy - joints.lift * u), height)  # head, neck, shoulders, hips
    for index, (name, (a, b, c)) in enumerate(LIMB_SEGMENTS):
        mirror = -1.0 if name.startswith("r-") else 1.0
        point = keypoints[a, :2].astype(np.float64)
        for joint, (angle, length) in zip((b, c), joints.segments[2 * index:2 * index + 2]):
            radians = math.radians(angle)
            point = point + np.array([mirror * math.cos(radians), math.sin(radians)]) * length * u
            keypoints[joint, :2] = point
    return keypoints


def random_scene_v2(rng: np.random.Generator, *, width: int = IMAGE_SIZE, height: int = IMAGE_SIZE,
                    allow_unseen_styles: bool = False, style_params: StyleParams | None = None) -> Scene:
    """World 2's scene for a canvas: world 1's grammar with free poses, the generic word and scaled layout.
    Positions and sizes are drawn in 64x64 units and scaled at render, so one seed gives one scene on every canvas."""
    background, style, roll = _scene_frame(rng, allow_unseen_styles)
    if roll < 0.2:
        objects, phrase, generic = _person_scene_v2(rng, style)
    elif roll < 0.6:
        objects, phrase, generic = _single_object_scene_v2(rng, style)
    else:
        objects, phrase, generic = _two_object_scene_v2(rng, style)
    suffix = _caption_suffix(rng, style, background)
    caption = (generic if rng.random() < GENERIC_CAPTION_SHARE else phrase) + suffix
    return Scene(caption=caption, background=background, objects=objects, world=2, width=width, height=height,
                 control_caption=generic + suffix, style_params=style_params)


def _generic(colour: str) -> str:
    return f"{article(colour)} {colour} {GENERIC_WORD}"


def _single_object_scene_v2(rng, style):
    objects, phrase = _single_object_scene(rng, style)
    words = phrase.split()
    kind = objects[0].kind
    # The same phrase with the form replaced by the generic word (and its size word kept)
    generic = " ".join(GENERIC_WORD if w == kind else w for w in words)
    return objects, phrase, generic


def _two_object_scene_v2(rng, style):
    objects, phrase = _two_object_scene(rng, style)
    kinds = {o.kind for o in objects}
    generic = " ".join(GENERIC_WORD if w in kinds else w for w in phrase.split())
    return objects, phrase, generic


def _person_scene_v2(rng, style):
    colour = str(rng.choice(list(COLOURS)))
    joints = random_joints(rng)
    pose = pose_name(joints)
    position = str(rng.choice(["center", "left", "right"]))
    centre = _jitter(rng, (POSITIONS[position][1][0], 34), 2.0)
    say_pose = rng.random() < POSE_WORD_SHARE
    place = ""
    if position != "center" or rng.random() < 0.3:
        place = f" {POSITIONS[position][0]}"
    caption = f"{article(colour)} {colour} person"
    if pose is not None and say_pose:
        caption += f" {POSE_PHRASES[pose]}"
    person = SceneObject("person", colour, "big", centre, "flat" if style == "outline" else style, pose, joints)
    return [person], caption + place, _generic(colour) + place


def caption_without_pose(sample: Sample) -> str:
    """The caption with any pose phrase taken out ("a blue person waving on sand" -> "a blue person on sand"):
    what a pose ControlNet is trained and judged with, so the skeleton, not the word, decides the pose."""
    caption = sample.caption
    for phrase in sorted(POSE_PHRASES.values(), key=len, reverse=True):
        caption = caption.replace(f"person {phrase}", "person")
    return caption


def form_free_caption(sample: Sample) -> str:
    """The caption with the form left to a control map ("a green shape in snow"): world 2's control caption;
    for world 1 the same rule on its caption (world 1's vocabulary lacks the word: its model reads <|unk|>)."""
    if sample.scene.world != 1:
        return sample.control_caption
    kinds = {o.kind for o in sample.scene.objects}
    return " ".join(GENERIC_WORD if w in kinds else w for w in caption_without_pose(sample).split())


def _texture(function, width: int, height: int, samples: int = 4) -> np.ndarray:
    """Anti-aliased (width x height) coverage of a pattern `function(xs, ys) -> bool`, `samples`^2 per pixel."""
    offsets = (np.arange(samples, dtype=np.float32) + 0.5) / samples
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    total = np.zeros((height, width), np.float32)
    for dy in offsets:
        for dx in offsets:
            total += function(xs + dx, ys + dy)
    return total / samples**2


def _style_fill_v2(style: str, colour: np.ndarray, coverage: np.ndarray, centre, params: StyleParams,
                   scale: float) -> tuple[np.ndarray, np.ndarray]:
    """World 2's per-pixel colour and coverage of a filled shape in a style (periods scaled by `scale`)."""
    height, width = coverage.shape
    fill = np.broadcast_to(colour, (height, width, 3)).astype(np.float32).copy()
    cx, cy = centre
    if style == "outline":
        ring = 2 * max(1, int(round(params.outline_width * scale))) + 1
        coverage = np.clip(coverage - cv2.erode(coverage, np.ones((ring, ring), np.uint8)), 0, 1)
    elif style == "striped":
        period = params.stripe_period * scale * math.sqrt(2)  # along x + y, so `stripe_period` across the bands

        def bands(xs, ys):
            return ((xs - cx + ys - cy) / period) % 1.0 < 0.5

        light = _texture(bands, width, height)[:, :, None]
        fill = fill * (1 - light) + (fill * 0.35 + 255 * 0.65) * light
    elif style == "dotted":
        pitch, radius = params.dot_pitch * scale, params.dot_radius * scale

        def dots(xs, ys):
            dx = (xs - cx + pitch / 2) % pitch - pitch / 2
            dy = (ys - cy + pitch / 2) % pitch - pitch / 2
            return dx * dx + dy * dy <= radius * radius

        white = _texture(dots, width, height)[:, :, None]
        fill = fill * 0.9 * (1 - white) + 255.0 * white
    elif style == "checkered":
        side = CHECKER_PX * scale

        def checker(xs, ys):
            return (np.floor((xs - cx) / side) + np.floor((ys - cy) / side)) % 2 == 0

        dark = 1 - _texture(checker, width, height)[:, :, None]
        fill = fill * (1 - dark) + fill * 0.25 * dark
    return fill, coverage


def placed_v2(scene: Scene, obj: SceneObject):
    """Where world 2 draws `obj` on `scene`'s canvas: (coverage (H, W) float32, centre in canvas pixels, half-extent
    in canvas pixels, the figure's keypoints or None for a shape)."""
    width, height = scene.width, scene.height
    # Positions are 64x64 units: the same share of the width and height on any canvas.
    centre = (obj.centre[0] * width / IMAGE_SIZE, obj.centre[1] * height / IMAGE_SIZE)
    half_extent = obj.half_extent * canvas_scale(width, height)
    if obj.kind == "person":
        figure = 2 * half_extent
        keypoints = person_keypoints_v2(obj.joints or named_joints()[obj.pose], centre, figure)
        return person_mask(keypoints, figure, (width, height)), centre, half_extent, keypoints
    return shape_mask(obj.kind, centre, half_extent, (width, height)), centre, half_extent, None


def _render_v2(scene: Scene) -> Sample:
    """World 2's drawing: world 1's, on any canvas, with world 2's textures and free poses."""
    width, height = scene.width, scene.height
    scale = canvas_scale(width, height)
    params = scene.style_params or WORLD2_STYLE_PARAMS
    image, depth = background_image(scene.background, (width, height))
    keypoints = np.zeros((NUM_KEYPOINTS, 3), np.float32)
    records = []
    xs_grid, ys_grid = np.arange(width)[None, :], np.arange(height)[:, None]
    for obj in scene.objects:
        colour = np.array(COLOURS[obj.colour], np.float32)
        coverage, centre, half_extent, figure_keypoints = placed_v2(scene, obj)
        if figure_keypoints is not None:
            keypoints = figure_keypoints
        ys, xs = np.nonzero(coverage > 0.5)
        if len(xs) == 0:
            continue
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        base_depth = 0.3 + 0.6 * (box[3] / height)
        radial = 1 - np.clip(np.hypot(xs_grid - centre[0], ys_grid - centre[1]) / max(half_extent, 1), 0, 1)
        object_depth = base_depth + 0.08 * radial
        if obj.style == "glow":
            halo = cv2.GaussianBlur(coverage, (0, 0), params.glow_sigma * scale)
            halo = params.glow_strength * np.clip(halo / max(float(halo.max()), 1e-6), 0, 1)[:, :, None]
            image = image * (1 - halo) + (colour * 0.4 + 255 * 0.6) * halo
        fill, alpha = _style_fill_v2(obj.style, colour, coverage, centre, params, scale)
        image = image * (1 - alpha[:, :, None]) + fill * alpha[:, :, None]
        depth = np.where(coverage > 0.5, np.maximum(depth, object_depth), depth).astype(np.float32)
        records.append({"kind": obj.kind, "colour": obj.colour, "size": obj.size, "style": obj.style, "box": box,
                        "pose": obj.pose})
    rgb = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return Sample(image=rgb, caption=scene.caption, objects=records, depth=depth, keypoints=keypoints, scene=scene)


# ----------------------------------------------------------------------------- batches and CLI

def batch(seeds, *, allow_unseen_styles: bool = False, world: int = DEFAULT_WORLD,
          size: tuple[int, int] | None = None, moved: bool = False) -> tuple[np.ndarray, list[str]]:
    """(N, H, W, 3) uint8 images (64x64 unless world 2's `size`) and their captions for a list of seeds; `moved`:
    world 1's scenes with their objects moved (moved_sample)."""
    if moved:
        if world != DEFAULT_WORLD or size is not None:
            raise ValueError("moved scenes are world 1's, at 64x64")
        samples = [moved_sample(int(s), allow_unseen_styles=allow_unseen_styles) for s in seeds]
    else:
        samples = [sample(int(s), allow_unseen_styles=allow_unseen_styles, world=world, size=size) for s in seeds]
    return np.stack([s.image for s in samples]), [s.caption for s in samples]


def preview_grid(samples: list[Sample], columns: int = 6, scale: int = 3) -> np.ndarray:
    """A grid of enlarged samples with their captions and control maps beneath each."""
    from PIL import Image, ImageDraw

    cell_w, image_h, text_h = IMAGE_SIZE * scale, IMAGE_SIZE * scale, 36
    maps_h = IMAGE_SIZE
    rows = math.ceil(len(samples) / columns)
    sheet = Image.new("RGB", (columns * cell_w, rows * (image_h + maps_h + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, s in enumerate(samples):
        x, y = (i % columns) * cell_w, (i // columns) * (image_h + maps_h + text_h)
        sheet.paste(Image.fromarray(s.image).resize((cell_w, image_h), Image.NEAREST), (x, y))
        for j, control in enumerate((s.canny, s.depth_image, s.pose_image)):
            sheet.paste(Image.fromarray(control), (x + j * IMAGE_SIZE, y + image_h))
        words, lines = s.caption.split(), [""]
        for word in words:
            if len(lines[-1]) + len(word) + 1 > 30:
                lines.append("")
            lines[-1] = (lines[-1] + " " + word).strip()
        draw.multiline_text((x + 2, y + image_h + maps_h + 1), "\n".join(lines[:3]), fill="black", spacing=0)
    return np.asarray(sheet)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preview", help="write a captioned preview grid to this PNG file")
    parser.add_argument("--count", type=int, default=24, help="samples in the preview")
    parser.add_argument("--seed", type=int, default=0, help="first seed of the preview")
    parser.add_argument("--vocabulary", action="store_true", help="print the caption vocabulary")
    args = parser.parse_args(argv)
    if args.vocabulary:
        print(" ".join(vocabulary()))
    if args.preview:
        from PIL import Image

        samples = [sample(args.seed + i) for i in range(args.count)]
        Image.fromarray(preview_grid(samples)).save(args.preview)
        print(f"wrote {args.preview} ({args.count} samples from seed {args.seed})")
    if not (args.preview or args.vocabulary):
        parser.print_help()


if __name__ == "__main__":
    main()
