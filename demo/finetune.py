"""Fine-tune tab: teach the model a style or subject from a few images (DreamBooth with LoRA or the full U-Net),
watch the loss, compare before/after, and manage adapters (switch on/off, strength, save, load LoRA files)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import gradio as gr

from demo.cancelling import session_key
from demo.common import UI_EVENT
from demo.fields import EXAMPLES_DIR, check_image_file, open_image
from demo.outputs import wire_cancellable
from demo.running import BackgroundRun, user_error
from demo.studio import CONCURRENCY_ID, Studio
from demo.zerogpu import ZERO_GPU_MAX_S, finetune_seconds, finetune_steps_within
from pipelines.common import Cancelled
from pipelines.settings import FINETUNE_METHODS, finetune_defaults

TAB = "finetune"
EXAMPLE_SET = (
    EXAMPLES_DIR / "finetune-checkered"
)  # written by `python -m training.evaluate_finetune --write-examples`
UPDATE_EVERY_S = 0.5  # loss plot and status refresh while training
ADAPTER_COLUMNS = ["name", "kind", "word", "enabled", "strength", "made from"]
INTRO = (
    "Upload 3-10 images of a style or subject, choose a new **trigger word**, and train. The result is used "
    "at once, in every tab, by prompts that contain the word (\"a red circle in zqx style\"); prompts "
    "without it are untouched, for you and for everyone else on this server. **LoRA** trains small low-rank "
    "updates of the shared U-Net; **full** trains a copy of the whole U-Net. On the built-in model a "
    "fine-tune takes about three minutes on 2 CPU cores."
)


def example_set() -> tuple[list[str], str]:
    """(image paths, captions text) of the shipped example set, or ([], "") if it is not there."""
    if not EXAMPLE_SET.is_dir():
        return [], ""
    images = sorted(str(p) for p in EXAMPLE_SET.glob("*.png"))
    captions_file = EXAMPLE_SET / "captions.txt"
    return images, captions_file.read_text() if captions_file.is_file() else ""


def adapter_rows(engine) -> list[list[Any]]:
    rows = []
    for a in engine.adapters.describe():
        made = (
            f"{a.get('method', a['kind'])}, {a['steps']} steps on {a['images']} images"
            if a.get("steps")
            else a.get("source", "")
        )
        rows.append([a["name"], a["kind"], a["token"] or "(every prompt)", a["enabled"], a["scale"], made])
    return rows


def adapter_names(engine) -> list[str]:
    return [a["name"] for a in engine.adapters.describe()]


def build_tab(engine, *, studio: Studio | None = None) -> None:
    studio = studio or Studio()
    limits = engine.limits
    example_images, example_captions = example_set()
    defaults = finetune_defaults(engine.preset.is_builtin)
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            gr.Markdown(INTRO)
            images = gr.File(
                label=f"Training images (1-{limits.max_finetune_images}; 3-10 work well)",
                file_count="multiple",
                file_types=["image"],
                type="filepath",
                elem_id=f"{TAB}-images",
            )
            if example_images:
                use_example = gr.Button(
                    f"Use the example set: {len(example_images)} shapes in a checkered style the model "
                    f"has never been told about",
                    size="sm",
                    elem_id=f"{TAB}-example",
                )
            thumbnails = gr.Gallery(label="Training images", columns=6, height=120, interactive=False,
                                    elem_classes=["lds-gallery", "lds-pixelated"], elem_id=f"{TAB}-thumbnails")
            token = gr.Textbox(value="zqx", label="Trigger word (a new word; prompts containing it use the result)",
                               max_lines=1, elem_id=f"{TAB}-token")
            captions = gr.Textbox(
                value="",
                lines=4,
                label="Captions, one per image (optional; write {token} where the word goes)",
                placeholder="a big red circle in {token} style",
                elem_id=f"{TAB}-captions",
            )
            instance_prompt = gr.Textbox(
                value=defaults.instance_prompt,
                max_lines=1,
                label="Caption for every image when the captions are empty",
                elem_id=f"{TAB}-instance",
            )
            method = gr.Radio(list(FINETUNE_METHODS), value="lora", label="Method", elem_id=f"{TAB}-method",
                              info="lora: small, combinable adapters · full: every U-Net weight (more memory, slower)")
            with gr.Accordion("Training settings", open=False):
                steps = gr.Slider(1, limits.max_finetune_steps, value=defaults.steps, step=1, label="Steps",
                                  elem_id=f"{TAB}-steps")
                learning_rate = gr.Number(value=0, label="Learning rate (0: the method's default)", minimum=0)
                rank = gr.Slider(1, 64, value=8, step=1, label="Rank of the low-rank updates")
                batch_size = gr.Slider(1, 16, value=defaults.batch_size, step=1, label="Images per step")
                prior = gr.Checkbox(value=False, label="Prior preservation (also train on what the untuned network "
                                                       "draws for the captions without the word)")
                prior_weight = gr.Slider(0, 2, value=1.0, step=0.1, label="Prior preservation weight")
                seed = gr.Number(value=0, label="Seed", precision=0, minimum=0, maximum=limits.max_seed)
                name = gr.Textbox(value="", label="Adapter name (empty: the trigger word)", max_lines=1)
            test_prompt = gr.Textbox(value="a big red circle in {token} style" if engine.preset.is_builtin
                                     else "a cat, in {token} style", max_lines=1,
                                     label="Test prompt, drawn before and after training ({token} is the word)",
                                     elem_id=f"{TAB}-test-prompt")
            with gr.Row():
                train = gr.Button("Train", variant="primary", elem_id=f"{TAB}-train", scale=3)
                cancel = gr.Button("Cancel", variant="stop", elem_id=f"{TAB}-cancel", scale=1)
        with gr.Column(scale=3):
            status = gr.Markdown("", elem_id=f"{TAB}-status")
            loss_plot = gr.LinePlot(x="step", y="loss", title="Training loss", height=220, elem_id=f"{TAB}-loss")
            comparison = gr.Gallery(label="Test prompt: before / after (same seed)", columns=2, height=260,
                                    format="png", interactive=False, elem_classes=["lds-gallery", "lds-pixelated"],
                                    elem_id=f"{TAB}-comparison")
            gr.Markdown("### Adapters on this server")
            table = gr.Dataframe(value=adapter_rows(engine), headers=ADAPTER_COLUMNS, interactive=False,
                                 elem_id=f"{TAB}-adapters")
            with gr.Row():
                chosen = gr.Dropdown(
                    adapter_names(engine), label="Adapter", allow_custom_value=True, elem_id=f"{TAB}-chosen"
                )
                enabled = gr.Checkbox(value=True, label="On", elem_id=f"{TAB}-enabled")
                strength = gr.Slider(0, 2, value=1.0, step=0.05, label="Strength")
            with gr.Row():
                apply = gr.Button("Apply", size="sm", elem_id=f"{TAB}-apply")
                remove = gr.Button("Remove", size="sm", variant="stop", elem_id=f"{TAB}-remove")
                save = gr.Button("Save as .safetensors", size="sm", elem_id=f"{TAB}-save")
            download = gr.File(label="Adapter file", interactive=False, elem_id=f"{TAB}-download")
            with gr.Accordion(
                "Load an adapter file (this app's, or a LoRA from diffusers / kohya / A1111)", open=False
            ):
                upload = gr.File(
                    label=".safetensors", file_types=[".safetensors"], type="filepath", elem_id=f"{TAB}-upload"
                )
                upload_word = gr.Textbox(
                    value="", label="Trigger word (empty: the file's own; none: every prompt)", max_lines=1
                )
                load = gr.Button("Load", size="sm", elem_id=f"{TAB}-load")
            adapters_status = gr.Markdown("", elem_id=f"{TAB}-adapters-status")

    if example_images:
        use_example.click(lambda: (example_images, example_images, example_captions.strip()), None,
                          [images, thumbnails, captions], **UI_EVENT)
    images.change(lambda files: list(files or []), images, thumbnails, **UI_EVENT)

    def train_adapter(images: list[str] | None, token: str, captions: str, instance_prompt: str, method: str,
                      steps: float, learning_rate: float, rank: float, batch_size: float, prior_preservation: bool,
                      prior_weight: float, seed: float, name: str, test_prompt: str, request: gr.Request):
        """The fine-tune itself: a GPU call on ZeroGPU (a worker process), in this process elsewhere."""
        from pipelines import finetune as ft  # imports torch: on first use, never with the UI

        for i, path in enumerate(images or []):  # unreadable files and decompression bombs, before any decoding
            check_image_file(path, limits.max_image_pixels, f"training image {i + 1} ({Path(path).name})")
        pictures = [open_image(p) for p in (images or [])]
        caption_lines = [line.strip() for line in (captions or "").splitlines() if line.strip()]
        settings = ft.FineTuneSettings(
            token=(token or "").strip(),
            method=method,
            name=(name or "").strip(),
            steps=_number(steps),
            learning_rate=_number(learning_rate, float),
            rank=_number(rank),
            batch_size=_number(batch_size),
            prior_preservation=bool(prior_preservation),
            prior_weight=_number(prior_weight, float),
            seed=_number(seed),
            instance_prompt=instance_prompt or "",
        )
        yield from _run_finetune(engine, studio, ft, pictures, settings, caption_lines, test_prompt, request)

    def seconds(arguments: dict) -> float:
        return finetune_seconds(arguments, default_steps=defaults.steps, default_batch=defaults.batch_size)

    train_gpu = studio.gpu_event(train_adapter, seconds)

    def finetune(images: list[str] | None, token: str, captions: str, instance_prompt: str, method: str, steps: float,
                 learning_rate: float, rank: float, batch_size: float, prior_preservation: bool, prior_weight: float,
                 seed: float, name: str, test_prompt: str, request: gr.Request):
        """Fine-tune on the images; prompts with the trigger word then use the result in every tab and endpoint.
        Yields (status, loss curve, before/after images, adapter table)."""
        arguments = dict(steps=steps, batch_size=batch_size)
        if studio.zero_gpu and seconds(arguments) > ZERO_GPU_MAX_S:  # ZeroGPU would refuse it, or cut it off
            fits = finetune_steps_within(ZERO_GPU_MAX_S, _number(batch_size) or defaults.batch_size)
            raise gr.Error(
                f"steps={_number(steps) or defaults.steps} would need about {seconds(arguments):.0f} s of GPU "
                f"time; a ZeroGPU call may hold the GPU at most {ZERO_GPU_MAX_S} s: use at most "
                f"{fits} steps at this batch size",
                title="Invalid input",
            )
        for status, loss, comparison, table, trained in train_gpu(
                images, token, captions, instance_prompt, method, steps, learning_rate, rank, batch_size,
                prior_preservation, prior_weight, seed, name, test_prompt, request):
            if trained is not None:  # trained in a ZeroGPU worker, which is gone when the call ends: keep it here
                _keep_trained_adapter(engine, studio, trained)
            yield status, loss, comparison, table if _is_skip(table) else adapter_rows(engine)

    event = wire_cancellable(
        studio, TAB, train, cancel, status, finetune, cancel_api_name="cancel_finetune",
        inputs=[images, token, captions, instance_prompt, method, steps, learning_rate, rank, batch_size, prior,
                prior_weight, seed, name, test_prompt],
        outputs=[status, loss_plot, comparison, table], api_name="finetune",
        concurrency_id="finetune", concurrency_limit=1, show_progress="minimal")
    event.then(lambda: gr.Dropdown(choices=adapter_names(engine), value=(adapter_names(engine) or [None])[-1]),
               None, chosen, **UI_EVENT)

    def list_adapters() -> list[dict]:
        """Every adapter on the server: name, kind, trigger word, on/off, strength and how it was made."""
        return engine.adapters.describe()

    gr.api(list_adapters, api_name="adapters")

    def update_adapter(adapter: str, on: bool, scale: float):
        """Switch an adapter on or off and set its LoRA strength (0-2)."""
        with _adapter_errors():
            _change_app_model(engine, studio, engine.adapters.set_enabled, adapter, bool(on))
            _change_app_model(engine, studio, engine.adapters.set_scale, adapter, scale)
        return adapter_rows(engine), f"`{adapter}` is {'on' if on else 'off'}, strength {float(scale):g}."

    apply.click(update_adapter, [chosen, enabled, strength], [table, adapters_status], api_name="adapter_update",
                concurrency_id=CONCURRENCY_ID)

    def remove_adapter(adapter: str):
        """Remove an adapter from the server (its word means nothing again)."""
        with _adapter_errors():
            _change_app_model(engine, studio, engine.adapters.remove, adapter)
        return adapter_rows(engine), gr.Dropdown(choices=adapter_names(engine), value=None), f"`{adapter}` removed."

    remove.click(remove_adapter, chosen, [table, chosen, adapters_status], api_name="adapter_remove",
                 concurrency_id=CONCURRENCY_ID)

    def save_adapter(adapter: str):
        """The adapter as a .safetensors file (LoRA weights in diffusers/peft names, the learned word, metadata)."""
        with _adapter_errors():
            target = (
                studio.output_dir / "adapters" / f"{engine.adapters.get(adapter).name}-{int(time.time())}.safetensors"
            )
            _on_app_model(engine, studio, engine.adapters.save, adapter, target)
        return str(target), f"Saved `{adapter}` ({target.stat().st_size / 1e6:.1f} MB)."

    save.click(save_adapter, chosen, [download, adapters_status], api_name="adapter_save",
               concurrency_id=CONCURRENCY_ID)

    def load_adapter(adapter_file: str | None, word: str):
        """Load a .safetensors adapter: this app's files, or a LoRA for this model from diffusers, kohya or A1111."""
        if not adapter_file:
            raise gr.Error("choose a .safetensors file first", title="Invalid input")
        with _adapter_errors():
            loaded = _change_app_model(engine, studio, engine.adapters.load_file, adapter_file,
                                   name=_upload_name(adapter_file, engine), token=(word or "").strip() or None)
        where = f"prompts with `{loaded.token}`" if loaded.token else "every prompt"
        return (adapter_rows(engine), gr.Dropdown(choices=adapter_names(engine), value=loaded.name),
                f"Loaded `{loaded.name}` ({loaded.kind}); it applies to {where}.")

    load.click(load_adapter, [upload, upload_word], [table, chosen, adapters_status], api_name="adapter_load",
               concurrency_id=CONCURRENCY_ID)

    def show(adapter: str | None):
        for a in engine.adapters.describe():
            if a["name"] == adapter:
                return a["enabled"], a["scale"]
        return gr.skip(), gr.skip()

    chosen.change(show, chosen, [enabled, strength], **UI_EVENT)


