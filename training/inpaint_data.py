"""Inpainting examples from the Shapes world: masks like the ones people paint, and captions that say what.

An example is (source scene, mask, caption, target): the U-Net sees the source with the mask's area greyed
out and learns to paint the target there. The rule it learns, everywhere the same:
- objects the caption names that the unmasked picture does not show go inside the mask (add / replace);
- an object the mask hides whole and the caption does not name is gone from the target (remove): the area
  becomes the world's background, so an empty prompt or one naming only the background removes;
- everything else continues the picture: the background, the horizon and objects cut by the mask's edge.
  The caption's background words never override what the unmasked picture shows (a share of captions name
  a wrong background on purpose), so an outpainted border continues the scene whatever the prompt says.

Scenes and masks are deterministic per seed. Training draws scenes below `common.HELD_OUT_SEED` and masks
from seeds below `HELD_OUT_MASK_SEED`; `training.evaluate_inpaint` draws both from at or above them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np

from training import shapes

HELD_OUT_MASK_SEED = 2_000_000_000  # mask seeds at or above this are evaluation-only
HIDDEN_SHARE = 0.85  # an object counts as hidden when the mask covers this share of its pixels

# Mask kinds a trainer draws, with their shares: object-aimed masks (boxes with a margin, the object's own
# shape grown, a scribble over it), masks anywhere (boxes, brush strokes), border bands (outpainting) and,
# now and then, the whole image.
# Recipes by name. "loose" adds "object-loose", a box or ellipse well beyond the object with the object anywhere
# inside: how people mask an area for a new object, and what keeps the hole's outline from telling the object's
# size and place ("tight" masks alone taught the U-Net to fill loose holes with background).
COMPOSE_MASKS = {
    "object-box": 0.07,
    "object-loose": 0.12,
    "object-shape": 0.04,
    "object-scribble": 0.06,
    "box": 0.08,
    "strokes": 0.07,
    "band": 0.2,
    "full": 0.04,
    "add": 0.22,
    "swap": 0.1,
}


def outline_free(masks: dict[str, float]) -> dict[str, float]:
    """`masks` without "object-shape" (a mask shaped like the object it holds: its silhouette grown), its share
    given to "object-loose". With such masks the U-Net may learn to draw the outline it is given, so that a round
    brush blob turns a requested star into a disc (assets/models/shapes-inpaint/README.md, Limits)."""
    out = {k: v for k, v in masks.items() if k != "object-shape"}
    out["object-loose"] += masks.get("object-shape", 0.0)
    return out


def centred(masks: dict[str, float]) -> dict[str, float]:
    """`masks` with "object-loose" (the object anywhere inside a wide hole) replaced by "object-around" (a wide box
    or ellipse centred on the object), as people paint around where they want an object. It tests whether holes
    that may hold their object anywhere make the U-Net draw rounded blobs; going on with it did not raise the
    share of added objects (assets/models/shapes-inpaint/README.md, Limits)."""
    return {("object-around" if k == "object-loose" else k): v for k, v in masks.items()}


# Variants of "compose": each passes compose's mask tables, for the scene's own objects and for new ones, through
# one rule ("compose-free": outline_free; "compose-centred": every wide mask centred on its object)
COMPOSE_VARIANTS = {"compose-free": outline_free, "compose-centred": centred}
MASK_RECIPES = {
    "tight": {
        "object-box": 0.22,
        "object-shape": 0.12,
        "object-scribble": 0.12,
        "box": 0.14,
        "strokes": 0.12,
        "band": 0.22,
        "full": 0.06,
    },
    "loose": {
        "object-box": 0.12,
        "object-loose": 0.22,
        "object-shape": 0.06,
        "object-scribble": 0.12,
        "box": 0.12,
        "strokes": 0.1,
        "band": 0.2,
        "full": 0.06,
    },
    # "compose" adds what the world's own scenes never show: a new object put at any free place of any scene
    # ("add": three shapes, a shape beside a person, positions between the caption's nine) and an object swapped
    # for another of a different colour and shape ("swap"), each with a caption naming only the new object, as
    # people prompt an inpainting tab.
    "compose": COMPOSE_MASKS,
    **{name: rule(COMPOSE_MASKS) for name, rule in COMPOSE_VARIANTS.items()},
}
# Canvases that are not 64x64 (world 2's, `canvas_sample`): compose's masks with more border bands, as people
# outpaint a picture wider or taller, and no whole-image masks (text to image on a canvas the base never drew)
MASK_RECIPES["canvas"] = {**COMPOSE_MASKS, "band": 0.35, "full": 0.0}
# "canvas-scene": more bands, most of them captioned with the whole scene, whose objects the picture mostly shows
# already (BAND_CAPTION_MODES): outpainting given the picture's own prompt draws its objects again in the new area
# (evaluate_inpaint --repeats), and these examples say not to
MASK_RECIPES["canvas-scene"] = {**MASK_RECIPES["canvas"], "band": 0.5}
# The canvases `canvas_sample` draws for training: the app brings a picture to the model's height (64 px) and
# lets a wide one go on sideways, and the Outpaint tab grows a 64 px picture wider or taller, so every such
# canvas has one side at 64 (world 2's sides are multiples of 16)
CANVAS_SIZES = [size for size in shapes.canvases() if min(size) == shapes.IMAGE_SIZE and size != (64, 64)]
MASK_KINDS = MASK_RECIPES["compose"]  # the current recipe
# Mask kinds that put a new object into the scene (the caption names it; the source does not show it)
NEW_OBJECT_KINDS = ("add", "swap")
# Masks drawn around a new object by "add" and "swap", with their shares (object_mask's kinds)
NEW_OBJECT_MASKS = {"object-box": 0.35, "object-loose": 0.4, "object-scribble": 0.15, "object-shape": 0.1}
NEW_OBJECT_MASKS_BY_RECIPE = {name: rule(NEW_OBJECT_MASKS) for name, rule in COMPOSE_VARIANTS.items()}
NEW_OBJECT_STYLED = 0.3  # share of new objects drawn in a style, which their phrase then names
# How a caption is made: the whole scene's; only what the mask hides; what remains after removing the hidden
# objects; or empty (which also removes hidden objects, so the empty prompt of classifier-free guidance
# means "nothing new").
CAPTION_MODES = {"scene": 0.3, "part": 0.35, "remove": 0.25, "empty": 0.1}
BAND_CAPTION_MODES = {"canvas-scene": {"scene": 0.6, "part": 0.15, "remove": 0.15, "empty": 0.1}}  # by recipe
# Share of captions whose background words contradict the picture (the picture wins), by recipe: "compose" names
# a wrong background more often, as people outpaint with a prompt that names another background
WRONG_BACKGROUND_SHARES = {"tight": 0.1, "loose": 0.1, "compose": 0.25}
WRONG_BACKGROUND_SHARES.update({name: WRONG_BACKGROUND_SHARES["compose"]
                                for name in (*COMPOSE_VARIANTS, "canvas", "canvas-scene")})


@dataclass
class InpaintExample:
    source: np.ndarray  # (H, W, 3) uint8 (64x64 for world 1): the scene the user starts from
    mask: np.ndarray  # (H, W) bool: True = repaint
    caption: str
    target: np.ndarray  # (H, W, 3) uint8: source outside the mask, the finished scene inside
    mode: str  # a CAPTION_MODES key
    mask_kind: str  # a MASK_KINDS key
    hidden: int = 0  # objects of the source the mask hides whole


# ----------------------------------------------------------------------------- object coverage and phrases


def coverage(obj: shapes.SceneObject, scene: shapes.Scene | None = None) -> np.ndarray:
    """(H, W) float32 coverage of one scene object, as the renderer draws it: on world 1's 64x64 canvas, or on
    `scene`'s canvas when it is a world-2 scene."""
    if scene is not None and scene.world != 1:
        return shapes.placed_v2(scene, obj)[0]
    if obj.kind == "person":
        height = obj.half_extent * 2
        return shapes.person_mask(shapes.person_keypoints(obj.pose, obj.centre, height), height)
    return shapes.shape_mask(obj.kind, obj.centre, obj.half_extent)


