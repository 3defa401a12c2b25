"""Style transfer tab: re-render an image in a named style, by img2img or structure-preserving ControlNet."""
from __future__ import annotations

import gradio as gr

from demo.common import UI_EVENT
from demo.fields import Dropdown, Radio, Slider, example_files, open_image, safe_image
from demo.outputs import output_panel, wire_model_event
from demo.running import run_task
from demo.settings_box import common_settings, resolve_seed, unknown_words_warning, wire_restore
from demo.studio import Studio

TAB = "style"
MODES = [("img2img: partial noising + style prompt", "img2img"),
         ("structure-preserving: ControlNet keeps edges/depth", "structure")]
CONTROLS = [("edges (canny)", "canny"), ("depth", "depth")]
STRENGTH_DEFAULT = 0.6  # how far the image is noised before restyling: 0 keeps it, 1 ignores it


def build_tab(engine, *, studio: Studio | None = None) -> None:
    studio = studio or Studio()
    styles = list(engine.preset.style_presets)
    controls_available = [c for c in CONTROLS if c[1] in engine.control_types]
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            image = safe_image(label="Content image", type="pil", image_mode=None, format="png",
                                     sources=("upload", "clipboard"), height=300, elem_id=f"{TAB}-image",
                                     elem_classes=["lds-pixelated"], max_pixels=engine.limits.max_image_pixels)
            with gr.Row():
                style = Dropdown(styles, value=styles[0] if styles else None, label="Style",
                                    allow_custom_value=False, elem_id=f"{TAB}-style")
                strength = Slider(
                    elem_id=f"{TAB}-strength",
                    label="Strength",
                    minimum=0.05,
                    maximum=1.0,
                    step=0.05,
                    value=STRENGTH_DEFAULT,
                    info="0 keeps the image, 1 ignores it",
                )
            prompt = gr.Textbox(value="", label="Prompt (describe the content; the style is appended)", lines=2,
                                max_length=engine.limits.max_prompt_chars, elem_id=f"{TAB}-prompt")
            unknown_words_warning(engine, prompt)
            with gr.Row():
                mode = Radio(MODES, value="img2img", label="Mode", elem_id=f"{TAB}-mode")
                control = Radio(controls_available or CONTROLS, value=(controls_available or CONTROLS)[0][1],
                                   label="Structure from", visible=False, elem_id=f"{TAB}-control")
            scale = Slider(
                elem_id=f"{TAB}-scale",
                label="ControlNet conditioning scale",
                minimum=0.0,
                maximum=2.0,
                step=0.05,
                value=1.0,
                visible=False,
            )
            if not controls_available:
                gr.Markdown("Structure-preserving mode needs a canny or depth ControlNet, which this model lacks.")
            settings = common_settings(engine, tab=TAB, size=False)
            examples = example_files("scene_a.png", "scene_d.png", "person.png")
            if examples and styles:
                rows = [[path, styles[i % len(styles)], ""] for i, path in enumerate(examples)]
                gr.Examples(rows, inputs=[image, style, prompt], label="Examples")
        with gr.Column(scale=3):
            panel = output_panel(TAB, studio, generate_label="Apply style")

    mode.change(lambda m: (gr.Radio(visible=m == "structure"), gr.Slider(visible=m == "structure")), mode,
                [control, scale], **UI_EVENT)

    def stylize(
        image: object,
        style: str,
        prompt: str,
        strength: float,
        mode: str,
        control: str,
        conditioning_scale: float,
        negative_prompt: str,
        seed: float,
        steps: float,
        guidance: float,
        scheduler: str,
        batch_size: float,
        request: gr.Request,
        progress=gr.Progress(),
    ):
        """Re-render `image` in `style` (one of the model's style presets). mode: "img2img" or "structure"
        (ControlNet `control` = "canny" or "depth" keeps the layout)."""
        if image is None:
            raise gr.Error("Upload an image to restyle first.")
        kwargs = dict(
            image=open_image(image),
            style=style,
            prompt=prompt,
            strength=strength,
            mode=mode,
            control=control,
            conditioning_scale=conditioning_scale,
            negative_prompt=negative_prompt,
            seed=resolve_seed(engine, seed),
            steps=steps,
            guidance=guidance,
            scheduler=scheduler,
            batch_size=batch_size,
        )
        from pipelines.style import stylize  # imports torch: on first use, never with the UI

        yield from run_task(engine, studio, TAB, stylize, kwargs,
                                   request=request, progress=progress)

    wire_model_event(TAB, studio, panel, stylize, api_name="style", inputs_kwargs=dict(
        image=image, style=style, prompt=prompt, strength=strength, mode=mode, control=control,
        conditioning_scale=scale, **settings.kwargs()))
    wire_restore(engine, settings, {"prompt": prompt, "style": style, "strength": strength, "mode": mode,
                                           "control": control, "conditioning_scale": scale})
    studio.register_target(TAB, image)