def _run_finetune(engine, studio: Studio, ft, pictures, settings, caption_lines, test_prompt, request):
    """Train in a worker thread; yield status, loss curve, before/after and the adapter table while it runs."""
    losses: list[tuple[int, float]] = []
    comparison: list[tuple[Any, str]] = []
    prompt = (test_prompt or "").replace("{token}", settings.token)

    def work(cancel, report):
        if prompt.strip():
            comparison.append((_test_image(engine, prompt, settings.seed), "before"))
        result = ft.finetune(engine, pictures, settings, captions=caption_lines or None,
                             on_step=lambda step, total, loss: report((step, total, loss)), cancel=cancel)
        if prompt.strip():
            comparison.append((_test_image(engine, prompt, settings.seed), "after"))
        return result

    started = time.perf_counter()
    step = total = 0
    with BackgroundRun(studio, session_key(request, TAB), work) as run:
        if run.cancelled_before_start:
            yield "Cancelled before it started.", gr.skip(), gr.skip(), gr.skip(), None
            return
        yield "Preparing: encoding the images…", gr.skip(), gr.skip(), gr.skip(), None
        for reports in run.batches(UPDATE_EVERY_S):
            if not reports:
                yield (gr.skip(),) * 4 + (None,)
                continue
            losses += [(step, loss) for step, _, loss in reports]
            step, total, loss = reports[-1]
            yield (
                f"Step {step}/{total} · loss {loss:.4f} · {time.perf_counter() - started:.0f} s",
                _loss_frame(losses),
                list(comparison) or gr.skip(),
                gr.skip(),
                None,
            )
    if isinstance(run.error, Cancelled):
        yield (f"Cancelled at step {step} of {total}; nothing was kept.", _loss_frame(losses), gr.skip(),
               adapter_rows(engine), None)
        return
    if run.error is not None:
        raise user_error(run.error)
    result = run.result
    trained = None
    if studio.in_gpu_worker():  # this process ends with the call: hand the adapter to the app's process as a file
        adapter = engine.adapters.get(result.adapter)
        path = studio.output_dir / "adapters" / f"{adapter.name}-trained-{int(time.time())}.safetensors"
        engine.adapters.save(adapter.name, path)
        trained = {"file": str(path), "name": adapter.name, "token": adapter.token}
    yield (
        f"Done: adapter `{result.adapter}` trained {result.steps_done} steps in {result.seconds:.0f} s "
        f"(final loss {result.info.get('final_loss') or 0:.4f}). "
        f"Prompts with **{result.token}** now use it in every tab.",
        _loss_frame(losses),
        list(comparison),
        adapter_rows(engine),
        trained,
    )


