"""Outpaint tab: enlarge the canvas on chosen sides and let the model paint the new border."""
from __future__ import annotations

import gradio as gr

from demo.fields import CheckboxGroup, Dropdown, Slider, example_files, open_image, safe_image
from demo.inpaint import method_note
from demo.outputs import output_panel, wire_model_event
from demo.running import run_task
from demo.settings_box import common_settings, resolve_seed, unknown_words_warning, wire_restore
from demo.studio import Studio
from pipelines.settings import OUTPAINT_FILLS

TAB = "outpaint"
SIDES = ("left", "right", "top", "bottom")


def build_tab(engine, *, studio: Studio | None = None) -> None:
    studio = studio or Studio()
    max_pixels = engine.limits.max_image_pixels
    step = 8
    max_side = max(step, min(engine.limits.max_outpaint, engine.limits.max_size) // step * step)
    default_px = max(step, engine.preset.default_size // 4 // step * step)
    fills = OUTPAINT_FILLS
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            image = safe_image(label="Image to extend", type="pil", image_mode=None, format="png",
                                     sources=("upload", "clipboard"), height=300, elem_id=f"{TAB}-image",
                                     elem_classes=["lds-pixelated"], max_pixels=max_pixels)
            prompt = gr.Textbox(
                value="",
                label="Prompt (the whole enlarged scene, or what to add in the new area)",
                lines=2,
                max_length=engine.limits.max_prompt_chars,
                elem_id=f"{TAB}-prompt",
                info="The new area continues the picture (its background, horizon and cut objects); "
                "background words in the prompt do not override what the picture shows. Objects the prompt names "
                "are often drawn again in the new area: to only continue the picture, name its background alone "
                "(\"on grass\").",
            )
            unknown_words_warning(engine, prompt)
            directions = CheckboxGroup(list(SIDES), value=["right"], label="Extend towards",
                                          elem_id=f"{TAB}-directions")
            with gr.Row():
                pixels = Slider(
                    elem_id=f"{TAB}-pixels",
                    label="Pixels to add per chosen side",
                    minimum=step,
                    maximum=max_side,
                    step=step,
                    value=default_px,
                )
                fill = Dropdown(
                    list(fills), elem_id=f"{TAB}-fill", value=fills[0], label="Fill of the new area before denoising"
                )
            gr.Markdown(method_note(engine), elem_id=f"{TAB}-method")
            settings = common_settings(engine, tab=TAB, size=False)
            examples = example_files("scene_c.png", "person.png")
            if examples:
                gr.Examples(
                    [
                        [examples[0], "a small orange circle in the top left", ["right", "bottom"]],
                        *([[examples[1], "a pink person sitting at night", ["left"]]] if len(examples) > 1 else []),
                    ],
                    inputs=[image, prompt, directions],
                    label="Examples",
                )
        with gr.Column(scale=3):
            panel = output_panel(TAB, studio, generate_label="Outpaint")

    def outpaint(image: object, prompt: str, directions: list[str], pixels: float, fill: str,
                 negative_prompt: str, seed: float, steps: float, guidance: float, scheduler: str,
                 batch_size: float, request: gr.Request, progress=gr.Progress()):
        """Extend an image by `pixels` on each side in `directions` (left/right/top/bottom); the original stays."""
        if image is None:
            raise gr.Error("Upload an image to outpaint first.")
        chosen = [d for d in (directions or []) if d in SIDES]
        unknown = [d for d in (directions or []) if d not in SIDES]
        if unknown:
            raise gr.Error(f"directions={unknown!r} are not sides; use some of {', '.join(SIDES)}.")
        if not chosen:
            raise gr.Error("Choose at least one side to extend (left, right, top or bottom).")
        amounts = {side: (pixels if side in chosen else 0) for side in SIDES}
        kwargs = dict(image=open_image(image), prompt=prompt, fill=fill, **amounts,
                      negative_prompt=negative_prompt, seed=resolve_seed(engine, seed), steps=steps,
                      guidance=guidance, scheduler=scheduler, batch_size=batch_size)
        from pipelines.outpaint import outpaint as task  # imports torch: on first use, never with the UI

        yield from run_task(engine, studio, TAB, task, kwargs,
                                   request=request, progress=progress)

    wire_model_event(TAB, studio, panel, outpaint, api_name="outpaint", inputs_kwargs=dict(
        image=image, prompt=prompt, directions=directions, pixels=pixels, fill=fill, **settings.kwargs()))
    def sides_from_params(params: dict) -> dict:
        amounts = {side: int(params.get(side) or 0) for side in SIDES}
        chosen = [side for side in SIDES if amounts[side] > 0]
        return {"directions": chosen, "pixels": max(amounts.values())} if chosen else {}

    wire_restore(engine, settings, {"prompt": prompt, "fill": fill, "directions": directions, "pixels": pixels},
                        derive=sides_from_params)
    studio.register_target(TAB, image)
