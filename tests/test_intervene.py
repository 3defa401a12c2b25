"""Explain's intervention (prompt-to-prompt word swap, attention re-weighting) and token inspector: the plain
images are txt2img's bytes, the edit changes only its own request (processors and hooks put back, even on Cancel
and errors; a concurrent request byte-identical to its solo run), the endpoints and the section in the browser."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from pipelines import explain, txt2img
from pipelines.common import Cancelled, InputError
from tests.test_explain import probes_state

SETTINGS = dict(negative_prompt="", seed=4, steps=4, guidance=4.0)
SWAP = dict(prompt="a big red circle on the left", target_prompt="a big blue circle on the left")


def shared_state(engine) -> tuple:
    """probes_state plus the hooks of the U-Net's pooled-text embedding, which a swap also uses."""
    unet = engine.base.unet
    extra = getattr(unet, "add_embedding", None)
    hooks = () if extra is None else (len(extra._forward_hooks), len(extra._forward_pre_hooks))
    return probes_state(engine), hooks


def test_swap_mapper_aligns_the_prompts(shapes_engine, sd_engine):
    tokenizer = shapes_engine.base.tokenizer
    length = tokenizer.model_max_length
    mapper = explain.swap_mapper(tokenizer, "a red circle on the left", "a blue circle on the left")
    assert torch.equal(mapper, torch.eye(length))  # one word for one word: position to position
    # CLIP spells words in pieces: a swap of one piece for three spreads its attention evenly, rows keep their mass
    clip = sd_engine.base.tokenizer
    source, target = "a cat on grass", "a tiger on grass"
    mapper = explain.swap_mapper(clip, source, target)
    src = explain._ids(clip, source)
    tgt = explain._ids(clip, target)
    assert len(tgt) > len(src)  # the tiny CLIP vocabulary spells "tiger" in more pieces than "cat"
    assert torch.allclose(mapper[:len(src)].sum(1), torch.ones(len(src)))
    assert mapper[len(src) - 1, len(tgt) - 1] == 1  # end marker to end marker
    with pytest.raises(InputError, match="adds or removes words"):
        explain.swap_mapper(tokenizer, "a red circle", "a big red circle")
    with pytest.raises(InputError, match="reads the same"):
        explain.swap_mapper(tokenizer, "a red circle", "a  red circle")


@pytest.mark.parametrize("engine_name", ["shapes_engine", "sd_engine"])
def test_swap_shows_original_plain_and_edited(request, engine_name):
    engine = request.getfixturevalue(engine_name)
    before = shared_state(engine)
    result = explain.intervene(engine, **SWAP, tau=1.0, **SETTINGS, width=64, height=64)
    assert shared_state(engine) == before
    original, plain, edited = result.images
    for image, prompt in ((original, SWAP["prompt"]), (plain, SWAP["target_prompt"])):
        alone = txt2img.generate(engine, prompt=prompt, **SETTINGS, width=64, height=64).images[0]
        assert image.tobytes() == alone.tobytes()
    assert edited.tobytes() != plain.tobytes()  # the injected attention changed the run
    assert [r.label for r in result.runs] == ["original", "plain", "edited"]
    for run in result.runs:
        assert run.attention.shape[0] == len(run.tokens) and run.attention.any()
    assert result.image_params(0)["prompt"] == SWAP["prompt"] and result.image_params(0)["task"] == "txt2img"
    params = result.image_params(2)
    assert params["task"] == "intervene" and params["source_prompt"] == SWAP["prompt"] and params["tau"] == 1.0
    assert params["injected_steps"] == SETTINGS["steps"]
    # tau 0 injects nothing
    none = explain.intervene(engine, **SWAP, tau=0.0, **SETTINGS, width=64, height=64, plain=False)
    assert none.params["injected_steps"] == 0 and len(none.images) == 1