def hidden_objects(scene: shapes.Scene, mask: np.ndarray) -> list[int]:
    """Indices of the objects the mask covers (almost) whole."""
    hidden = []
    for i, obj in enumerate(scene.objects):
        solid = coverage(obj, scene) > 0.5
        if solid.any() and (solid & mask).sum() >= HIDDEN_SHARE * solid.sum():
            hidden.append(i)
    return hidden


def object_phrase(
    obj: shapes.SceneObject, rng: np.random.Generator, *, size_share=0.6, style_share=0.7, position_share=0.2
) -> str:
    """'a big green star', sometimes with its style or position, as a person names one object."""
    words = []
    if obj.kind != "person" and rng.random() < size_share:
        words.append(obj.size)
    words += [obj.colour, obj.kind]
    phrase = f"{shapes.article(words[0])} {' '.join(words)}"
    if obj.kind == "person" and obj.pose:
        phrase += f" {shapes.POSE_PHRASES[obj.pose]}"
    if obj.style != "flat" and rng.random() < style_share:
        phrase += f" in {obj.style} style"
    if rng.random() < position_share:
        phrase += f" {shapes.POSITIONS[position_name(obj.centre)][0]}"
    return phrase


def position_name(centre: tuple[float, float]) -> str:
    """The caption position (a shapes.POSITIONS key) nearest to a centre."""
    return min(
        shapes.POSITIONS,
        key=lambda p: (shapes.POSITIONS[p][1][0] - centre[0]) ** 2 + (shapes.POSITIONS[p][1][1] - centre[1]) ** 2,
    )


