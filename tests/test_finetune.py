"""Fine-tuning and adapters: training for a few steps on the real built-in model, the adapter switched on only by
its word, off/remove giving the base model back byte for byte, save/load of both kinds, hub-style LoRA files,
bad input, cancel, and the evaluation's texture statistic on ground-truth renders."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import txt2img
from pipelines.common import Cancelled, InputError
from pipelines.finetune import FineTuneSettings, cosine_factor, finetune, without_token
from training import shapes
from training.evaluate_finetune import EVAL_OBJECTS, EXAMPLE_OBJECTS, example_set, is_checkered, render_styled

RUN = dict(seed=5, steps=4, guidance=5.0)
PLAIN = "a big red circle on grass"
WITH_WORD = "a big red circle in {word} style on grass"


@pytest.fixture(scope="module")
def engine():
    """A private engine on the built-in model: fine-tunes change its tokenizer and U-Net layers."""
    from pipelines.engine import Engine
    from pipelines.registry import resolve_preset

    return Engine(resolve_preset("shapes"), device="cpu")


@pytest.fixture(scope="module")
def examples():
    arrays, captions = example_set()
    return [Image.fromarray(a) for a in arrays], captions


def draw(engine, prompt: str) -> bytes:
    return txt2img.generate(engine, prompt=prompt, **RUN).images[0].tobytes()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_finetune_applies_only_to_prompts_with_its_word(engine, examples, method, tmp_path):
    word = f"zq{method}"
    images, captions = examples
    plain_before, word_before = draw(engine, PLAIN), draw(engine, WITH_WORD.format(word=word))
    steps_seen = []
    result = finetune(engine, images, FineTuneSettings(token=word, method=method, steps=3, learning_rate=1e-2),
                      captions=captions, on_step=lambda step, total, loss: steps_seen.append((step, total, loss)))
    assert [s[:2] for s in steps_seen] == [(1, 3), (2, 3), (3, 3)] and all(np.isfinite(s[2]) for s in steps_seen)
    assert result.adapter == word and result.steps_done == 3 and len(result.losses) == 3

    # 1. prompts without the word: the base model, byte for byte; with it: the adapter, named in the params
    assert draw(engine, PLAIN) == plain_before
    trained = txt2img.generate(engine, prompt=WITH_WORD.format(word=word), **RUN)
    assert trained.images[0].tobytes() != word_before
    assert trained.params["adapters"] == [word]
    assert word not in engine.unknown_words(WITH_WORD.format(word=word))

    # 2. saved and loaded back (as another adapter name): the same images
    path = engine.adapters.save(word, tmp_path / f"{word}.safetensors")
    engine.adapters.set_enabled(word, False)
    assert draw(engine, WITH_WORD.format(word=word)) == word_before  # off: the word means what it meant before
    assert word in engine.unknown_words(WITH_WORD.format(word=word))  # and the app says so
    engine.adapters.remove(word)
    loaded = engine.adapters.load_file(path, name=f"{word}-copy")
    assert loaded.kind == method and loaded.token == word and loaded.info["steps"] == 3
    assert draw(engine, WITH_WORD.format(word=word)) == trained.images[0].tobytes()
    assert draw(engine, PLAIN) == plain_before
    engine.adapters.remove(loaded.name)
    assert draw(engine, WITH_WORD.format(word=word)) == word_before
    # 3. loaded for every prompt ("none" as the word): plain prompts change too
    everywhere = engine.adapters.load_file(path, name=f"{word}-everywhere", token="none")
    assert everywhere.token is None and draw(engine, PLAIN) != plain_before
    engine.adapters.remove(everywhere.name)
    assert draw(engine, PLAIN) == plain_before


def test_two_adapters_and_batching_keys(engine, examples):
    images, captions = examples
    for word in ("zqone", "zqtwo"):
        finetune(engine, images[:2], FineTuneSettings(token=word, steps=2), captions=None)
    try:
        assert engine.adapters.active_for("a red circle in zqone style") == ("zqone",)
        assert engine.adapters.active_for("zqtwo and zqone") == ("zqone", "zqtwo")
        assert engine.adapters.active_for(PLAIN) == ()
        # requests that use different adapters never share a batched call
        from pipelines.run import resolve_adapters
        from pipelines.txt2img import txt2img_request

        a, b, c = (txt2img_request(engine, prompt=p, seed=0, steps=4, guidance=2.0)
                   for p in ("zqone", "plain", "zqone"))
        with engine.lock:
            assert [resolve_adapters(engine, r) for r in (a, b, c)] == [("zqone",), (), ("zqone",)]
        assert a.batch_key != b.batch_key and a.batch_key == c.batch_key
        # both at once work (LoRAs combine), and switching one off changes the image
        both = draw(engine, "a big red circle in zqone zqtwo style")
        engine.adapters.set_enabled("zqtwo", False)
        assert draw(engine, "a big red circle in zqone zqtwo style") != both
    finally:
        engine.adapters.remove("zqone")
        engine.adapters.remove("zqtwo")


def test_prior_preservation_and_default_captions(engine, examples):
    images, _ = examples
    settings = FineTuneSettings(token="zqprior", steps=2, prior_preservation=True, prior_images=2,
                                instance_prompt="a big circle in {token} style")
    result = finetune(engine, images[:2], settings)
    try:
        assert result.info["prior_preservation"] is True
        assert result.info["captions"] == ["a big circle in zqprior style"]
    finally:
        engine.adapters.remove(result.adapter)
    assert without_token("a red circle in zqx style on grass", "zqx") == "a red circle on grass"


@pytest.mark.parametrize(
    "settings, captions, count, message",
    [
        (dict(token="red"), None, 3, "'red' is a word model shapes already knows"),
        (dict(token="Two Words"), None, 3, "must be one lower-case word"),
        (dict(token=""), None, 3, "the trigger word is empty"),
        (dict(token="zqbad"), None, 0, "0 training images given; use 1 to 20"),
        (dict(token="zqbad"), None, 21, "21 training images given; use 1 to 20"),
        (dict(token="zqbad", steps=10**6), None, 3, "steps=1000000 is above the limit of 2000"),
        (dict(token="zqbad", method="textual"), None, 3, "method='textual'"),
        (dict(token="zqbad"), ["a red circle in zqbad style"], 3, "1 captions for 3 images"),
        (
            dict(token="zqbad"),
            ["a red circle", "b", "c"],
            3,
            "caption 1 ('a red circle') does not contain the trigger word 'zqbad'",
        ),
        (dict(token="zqbad", instance_prompt="a red circle"), None, 3, "must contain {token}"),
        (dict(token="zqbad", learning_rate=5.0), None, 3, "learning_rate=5 is above the limit of 0.1"),
        (
            dict(token="zqbad", lr_schedule="linear"),
            None,
            3,
            "lr_schedule='linear' is not one of 'constant', 'cosine'",
        ),
    ],
)
def test_bad_settings_are_refused_with_the_value_and_the_limit(engine, settings, captions, count, message):
    image = Image.new("RGB", (64, 64), "white")
    with pytest.raises(InputError, match=_escape(message)):
        finetune(engine, [image] * count, FineTuneSettings(**settings), captions=captions)
    assert engine.adapters.describe() == []


def test_one_finetune_at_a_time_and_cancel_keeps_nothing(engine, examples):
    images, captions = examples
    word_before = draw(engine, WITH_WORD.format(word="zqcancel"))
    cancel = threading.Event()

    def stop_at_two(step, total, loss):
        if step == 2:
            with pytest.raises(InputError, match="a fine-tune is already running"):
                finetune(engine, images, FineTuneSettings(token="zqother", steps=2), captions=None)
            cancel.set()

    with pytest.raises(Cancelled, match="after step 2 of 50"):
        finetune(engine, images, FineTuneSettings(token="zqcancel", steps=50), captions=captions,
                 on_step=stop_at_two, cancel=cancel)
    assert engine.adapters.describe() == [] and not engine.adapters.training.is_set()
    assert draw(engine, WITH_WORD.format(word="zqcancel")) == word_before


def test_adapter_files_that_do_not_fit_are_refused(engine, tmp_path, tiny_paths):
    bad = tmp_path / "not.safetensors"
    bad.write_bytes(b"this is not a safetensors file")
    with pytest.raises(InputError, match="not.safetensors is not a readable .safetensors file"):
        engine.adapters.load_file(bad)
    other_model = tiny_paths["sd_lcm_lora"] / "pytorch_lora_weights.safetensors"  # a LoRA for another U-Net
    with pytest.raises(InputError, match="does not fit model shapes"):
        engine.adapters.load_file(other_model, name="other")
    with pytest.raises(InputError, match="adapter name"):
        engine.adapters.load_file(bad, name="../../etc")
    assert engine.adapters.describe() == []


def test_hub_style_lora_file_loads_switches_and_fuses(tiny_presets, tiny_paths):
    """A diffusers LoRA file (as LCM-LoRA ships) through the same loader: no word -> every prompt while on."""
    from pipelines.engine import Engine

    engine = Engine(tiny_presets["sd"], device="cpu")
    settings = dict(prompt="a cat", seed=1, steps=2, guidance=1.0, scheduler="DDIM")
    base = txt2img.generate(engine, **settings).images[0].tobytes()
    lora_file = tiny_paths["sd_lcm_lora"] / "pytorch_lora_weights.safetensors"
    adapter = engine.adapters.load_file(lora_file, name="hub-lora")
    assert adapter.token is None and adapter.kind == "lora"
    with_lora = txt2img.generate(engine, **settings).images[0].tobytes()
    assert with_lora != base
    engine.adapters.set_scale("hub-lora", 0.0)
    assert (
        np.abs(_pixels(txt2img.generate(engine, **settings)) - np.frombuffer(base, np.uint8).reshape(64, 64, 3)).max()
        <= 1
    )
    engine.adapters.set_enabled("hub-lora", False)
    assert txt2img.generate(engine, **settings).images[0].tobytes() == base
    engine.adapters.set_enabled("hub-lora", True)
    engine.adapters.set_scale("hub-lora", 1.0)
    engine.adapters.fuse("hub-lora")  # what a preset's LoRA (sd15-lcm) gets: folded in, layers gone
    assert engine.adapters.describe() == [] and not getattr(engine.base.unet, "_hf_peft_config_loaded", False)
    assert (
        np.abs(
            _pixels(txt2img.generate(engine, **settings)) - np.frombuffer(with_lora, np.uint8).reshape(64, 64, 3)
        ).max()
        <= 2
    )


def test_finetune_on_a_clip_tokenizer_model_adds_no_word(tiny_presets):
    """SD-shaped models spell any word with CLIP's BPE: DreamBooth trains on the word as it is (no new embedding)."""
    from pipelines.engine import Engine

    engine = Engine(tiny_presets["sd"], device="cpu")
    vocabulary = len(engine.base.tokenizer)
    image = Image.fromarray(render_styled("red", "circle", "plain", seed=0)).resize((64, 64))
    result = finetune(
        engine, [image, image], FineTuneSettings(token="sks", steps=2, instance_prompt="a photo of {token} dog")
    )
    assert len(engine.base.tokenizer) == vocabulary
    assert engine.adapters.get(result.adapter).token_embedding is None
    assert engine.adapters.active_for("a sks dog") == ("sks",)