def test_reweighting_one_word(shapes_engine):
    weighted = explain.intervene(shapes_engine, prompt=SWAP["prompt"], weights="red=0", **SETTINGS)
    assert len(weighted.images) == 2 and weighted.params["weights"] == {"red": 0.0}
    red = weighted.runs[-1].tokens.index("red")
    assert np.allclose(weighted.runs[-1].attention[red], 0)  # no attention left on the word
    assert weighted.images[1].tobytes() != weighted.images[0].tobytes()
    stronger = explain.intervene(shapes_engine, prompt=SWAP["prompt"], weights={"red": 3}, **SETTINGS, plain=False)
    assert stronger.images[0].tobytes() != weighted.images[1].tobytes()


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompt="a red circle"), "nothing to change"),
    (dict(prompt="a red circle", weights="blue=2"), "weights name 'blue', not in the prompt"),
    (dict(prompt="a red circle", weights="red=9"), "weight of 'red'=9 is above the limit of 5"),
    (dict(prompt="a red circle", weights="red"), "weights item 'red' is not word=scale"),
    (dict(prompt="a red circle", target_prompt="a blue circle", tau=1.5), "tau=1.5 is above the limit of 1"),
    (dict(prompt="a red circle", target_prompt="a red circle on grass"), "adds or removes words"),
])
def test_bad_interventions_are_named(shapes_engine, kwargs, message):
    with pytest.raises(InputError, match=message):
        explain.intervene(shapes_engine, **{**SETTINGS, **kwargs})


def test_processors_are_put_back_after_cancel_and_errors(shapes_engine):
    before = shared_state(shapes_engine)

    class CancelInTheEdit:
        steps = 0

        def is_set(self):
            return self.steps > 2 * SETTINGS["steps"]  # during the third run: the edit

    cancel = CancelInTheEdit()

    def on_step(step, total, preview=None):
        cancel.steps = step

    with pytest.raises(Cancelled):
        explain.intervene(shapes_engine, **SWAP, **SETTINGS, on_step=on_step, cancel=cancel)
    assert shared_state(shapes_engine) == before

    def failing(step, total, preview=None):
        if step > 2 * SETTINGS["steps"]:
            raise RuntimeError("the UI went away")

    with pytest.raises(RuntimeError, match="went away"):
        explain.intervene(shapes_engine, **SWAP, **SETTINGS, on_step=failing)
    assert shared_state(shapes_engine) == before


def test_an_intervention_leaves_a_concurrent_request_byte_identical(shapes_engine):
    """Requests running while edits run (in between them, whenever the lock lets them) equal their solo runs."""
    prompts = ["a small green star at the top", "a big blue square in the center", "a red heart on grass"]
    solo = [txt2img.generate(shapes_engine, prompt=p, **SETTINGS).images[0].tobytes() for p in prompts]
    crowd: list[bytes] = []
    errors: list[BaseException] = []

    def edits():
        try:
            for tau in (1.0, 0.5):
                explain.intervene(shapes_engine, **SWAP, tau=tau, weights="circle=2", **SETTINGS)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    def plain():
        try:
            for _ in range(2):
                for prompt in prompts:
                    crowd.append(txt2img.generate(shapes_engine, prompt=prompt, **SETTINGS).images[0].tobytes())
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=edits), threading.Thread(target=plain)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors, errors
    assert crowd == solo * 2


def test_token_inspector(shapes_engine, sd_engine):
    report = explain.inspect_tokens(shapes_engine, "a red zebra on the left")
    assert report["tokenizer"] == "word-level" and report["unknown"] == ["zebra"]
    assert [(t["token"], t["status"]) for t in report["tokens"]][1:3] == [("red", "kept"), ("<|unk|>", "unknown")]
    assert report["limit"] == shapes_engine.base.tokenizer.model_max_length and report["cut_text"] == ""
    long_prompt = " ".join(["red circle"] * 20)  # 40 words: past the built-in model's positions
    report = explain.inspect_tokens(shapes_engine, long_prompt)
    assert report["count"] == 40 and report["cut_text"]
    assert sum(t["status"] == "cut" for t in report["tokens"]) == 40 - report["usable"]
    assert long_prompt.endswith(report["cut_text"])
    clip = explain.inspect_tokens(sd_engine, "a photo of a cat " * 30)
    assert clip["tokenizer"] == "BPE" and clip["limit"] == sd_engine.base.tokenizer.model_max_length
    assert clip["count"] > clip["usable"] and clip["tokens"][clip["usable"]]["status"] == "cut"
    with pytest.raises(InputError, match="prompt has 1001 characters"):
        explain.inspect_tokens(shapes_engine, "a" * 1001)


# --- through the live app --------------------------------------------------------------------------------------

