"""The safety checker of public deployments (pipelines/safety.py) with the tiny models: diffusers' own
StableDiffusionSafetyChecker class with a tiny random CLIP tower, set to flag one known image.
Nothing is downloaded."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import app as studio_app
from pipelines.common import WITHHELD_KEY, ModelNotAvailable, withheld
from tests.tiny_models import save_safety_checker, tiny_safety_checker

GENERATE = dict(prompt="a cat", negative_prompt="", steps=2, guidance=4.0, width=64, height=64)


def embedding(checker, processor, image: Image.Image) -> torch.Tensor:
    with torch.no_grad():
        pooled = checker.vision_model(processor([image], return_tensors="pt").pixel_values)[1]
        return torch.nn.functional.normalize(checker.visual_projection(pooled)[0], dim=0)


def flagging(known: Image.Image, other: Image.Image):
    """A tiny checker whose first concept is `known`'s own embedding, with a threshold between the cosine of
    `other` and 1: `known` is flagged, `other` is not."""
    checker, processor = tiny_safety_checker()
    target, near = embedding(checker, processor, known), embedding(checker, processor, other)
    cosine = float(target @ near)
    assert cosine < 0.999, "the two test images look the same to the tiny CLIP"
    with torch.no_grad():
        checker.concept_embeds[0] = target
        checker.concept_embeds_weights[0] = (1 + cosine) / 2
    return checker, processor


def noise(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def sd_with_checker(tiny_paths, tmp_path_factory):
    """The tiny SD folder plus a safety checker that flags everything (every concept within reach)."""
    folder = tmp_path_factory.mktemp("sd-checked") / "sd"
    shutil.copytree(tiny_paths["sd"], folder)
    checker, processor = tiny_safety_checker()
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-2.0)  # cosine - (-2) > 0 for any image
    save_safety_checker(checker, processor, folder)
    return folder


def test_flags_the_known_image_and_not_another(tmp_path):
    from pipelines.safety import SafetyChecker

    known, other = noise(1), Image.new("RGB", (64, 64), (30, 140, 60))
    checker, processor = flagging(known, other)
    screen = SafetyChecker(checker, processor, "cpu", torch.float32)
    assert screen.flags([known, other]) == [True, False]
    out = screen.screen([known, other])
    assert withheld(out) == 1 and out[0].info[WITHHELD_KEY] and out[0].size == known.size
    assert out[1] is other  # an image the checker passes is returned untouched


def test_a_public_sd_deployment_replaces_flagged_images_with_a_notice_and_says_so(sd_with_checker, tmp_path):
    from demo.running import run_task
    from demo.studio import Studio
    from pipelines import txt2img

    engine = studio_app.build_engine(str(sd_with_checker), device="cpu", safety_checker=True)
    assert engine.safety is not None
    result = txt2img.generate(engine, seed=1, batch_size=2, **GENERATE)
    assert len(result.images) == 2 and withheld(result.images) == 2  # nothing dropped: two notices
    assert len({im.tobytes() for im in result.images}) == 1  # the notice, not the pictures
    updates = list(run_task(engine, Studio(output_dir=tmp_path), "txt2img", txt2img.generate,
                            dict(GENERATE, seed=1), request=None, progress=None))
    status = updates[-1][3]
    assert "1 of 1 image(s) withheld by the safety checker" in status, status

    unchecked = studio_app.build_engine(str(sd_with_checker), device="cpu", safety_checker=False)
    plain = txt2img.generate(unchecked, seed=1, batch_size=2, **GENERATE)
    assert withheld(plain.images) == 0 and plain.images[0].tobytes() != result.images[0].tobytes()


def test_the_built_in_model_needs_no_checker():
    engine = studio_app.build_engine("shapes", device="cpu", safety_checker=True)
    assert getattr(engine, "safety", None) is None


def test_a_missing_checker_stops_a_public_start_and_names_the_way_out(tiny_paths):
    with pytest.raises(ModelNotAvailable, match="--no-safety-checker"):
        studio_app.build_engine(str(tiny_paths["sd"]), device="cpu", safety_checker=True)


def test_on_by_default_when_public_and_switchable():
    settings = studio_app.AppSettings
    wanted = studio_app.safety_checker_wanted
    assert not wanted(None, settings(), {})  # local: off
    assert wanted(None, settings(host="0.0.0.0"), {})  # a non-loopback host
    assert wanted(None, settings(share=True), {})  # a share link
    assert wanted(None, settings(), {"SPACE_ID": "someone/space"})  # a Space
    assert not wanted(False, settings(share=True), {})  # --no-safety-checker
    assert wanted(True, settings(), {})  # --safety-checker
    assert not wanted(None, settings(), {"SPACE_ID": "a/b", "LDS_SAFETY_CHECKER": "0"})
    assert wanted(None, settings(), {"LDS_SAFETY_CHECKER": "on"})
    with pytest.raises(SystemExit, match="LDS_SAFETY_CHECKER='maybe'"):
        wanted(None, settings(), {"LDS_SAFETY_CHECKER": "maybe"})
    args = studio_app.parse_args(["--no-safety-checker"])
    assert args.safety_checker is False
    assert studio_app.parse_args([]).safety_checker is None