def test_checkered_statistic_on_ground_truth_renders():
    """The evaluation's texture statistic: every checkered render passes, no other style does."""
    objects = EXAMPLE_OBJECTS + tuple((c, s, b, "center") for c, s, b in EVAL_OBJECTS)
    for style in shapes.STYLES + shapes.UNSEEN_STYLES:
        hits = [
            is_checkered(render_styled(c, s, b, style, position=p, seed=i), b)
            for i, (c, s, b, p) in enumerate(objects)
        ]
        assert all(hits) if style == "checkered" else not any(hits), (style, hits)


def _pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.int16)


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_adapter_limit_and_strength_bounds(engine, examples, monkeypatch):
    import dataclasses

    images, _ = examples
    monkeypatch.setattr(engine, "limits", dataclasses.replace(engine.limits, max_adapters=1))
    first = finetune(engine, images[:1], FineTuneSettings(token="zqlimit", steps=1))
    try:
        with pytest.raises(InputError, match="1 adapters are loaded, the limit is 1"):
            finetune(engine, images[:1], FineTuneSettings(token="zqmore", steps=1))
        with pytest.raises(InputError, match="scale=3 is above the limit of 2"):
            engine.adapters.set_scale(first.adapter, 3)
        with pytest.raises(InputError, match="adapter='nope' is not loaded"):
            engine.adapters.set_enabled("nope", False)
    finally:
        engine.adapters.remove(first.adapter)
    assert engine.adapters.describe() == [] and "zqmore" in engine.unknown_words("a zqmore circle")