def _on_app_model(engine, studio: Studio, fn, *args, **kwargs):
    """`fn(*args, **kwargs)` (an adapter action) on the model the app's own process holds.

    On ZeroGPU that process is where adapters must live: a GPU worker's changes end with its call, and every
    later worker is forked from the app's process. They run on its model thread, the one thread where
    `spaces` emulates CUDA (pipelines.compute.adopt_current_thread). Elsewhere they run where they are called."""
    if studio.zero_gpu:
        return engine.compute.run(fn, *args, **kwargs)
    return fn(*args, **kwargs)


def _change_app_model(engine, studio: Studio, fn, *args, **kwargs):
    """`_on_app_model` for an action that changes adapters: ZeroGPU workers forked before it are then stale."""
    try:
        return _on_app_model(engine, studio, fn, *args, **kwargs)
    finally:
        studio.state_changed()


def _keep_trained_adapter(engine, studio: Studio, trained: dict) -> None:
    """Register in this process an adapter a ZeroGPU worker trained and saved (its file, name and word)."""
    if trained["name"] in engine.adapters:
        return
    with _adapter_errors():
        _change_app_model(engine, studio, engine.adapters.load_file, trained["file"], name=trained["name"],
                      token=trained["token"])


def _is_skip(value) -> bool:
    return isinstance(value, dict) and value.get("__type__") == "update" and len(value) == 1