def background_phrase(background: str) -> str:
    return shapes.BACKGROUNDS[background][0]


def join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


# ----------------------------------------------------------------------------- masks


def box_mask(x0: float, y0: float, x1: float, y1: float,
             size: int | tuple[int, int] = shapes.IMAGE_SIZE) -> np.ndarray:
    """A box on a size x size (or (width, height)) canvas."""
    width, height = shapes._canvas(size)
    mask = np.zeros((height, width), bool)
    mask[max(0, int(round(y0))) : max(0, int(round(y1))), max(0, int(round(x0))) : max(0, int(round(x1)))] = True
    return mask


def stroke_mask(points: np.ndarray, thickness: int, size: int | tuple[int, int] = shapes.IMAGE_SIZE) -> np.ndarray:
    """A brush stroke through `points` ((N, 2) pixels), round caps, as a sketchpad brush draws."""
    width, height = shapes._canvas(size)
    canvas = np.zeros((height, width), np.uint8)
    cv2.polylines(canvas, [np.round(points).astype(np.int32)], False, 255, thickness, cv2.LINE_AA)
    for x, y in np.round(points[[0, -1]]).astype(int):
        cv2.circle(canvas, (int(x), int(y)), thickness // 2, 255, -1)
    return canvas >= 128


def grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    if pixels <= 0:
        return mask
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel) > 0