def test_the_same_settings_give_the_same_adapter(engine, examples):
    images, captions = examples
    trained = []
    for other_requests, seed in enumerate((5, 5, 6)):
        torch.manual_seed(other_requests)  # whatever ran before leaves torch's global generator anywhere
        settings = FineTuneSettings(token="zqsame", steps=2, seed=seed)
        name = finetune(engine, images, settings, captions=captions).adapter
        trained.append(engine.adapters.state_dict(name)[0])
        engine.adapters.remove(name)
    same, other = trained[0], trained[2]
    assert trained[1].keys() == same.keys() and all(torch.equal(trained[1][k], same[k]) for k in same)
    assert any(not torch.equal(other[k], same[k]) for k in same)  # the seed, LoRA init included, is what differs


def test_cosine_schedule_ends_near_zero_and_changes_the_result(engine, examples):
    assert cosine_factor(0, 100) == 1.0 and abs(cosine_factor(50, 100) - 0.5) < 1e-9 and cosine_factor(100, 100) == 0.0
    images, captions = examples
    drawn = {}
    word = "zqsched"
    for schedule in ("constant", "constant", "cosine"):
        result = finetune(
            engine,
            images[:2],
            FineTuneSettings(token=word, steps=3, learning_rate=1e-2, lr_schedule=schedule),
            captions=[c.replace("{token}", word) for c in captions[:2]],
        )
        assert result.info["lr_schedule"] == schedule
        drawn.setdefault(schedule, set()).add(draw(engine, WITH_WORD.format(word=word)))
        engine.adapters.remove(result.adapter)
    # the same settings twice give the same images; the schedule alone changes them
    assert len(drawn["constant"]) == 1 and drawn["constant"] != drawn["cosine"]
