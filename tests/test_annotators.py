"""Shapes-world annotators: training smoke runs, the shipped models on renders and photo-like pictures,
the engine's annotator hook, and the control-map metrics of training.evaluate."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from training import annotators, evaluate, shapes
from training.common import HELD_OUT_SEED

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "assets" / "models" / "shapes-annotators"
BUILTIN_LDM = REPO / "assets" / "models" / "shapes-ldm"
EXAMPLES = REPO / "assets" / "examples"


def shipped(kind: str) -> Path:
    folder = SHIPPED / kind
    if not (folder / annotators.WEIGHTS_NAME).is_file():
        pytest.skip(f"no shipped {kind} annotator at {folder} (python -m training.train_annotators --kind {kind})")
    return folder


def photo_like(width: int = 300, height: int = 200, seed: int = 0) -> Image.Image:
    """A natural-looking picture without any Shapes-world content: smooth colour fields, texture, blur, noise."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width] / max(width, height)
    fields = [
        np.sin(2 * np.pi * (rng.uniform(0.5, 3) * xs + rng.uniform(0.5, 3) * ys + rng.uniform())) for _ in range(3)
    ]
    image = np.stack([(f * 0.5 + 0.5) * rng.uniform(80, 200) + rng.uniform(0, 50) for f in fields], -1)
    image += rng.normal(0, 12, image.shape)
    picture = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.5))
    return Image.fromarray(
        np.clip(np.asarray(picture) + rng.normal(0, 6, (height, width, 3)), 0, 255).astype(np.uint8)
    )


# ----------------------------------------------------------------------------- training smoke runs

@pytest.mark.parametrize("kind", annotators.KINDS)
def test_train_annotators_two_steps_exports_a_loadable_annotator(tmp_path, kind):
    from training.train_annotators import AnnotatorTrainConfig, train

    config = AnnotatorTrainConfig(train_scenes=12, batch_size=4, eval_count=4)
    result = train(kind, tmp_path, 2, config, log_every=1, eval_every=2)
    assert result["step"] == 2 and len(result["history"]) == 1
    folder = tmp_path / "annotator"
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert (tmp_path / "log.csv").read_text().count("\n") == 3  # header + 2 steps
    assert (tmp_path / "samples" / "step-000002.png").is_file()
    # Resumes from the checkpoint rather than starting over.
    assert train(kind, tmp_path, 3, config, log_every=1, eval_every=3)["step"] == 3
    annotate = annotators.load_annotator(kind, folder)
    out = annotate(Image.fromarray(shapes.sample(11).image))
    assert out.size == (64, 64) and out.mode == "RGB"
    from training import cards

    card = cards.write_annotator_card(folder, kind, {"score": 0.5}).read_text()
    assert "| score | 0.5 |" in card and "| step | minutes |" in card and f"--kind {kind}" in card


def test_load_annotator_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="kind='canny' has no learned annotator"):
        annotators.load_annotator("canny", tmp_path)
    with pytest.raises(FileNotFoundError, match="no depth annotator in .*train_annotators --kind depth"):
        annotators.load_annotator("depth", tmp_path)


def test_pose_drawing_is_controlnet_aux_and_matches_the_world():
    sample = shapes.sample(annotators.person_seeds(0, 1)[0])
    assert np.array_equal(annotators.draw_pose(sample.keypoints, 64, 64), sample.pose_image)
    scaled = sample.keypoints.copy()
    scaled[:, :2] *= [3, 2]  # the same skeleton on a 192x128 picture
    drawn = annotators.draw_pose(scaled, 192, 128)
    assert drawn.shape == (128, 192, 3) and drawn.max() > 0
    assert annotators.draw_pose(np.zeros((18, 3), np.float32), 70, 50).max() == 0


def test_person_seeds_hold_a_person():
    seeds = annotators.person_seeds(HELD_OUT_SEED, 5)
    assert all(shapes.sample(s).keypoints[:, 2].sum() == 18 for s in seeds)
    assert all(annotators.person_size(shapes.sample(s)) > 30 for s in seeds)


# ----------------------------------------------------------------------------- the shipped annotators

@pytest.mark.parametrize("kind", annotators.KINDS)
def test_shipped_annotator_runs_on_renders_and_photos_at_their_size(kind):
    annotate = annotators.load_annotator(kind, shipped(kind))
    pictures = [
        Image.open(EXAMPLES / "person.png"),  # a 64x64 render
        Image.open(EXAMPLES / "person_256.png"),  # an enlarged render
        photo_like(300, 200),  # photo-like, not square, nothing of the Shapes world
        photo_like(97, 131, seed=1).convert("L"),  # odd size, greyscale
    ]
    for picture in pictures:
        out = annotate(picture)
        assert out.mode == "RGB" and out.size == picture.size
    if kind == "pose":  # the figure is found in the render, and drawn where it is
        skeleton = np.asarray(annotate(pictures[0]))
        truth = shapes.sample(100).pose_image  # person.png is seed 100
        assert skeleton.max() > 0
        overlap = ((skeleton.max(-1) > 40) & (truth.max(-1) > 40)).sum() / max((truth.max(-1) > 40).sum(), 1)
        assert overlap > 0.5