def _test_image(engine, prompt: str, seed: int):
    from pipelines import txt2img  # imports torch: on first use, never with the UI

    preset = engine.preset
    return txt2img.generate(
        engine, prompt=prompt, seed=seed, steps=preset.default_steps, guidance=preset.default_guidance
    ).images[0]


def _loss_frame(losses: list[tuple[int, float]]):
    import pandas as pd

    # Every point up to 400, then a thinned curve: the plot stays light however long the run
    stride = max(1, len(losses) // 400)
    return pd.DataFrame(losses[::stride], columns=["step", "loss"])


def _number(value, kind=int):
    if value is None or value == "":
        return 0
    try:
        return kind(value)
    except (TypeError, ValueError):
        return value  # the pipeline's check names the bad value


def _upload_name(path: str, engine) -> str:
    stem = "".join(c if c.isalnum() or c in "_-." else "-" for c in Path(path).stem)[:40].strip("-.") or "adapter"
    name, i = stem, 2
    while name in engine.adapters:
        name, i = f"{stem}-{i}", i + 1
    return name


class _adapter_errors:
    """Adapter actions: a mistake the user can fix (or a broken file) becomes a gr.Error for this user only."""

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is not None and not isinstance(error, gr.Error):
            raise user_error(error) from error
        return False