def object_mask(kind: str, obj: shapes.SceneObject, rng: np.random.Generator,
                scene: shapes.Scene | None = None) -> np.ndarray:
    """A mask over one object (of `scene`, for a world-2 canvas): a box with a margin, its shape grown, or a
    scribble across it."""
    solid = coverage(obj, scene) > 0.5
    canvas_size = solid.shape[::-1]  # (width, height)
    ys, xs = np.nonzero(solid)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    if kind == "object-box":
        m = rng.uniform(2, 7, size=4)
        return box_mask(x0 - m[0], y0 - m[1], x1 + m[2], y1 + m[3], canvas_size)
    if kind == "object-shape":
        return grow(solid, int(rng.integers(2, 6)))
    if kind in ("object-loose", "object-around"):
        w, h = (x1 - x0) + rng.uniform(4, 18), (y1 - y0) + rng.uniform(4, 18)
        # "object-loose": the object anywhere inside; "object-around": centred, within a pixel as a hand paints
        slack = (rng.uniform(-1, 1, size=2) * [(w - (x1 - x0)) / 2, (h - (y1 - y0)) / 2] if kind == "object-loose"
                 else rng.uniform(-1, 1, size=2))
        cx, cy = (x0 + x1) / 2 + slack[0], (y0 + y1) / 2 + slack[1]
        if rng.random() < 0.4:
            canvas = np.zeros(solid.shape, np.uint8)
            # an ellipse holding the box's corners: semi-axes sqrt(2) x half the box
            cv2.ellipse(canvas, (int(round(cx)), int(round(cy))), (int(w * 0.71), int(h * 0.71)), 0, 0, 360, 255, -1)
            return canvas > 0
        return box_mask(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, canvas_size)
    # A zigzag across the object's box, with a brush thick enough to cover it, as people scribble
    rows = int(rng.integers(2, 4))
    thickness = int(np.ceil((y1 - y0 + 6) / rows)) + int(rng.integers(2, 6))
    ys_line = np.linspace(y0 - 1, y1 + 1, rows)
    points = [(x0 - 2, ys_line[0])]
    for i, y in enumerate(ys_line):
        points.append((x1 + 2 if i % 2 == 0 else x0 - 2, y))
    return stroke_mask(np.array(points, np.float32), thickness, canvas_size) | grow(solid, 1)