def intervene_args(**overrides):
    args = dict(prompt=SWAP["prompt"], target_prompt=SWAP["target_prompt"], tau=0.6, reweight="", negative_prompt="",
                seed=7, steps=3, guidance=4.0, scheduler="DPM++ 2M", width=64, height=64)
    args.update(overrides)
    return args


def test_intervene_and_tokens_endpoints(client):
    from PIL import Image

    from demo.explain import EXPLAIN_INTERVENE_OUTPUTS, EXPLAIN_TOKENS_OUTPUTS
    from pipelines.common import params_from_png

    out = dict(zip(EXPLAIN_INTERVENE_OUTPUTS, client.predict(**intervene_args(), api_name="/explain_intervene")))
    assert out["status"].startswith("Done: 3 image(s)"), out["status"]
    captions = [item["caption"] for item in out["images"]]
    assert captions[0].startswith("original") and captions[2].startswith("edited")
    with Image.open(out["images"][2]["image"]) as im:
        stored = params_from_png(im)
    assert stored["task"] == "intervene" and stored["tau"] == 0.6 and stored["seed"] == 7
    assert len(out["attention"]) == 3 * 7  # three images, seven words each
    assert out["params"]["source_prompt"] == SWAP["prompt"]
    tokens, summary = client.predict("a red zebra", api_name="/explain_tokens")
    assert len(EXPLAIN_TOKENS_OUTPUTS) == 2 and "zebra" in summary
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="nothing to change"):
        client.predict(**intervene_args(target_prompt=""), api_name="/explain_intervene")


@pytest.mark.browser
def test_intervene_in_the_browser(live_app, test_output):
    from tests.test_browser import chromium_page, open_settings, set_number

    with chromium_page(live_app.url) as page:
        page.get_by_role("tab", name="Explain").click()
        page.fill("#explain-prompt textarea", SWAP["prompt"])
        open_settings(page, "explain")
        set_number(page, "explain-steps", 4)
        set_number(page, "explain-seed", 3)
        page.fill("#explain-intervene-target textarea", SWAP["target_prompt"])
        page.locator("#explain-intervene-run").click()
        page.wait_for_function(
            "() => (document.querySelector('#explain-intervene-status')?.innerText || '').startsWith('Done')",
            timeout=180_000)
        assert page.locator("#explain-intervene-images img").count() == 3
        page.locator("#explain-tokens-button").click()
        page.locator("#explain-token-summary").get_by_text("token(s)").wait_for()
        page.screenshot(path=str(test_output / "browser-intervene.png"), full_page=True)


def test_p2p_layout_measures_on_ground_truth():
    """The evaluation's layout measures, scored on perfect swaps (ground-truth renders): a colour swap keeps its
    mask; a shape swap keeps its placement for every pair of shapes at both sizes, and loses it when the new shape
    moves by 3 px or takes the other size."""
    from training import evaluate_p2p, shapes

    render = evaluate_p2p.render_one
    item = dict(kind="colour", background="grass", new="blue")
    assert evaluate_p2p.judge(render("star", "big"), render("star", "big", "blue"), item) == dict(
        mask=True, attribute=True)
    pairs = [(a, b) for a in shapes.SHAPES for b in shapes.SHAPES if a != b]
    for size, other in (("small", "big"), ("big", "small")):
        for a, b in pairs:
            verdict = evaluate_p2p.judge(render(a, size), render(b, size), dict(
                kind="shape", background="grass", old=a, new=b))
            assert verdict["placement"] and verdict["attribute"], (a, b, size)
            moved = evaluate_p2p.judge(render(a, size), render(b, size, centre=(34.0, 33.0)), dict(
                kind="shape", background="grass", old=a, new=b))
            resized = evaluate_p2p.judge(render(a, size), render(b, other), dict(
                kind="shape", background="grass", old=a, new=b))
            assert not moved["placement"] and not resized["placement"], (a, b, size)
    note = evaluate_p2p.ground_truth_note()
    assert "placement IoU >= 0.8 in 100%" in note
    # Colour swaps: most perfect swaps keep their mask; one that cannot (white on snow) is counted as lost
    assert "colour-swap layout on ground truth (1680 perfect swaps" in note and "mask IoU >= 0.8 in 96%" in note
    white_on_snow = [evaluate_p2p.foreground(render("circle", "big", colour, background="snow"), "snow")
                     for colour in ("red", "white")]
    assert evaluate_p2p.iou(*white_on_snow) < 0.8
