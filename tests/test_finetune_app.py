"""The Fine-tune tab through the real app: gradio_client on a live port, and a person in headless Chromium."""
from __future__ import annotations

from pathlib import Path

import pytest
from gradio_client import handle_file

from demo.finetune import EXAMPLE_SET
from tests.test_browser import browser, open_tab, page, set_number  # noqa: F401  (browser and page are fixtures)

EXAMPLES = sorted(EXAMPLE_SET.glob("*.png"))
CAPTIONS = (EXAMPLE_SET / "captions.txt").read_text()
TXT2IMG = dict(
    negative_prompt="", seed=11, steps=3, guidance=5.0, scheduler="DPM++ 2M", width=64, height=64, batch_size=1
)


def finetune_args(**overrides):
    args = dict(
        images=[handle_file(str(p)) for p in EXAMPLES],
        token="zqapi",
        captions=CAPTIONS,
        instance_prompt="in {token} style",
        method="lora",
        steps=4,
        learning_rate=0.01,
        rank=4,
        batch_size=2,
        prior_preservation=False,
        prior_weight=1.0,
        seed=0,
        name="",
        test_prompt="a big red circle in {token} style",
    )
    args.update(overrides)
    return args


def image_bytes(result) -> bytes:
    gallery = result[1]
    item = gallery[0]
    path = item["image"] if isinstance(item, dict) else item[0]
    return Path(path).read_bytes()


def draw(client, prompt):
    from PIL import Image

    result = client.predict(prompt=prompt, **TXT2IMG, api_name="/txt2img")
    with Image.open(result[1][0]["image"] if isinstance(result[1][0], dict) else result[1][0][0]) as im:
        return im.convert("RGB").tobytes()


def test_finetune_through_the_api_then_use_save_switch_and_load(client, live_app):
    word_prompt, plain_prompt = "a big blue square in zqapi style", "a big blue square"
    before, plain = draw(client, word_prompt), draw(client, plain_prompt)
    status, loss, comparison, table = client.predict(**finetune_args(), api_name="/finetune")
    try:
        assert status.startswith("Done: adapter `zqapi` trained 4 steps"), status
        assert len(comparison) == 2  # the test prompt before and after
        assert [row[:4] for row in table["data"]] == [["zqapi", "lora", "zqapi", True]]
        assert [a["name"] for a in client.predict(api_name="/adapters")] == ["zqapi"]
        after = draw(client, word_prompt)
        assert after != before and draw(client, plain_prompt) == plain

        saved, note = client.predict(adapter="zqapi", api_name="/adapter_save")
        assert saved.endswith(".safetensors") and "Saved" in note
        client.predict(adapter="zqapi", on=False, scale=1.0, api_name="/adapter_update")
        assert draw(client, word_prompt) == before  # switched off: the base model again
        client.predict(adapter="zqapi", api_name="/adapter_remove")
        table, _, note = client.predict(adapter_file=handle_file(saved), word="", api_name="/adapter_load")
        assert "prompts with `zqapi`" in note
        assert draw(client, word_prompt) == after  # the file gives back exactly the trained adapter
    finally:
        for adapter in [a["name"] for a in live_app.engine.adapters.describe()]:
            live_app.engine.adapters.remove(adapter)


@pytest.mark.parametrize("overrides, message", [
    (dict(token="red"), "'red' is a word model"),
    (dict(images=[]), "0 training images given"),
    (dict(steps=10**6), "1000000 is (above the limit|greater than maximum)"),
    (dict(captions="only one caption with zqapi"), f"1 captions for {len(EXAMPLES)} images"),
])
def test_bad_finetune_input_is_explained_and_keeps_nothing(client, live_app, overrides, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        client.predict(**finetune_args(**overrides), api_name="/finetune")
    assert live_app.engine.adapters.describe() == []


def test_a_training_file_that_is_not_an_image_is_explained(client, tmp_path, live_app):
    from gradio_client.exceptions import AppError

    bad = tmp_path / "notes.png"
    bad.write_text("not an image at all")
    with pytest.raises(AppError, match=r"training image 2 \(notes.png\) is not a readable image"):
        client.predict(
            **finetune_args(images=[handle_file(str(EXAMPLES[0])), handle_file(str(bad))]), api_name="/finetune"
        )
    assert live_app.engine.adapters.describe() == []


def test_loading_a_file_that_is_not_an_adapter_is_explained(client, tmp_path, live_app):
    from gradio_client.exceptions import AppError

    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(AppError, match="is not a readable .safetensors file"):
        client.predict(adapter_file=handle_file(str(bad)), word="", api_name="/adapter_load")
    assert live_app.engine.adapters.describe() == []


@pytest.mark.browser
def test_finetune_tab_in_the_browser(page, live_app, test_output):  # noqa: F811  (page: the imported fixture)
    try:
        open_tab(page, "Fine-tune")
        page.locator("#finetune-example").click()
        page.wait_for_function(
            f"() => document.querySelectorAll('#finetune-thumbnails img').length === {len(EXAMPLES)}"
        )
        page.locator("#finetune-token textarea, #finetune-token input").first.fill("zqweb")
        page.get_by_text("Training settings").click()
        set_number(page, "finetune-steps", 10)  # waits until the slider holds 10: training must not take the default
        page.locator("#finetune-train").click()
        page.wait_for_function(
            "() => (document.querySelector('#finetune-status')?.innerText || '').startsWith('Done')", timeout=180_000
        )
        assert "trained 10 steps" in page.locator("#finetune-status").inner_text()
        page.wait_for_function("() => document.querySelectorAll('#finetune-comparison img').length === 2")
        assert "zqweb" in page.locator("#finetune-adapters").inner_text()
        page.screenshot(path=str(test_output / "browser-finetune.png"), full_page=True)
    finally:
        for adapter in [a["name"] for a in live_app.engine.adapters.describe()]:
            live_app.engine.adapters.remove(adapter)