def random_mask(kind: str, rng: np.random.Generator, size: int | tuple[int, int] = shapes.IMAGE_SIZE) -> np.ndarray:
    """A mask not aimed at any object, on a size x size (or (width, height)) canvas."""
    canvas_w, canvas_h = shapes._canvas(size)
    if kind == "box":
        w, h = rng.integers(12, 41, size=2)
        x0, y0 = rng.integers(-4, canvas_w - w + 5), rng.integers(-4, canvas_h - h + 5)
        return box_mask(x0, y0, x0 + w, y0 + h, size)
    if kind == "strokes":
        mask = np.zeros((canvas_h, canvas_w), bool)
        for _ in range(int(rng.integers(1, 4))):
            points = rng.uniform(-4, np.array([canvas_w, canvas_h]) + 4, size=(int(rng.integers(2, 5)), 2))
            mask |= stroke_mask(points, int(rng.integers(4, 15)), size)
        return mask
    if kind == "band":  # outpainting: new borders on one to four sides, each up to half the canvas across
        mask = np.zeros((canvas_h, canvas_w), bool)
        sides = [s for s in ("left", "right", "top", "bottom") if rng.random() < 0.4] or [
            str(rng.choice(["left", "right", "top", "bottom"]))
        ]
        for side in sides:
            width = int(rng.integers(8, (canvas_w if side in ("left", "right") else canvas_h) // 2 + 1))
            if side == "left":
                mask[:, :width] = True
            elif side == "right":
                mask[:, canvas_w - width :] = True
            elif side == "top":
                mask[:width] = True
            else:
                mask[canvas_h - width :] = True
        return mask
    if kind == "full":
        return np.ones((canvas_h, canvas_w), bool)
    raise ValueError(f"unknown mask kind {kind!r}; known: {', '.join(MASK_KINDS)}")


def _choose(rng: np.random.Generator, table: dict[str, float]) -> str:
    names = list(table)
    weights = np.array([table[n] for n in names], np.float64)
    return names[int(rng.choice(len(names), p=weights / weights.sum()))]


# ----------------------------------------------------------------------------- examples


def render_without(scene: shapes.Scene, drop: list[int]) -> np.ndarray:
    """The scene rendered again without the objects at `drop`: the ground truth of removing them."""
    kept = [obj for i, obj in enumerate(scene.objects) if i not in drop]
    return shapes.render(replace(scene, objects=kept)).image


def canvas_sample(scene_seed: int, size: tuple[int, int]) -> shapes.Sample:
    """World 2's scene of `scene_seed` on a (width, height) canvas, drawn with world 1's textures (the base model's),
    its caption in world 1's words: a seed whose caption uses world 2's generic word gives the next seed's scene."""
    while True:
        sample = shapes.sample(scene_seed, world=2, size=size, style_params=shapes.STYLE_PARAMS_V1)
        if shapes.GENERIC_WORD not in sample.caption.split():
            return sample
        scene_seed += 1


def training_example(scene_seed: int, mask_seed: int, recipe: str = "loose",
                     size: tuple[int, int] | None = None) -> InpaintExample:
    """One training example: the scene of `scene_seed` (world 1's at 64x64, or `canvas_sample`'s on a (width,
    height) canvas), a mask (from MASK_RECIPES[recipe]) and caption mode drawn from `mask_seed`."""
    rng = np.random.default_rng(mask_seed)
    sample = shapes.sample(scene_seed) if size is None else canvas_sample(scene_seed, size)
    scene = sample.scene
    mask_kind = _choose(rng, MASK_RECIPES[recipe])
    if mask_kind in NEW_OBJECT_KINDS:
        example = new_object_example(sample, mask_kind, rng, WRONG_BACKGROUND_SHARES[recipe],
                                     NEW_OBJECT_MASKS_BY_RECIPE.get(recipe, NEW_OBJECT_MASKS))
        if example is not None:
            return example
        mask_kind = "box"  # no free place for a new object in this scene: an area anywhere instead
    if mask_kind.startswith("object"):
        target_index = int(rng.integers(len(scene.objects)))
        mask = object_mask(mask_kind, scene.objects[target_index], rng, scene)
    else:
        mask = random_mask(mask_kind, rng, (scene.width, scene.height))
    hidden = hidden_objects(scene, mask)
    mode = _choose(rng, BAND_CAPTION_MODES.get(recipe, CAPTION_MODES) if mask_kind == "band" else CAPTION_MODES)
    background = _caption_background(scene, mask, rng, WRONG_BACKGROUND_SHARES[recipe])
    bg_words = background_phrase(background) if rng.random() < 0.5 else ""
    target = sample.image
    if mode == "scene":
        caption = scene.caption if background == scene.background else with_background(scene, background)
    elif mode == "part":
        caption = join(" and ".join(object_phrase(scene.objects[i], rng) for i in hidden), bg_words)
    else:
        if hidden:
            target = render_without(scene, hidden)
        caption = "" if mode == "empty" else bg_words
    return InpaintExample(
        source=sample.image,
        mask=mask,
        caption=caption,
        target=target,
        mode=mode,
        mask_kind=mask_kind,
        hidden=len(hidden),
    )


def _caption_background(scene: shapes.Scene, mask: np.ndarray, rng: np.random.Generator, wrong_share: float) -> str:
    """The background a caption names: the scene's, or now and then another one (the picture still wins)."""
    if not mask.all() and rng.random() < wrong_share:
        return str(rng.choice([b for b in shapes.BACKGROUNDS if b != scene.background]))
    return scene.background


def new_object_example(
    sample: shapes.Sample, kind: str, rng: np.random.Generator, wrong_share: float,
    masks: dict[str, float] = NEW_OBJECT_MASKS,
) -> InpaintExample | None:
    """A new object in the scene, named alone by the caption: at a free place ("add") or instead of one of the
    scene's shapes ("swap", another colour and shape at the same place and size). None when it has no room."""
    scene = sample.scene
    colour, shape = shapes._random_pair(rng)
    style = str(rng.choice(shapes.STYLES[1:])) if rng.random() < NEW_OBJECT_STYLED else "flat"
    drop: list[int] = []
    if kind == "swap":
        kept = [i for i, o in enumerate(scene.objects) if o.kind != "person"]
        if not kept:
            return None
        index = int(rng.choice(kept))
        old = scene.objects[index]
        while shape == old.kind:
            colour, shape = shapes._random_pair(rng)
        new = shapes.SceneObject(shape, colour, old.size, old.centre, style)
        drop = [index]
    else:
        size = str(rng.choice(list(shapes.SIZES)))
        centre = free_place(scene, shapes.SIZES[size], rng)
        if centre is None:
            return None
        new = shapes.SceneObject(shape, colour, size, centre, style)
    solid = coverage(new, scene)
    mask = object_mask(_choose(rng, masks), new, rng, scene) | grow(solid > 0.02, 1)
    if kind == "swap":
        mask |= grow(coverage(scene.objects[drop[0]], scene) > 0.02, 1)  # the old object goes whole
    # Objects of the scene the mask hides whole and the caption does not name are gone, as in every example
    drop = sorted(set(drop) | set(hidden_objects(scene, mask)))
    objects = [o for i, o in enumerate(scene.objects) if i not in drop] + [new]
    target = shapes.render(replace(scene, objects=objects)).image
    # A glow reaches past an object's coverage: the mask takes in every pixel that changed, so outside the mask
    # the target is the source (unless that hides another object whole: then no example from this draw)
    mask |= grow((target != sample.image).any(axis=2), 1)
    if not set(hidden_objects(scene, mask)) <= set(drop):
        return None
    background = _caption_background(scene, mask, rng, wrong_share)
    caption = join(
        object_phrase(new, rng, size_share=0.5, style_share=1.0, position_share=0.1),
        background_phrase(background) if rng.random() < 0.3 else "",
    )
    return InpaintExample(
        source=sample.image, mask=mask, caption=caption, target=target, mode="part", mask_kind=kind, hidden=1
    )


def free_place(scene: shapes.Scene, half_extent: float, rng: np.random.Generator, tries: int = 30):
    """A centre (in the 64x64 units of SceneObject.centre) where a shape of `half_extent` fits inside the picture,
    2 px clear of every object; or None. On a world-2 canvas the shape is scaled as world 2 draws it."""
    width, height = scene.width, scene.height
    taken = np.zeros((height, width), bool)
    for obj in scene.objects:
        taken |= coverage(obj, scene) > 0.05
    taken = grow(taken, 2)
    if scene.world != 1:
        half_extent *= shapes.canvas_scale(width, height)
    low, high = half_extent + 1, np.array([width, height], np.float64) - half_extent - 1
    for _ in range(tries):
        x, y = rng.uniform(low, high)
        # the object's box
        probe = shapes.shape_mask("square", (float(x), float(y)), half_extent / 0.88, (width, height)) > 0.05
        if not (probe & taken).any():
            return float(x) * shapes.IMAGE_SIZE / width, float(y) * shapes.IMAGE_SIZE / height
    return None


def with_background(scene: shapes.Scene, background: str) -> str:
    """The scene's caption with its background phrase swapped for another background's."""
    own = background_phrase(scene.background)
    caption = scene.caption[: -len(own) - 1] if own and scene.caption.endswith(" " + own) else scene.caption
    return join(caption, background_phrase(background))


def masked_source(source: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """What a 9-channel U-Net is shown: the source with the mask's area at 0 in [-1, 1] (mid grey), exactly as
    diffusers' StableDiffusionInpaintPipeline builds `masked_image` (image * (mask < 0.5))."""
    out = source.astype(np.float32) / 127.5 - 1
    out[mask] = 0.0
    return out