def test_shipped_depth_annotator_is_accurate_on_held_out_renders():
    model = annotators.load_model("depth", shipped("depth"))
    images, depth = evaluate.held_out_depth_set(40)
    assert evaluate.depth_abs_rel(annotators.predict_depth(model, images), depth) <= 0.15


def test_shipped_pose_annotator_is_accurate_on_held_out_renders():
    model = annotators.load_model("pose", shipped("pose"))
    images, keypoints, sizes = evaluate.held_out_pose_set(30)
    assert evaluate.pck(annotators.predict_keypoints(model, images), keypoints, sizes) >= 0.8
    # No person, no skeleton.
    empty = [s.image for s in (shapes.sample(HELD_OUT_SEED + i) for i in range(30)) if not s.keypoints[:, 2].any()]
    assert annotators.predict_keypoints(model, np.stack(empty))[..., 2].sum() == 0


# ----------------------------------------------------------------------------- the engine's hook

def _preprocess_with(engine, kind, picture):
    from pipelines import controlnet

    return controlnet.preprocess(engine, image=picture, control_type=kind, preprocessor=kind)


@pytest.fixture(scope="module")
def tiny_engine_with_shipped_annotators(tmp_path_factory):
    """An engine over a tiny random Shapes-like pipeline whose preset points at the shipped annotators."""
    from pipelines.engine import Engine
    from pipelines.registry import preset_from_folder
    from tests.tiny_models import _save_pipeline, shapes_like_components

    folder = _save_pipeline(shapes_like_components(), tmp_path_factory.mktemp("tiny-ldm") / "pipeline")
    return Engine(preset_from_folder(folder, name="tiny-shapes-annotated", annotators=str(SHIPPED)), device="cpu")


@pytest.mark.parametrize("kind", annotators.KINDS)
def test_engine_annotator_hook_uses_the_shipped_annotators(kind, request):
    shipped(kind)
    engine = request.getfixturevalue("tiny_engine_with_shipped_annotators")
    from pipelines.request import working_size

    picture = Image.open(EXAMPLES / "person_256.png")
    out = _preprocess_with(engine, kind, picture)
    assert out.mode == "RGB" and out.size == working_size(engine, picture.size)
    assert np.asarray(out).max() > 0


@pytest.mark.skipif(not (BUILTIN_LDM / "model_index.json").is_file(),
                    reason="the built-in model is not trained yet (assets/models/shapes-ldm has no model_index.json)")
@pytest.mark.parametrize("kind", annotators.KINDS)
def test_builtin_model_preprocesses_depth_and_pose(kind):
    from pipelines.engine import Engine
    from pipelines.registry import resolve_preset

    shipped(kind)
    engine = Engine(resolve_preset("shapes"), device="cpu")
    render = Image.open(EXAMPLES / "person.png")
    out = _preprocess_with(engine, kind, render)
    assert out.mode == "RGB" and out.size == render.size
    if kind == "pose":
        assert np.asarray(out).max() > 0


# ----------------------------------------------------------------------------- metrics

def test_edge_f1_tolerates_two_pixels_and_no_more():
    edges = np.zeros((64, 64), np.uint8)
    edges[20:40, 30] = 255
    assert evaluate.edge_f1(edges, edges) == 1.0
    assert evaluate.edge_f1(np.roll(edges, 2, axis=1), edges) == 1.0
    assert evaluate.edge_f1(np.roll(edges, 3, axis=1), edges) == 0.0
    assert evaluate.edge_f1(np.zeros_like(edges), edges) == 0.0
    assert evaluate.edge_f1(np.zeros_like(edges), np.zeros_like(edges)) == 1.0


def test_depth_abs_rel_leaves_out_the_sky_and_pearson_ignores_scale():
    true = np.zeros((4, 4), np.float32)
    true[2:] = 0.5
    pred = true.copy()
    pred[:2] = 0.9  # wrong sky: not counted by abs-rel
    pred[3] = 0.6
    assert evaluate.depth_abs_rel(pred, true) == pytest.approx(0.1)
    assert evaluate.pearson(true * 2 + 1, true) == pytest.approx(1.0)
    assert evaluate.pearson(np.ones(4), np.arange(4)) == 0.0


def test_pck_counts_visible_truth_within_a_share_of_the_person_size():
    true = np.zeros((1, 18, 3), np.float32)
    true[0, :, 2] = 1
    pred = true.copy()
    pred[0, :9, 0] += 3.9  # within 0.1 * 40 px
    pred[0, 9:12, 0] += 4.5  # beyond
    pred[0, 12:, 2] = 0  # predicted invisible: a miss
    assert evaluate.pck(pred, true, [40.0]) == pytest.approx(9 / 18)
