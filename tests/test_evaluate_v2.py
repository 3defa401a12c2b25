"""The model-v2 evaluation: splits that refuse overlap, and measures that score ground truth right and can fail."""
import numpy as np
import pytest

from training import evaluate, evaluate_v2, shapes, splits


def test_splits_are_disjoint_and_report_prompts_seen_in_training():
    report = splits.check(200)
    validation = {e.prompt for e in splits.prompts("validation", 200)}
    test = {e.prompt for e in splits.prompts("test", 200)}
    assert len(validation) == len(test) == 200 and not validation & test
    assert all(splits.split_of(p) == "test" for p in test)
    seen = sum(splits.seen_in_training(p) for p in test)
    assert report["test"]["seen_in_training"] == seen and 0 < seen < 200
    assert splits.prompts("test", 50) == splits.prompts("test", 200)[:50]  # a short list starts a long one
    kinds = [len(e.objects) if not e.held_out_pair else 0 for e in splits.prompts("test", 200)]
    assert kinds.count(2) == 80 and kinds.count(0) == 40


def test_the_split_check_refuses_overlap(monkeypatch):
    monkeypatch.setitem(splits.FIRST_SEED, "test", splits.VALIDATION_SEED + 5)
    with pytest.raises(SystemExit, match="overlap"):
        splits.check(20)
    monkeypatch.setitem(splits.FIRST_SEED, "test", 10)
    with pytest.raises(SystemExit, match="inside the training range"):
        splits.check(20)


def test_the_old_reported_set_overlaps_training_as_the_issue_found():
    captions = splits.training_captions()
    old = evaluate.held_out_prompts(200)
    assert sum(e.prompt in captions for e in old if len(e.objects) == 1) == 35
    assert sum(e.prompt in captions for e in old if len(e.objects) == 2) == 7


@pytest.mark.parametrize("size", evaluate_v2.SIZES)
def test_horizons_one_on_renders_two_on_tiled_pictures(size):
    for seed in splits.scene_seeds("validation", 20):
        s = shapes.sample(seed, world=2, size=size)
        assert evaluate_v2.horizon_count(s.image, s.scene.background) == 1
        tiled = np.concatenate([s.image, s.image], axis=0)
        assert evaluate_v2.horizon_count(tiled, s.scene.background) >= 2
        flipped = s.image[::-1]
        assert evaluate_v2.horizon_count(flipped, s.scene.background) != 1


def test_silhouettes_match_their_own_scene_and_not_another():
    samples = evaluate_v2.split_samples("validation", 20, 2, evaluate_v2.one_object, 0)
    truth = [evaluate_v2.silhouette(s.image, s.scene.background) for s in samples]
    assert all(evaluate_v2.iou(evaluate_v2.silhouette(s.image, s.scene.background), t) == 1.0
               for s, t in zip(samples, truth))
    others = [evaluate_v2.iou(truth[(i + 1) % 20], t) for i, t in enumerate(truth)]
    assert np.mean(others) < 0.3


def test_the_checker_judges_world_2_renders_on_every_canvas():
    for size in evaluate_v2.SIZES:
        scores = evaluate_v2.checker_on_renders(2, size, 30)
        assert scores["colour"] == scores["shape"] == 1.0 and scores["binding"] == 1.0


def test_content_kept_fails_when_the_content_moves():
    contents = evaluate_v2.split_samples("validation", 10, 1, lambda s: evaluate_v2.one_object(s, person=False,
                                                                                                flat=True), 0)
    assert all(evaluate_v2.content_kept(c, c.image) for c in contents)
    moved = [evaluate_v2.content_kept(c, np.roll(c.image, 30, axis=1)) for c in contents]
    assert not any(moved)  # 30 px to the side is another column of the 3x3 grid


@pytest.mark.parametrize("world", [1, 2])
def test_content_kept_reads_the_content_in_every_style_and_refuses_another_colour_or_shape(world):
    """Style transfer's content measure on the world's own renders of held-out contents redrawn in each style: a
    striped or glowing object is the content still (the median colour of a striped red circle is pink, and a
    glow rounds the outline), while the same style in another colour or shape is not."""
    scores = evaluate_v2.styled_contents(world, 30)
    assert set(scores) == {"flat", *evaluate_v2.TRANSFER_STYLES}
    for style, score in scores.items():
        assert score["kept"] >= 0.75, (style, score)
        assert score["other_colour"] <= 0.2 and score["other_shape"] <= 0.15, (style, score)
    assert scores["flat"]["kept"] == 1.0


@pytest.mark.slow
def test_the_style_classifier_knows_every_style_on_held_out_renders():
    from training import style_classifier

    classifier = style_classifier.build(style_classifier.Setup(world=1))
    scores = style_classifier.ground_truth_accuracy(classifier, count_per_style=40)["renders"]
    assert all(scores[style] >= 0.9 for style in shapes.STYLES), scores
    # and it can answer "nothing": an empty picture has no object to call a style
    _, backgrounds, _ = style_classifier.style_renders(1, style_classifier.Setup(world=1),
                                                                 style_classifier.TEST_SEED)
    empty = np.stack([shapes.background_image(b)[0].astype(np.uint8) for b in backgrounds[:5]])
    assert classifier.classify(empty, backgrounds[:5]) == [None] * 5
