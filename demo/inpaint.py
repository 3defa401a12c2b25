"""Inpaint tab: paint a mask over an uploaded image; only the masked area is denoised again."""
from __future__ import annotations

import gradio as gr

from demo.fields import Slider, example_files, open_image, safe_image, safe_image_editor
from demo.outputs import output_panel, wire_model_event
from demo.running import run_task
from demo.settings_box import common_settings, resolve_seed, unknown_words_warning, wire_restore
from demo.studio import Studio
from pipelines.settings import DEFAULT_MASK_BLUR

TAB = "inpaint"
MASK_COLOUR = "#ff00ff"  # any painted pixel counts as mask; magenta shows on every Shapes background
STRENGTH_DEFAULT = 1.0  # 1 = repaint the masked area from pure noise
MASK_BLUR_MAX = 16  # pixels
# Examples with a painted mask (assets/examples, made by scripts/make_examples.py): (mask layer, scene, prompt).
# The prompt names only what to paint; the mask says where: add in an empty area, replace an object, remove one.
EXAMPLES = (("mask_add", "scene_a", "a big green star"), ("mask_replace", "scene_d", "a yellow star"),
            ("mask_remove", "person", "at night"))
EXAMPLE_SIZE = "_256"  # file suffix of the example pictures: 4x copies, easier to paint on (inpainted at 64 px)


def build_tab(engine, *, studio: Studio | None = None) -> None:
    studio = studio or Studio()
    max_pixels = engine.limits.max_image_pixels
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            editor = safe_image_editor(
                label="Image: paint over the area to repaint",
                type="pil",
                image_mode="RGBA",
                format="png",
                sources=("upload", "clipboard"),
                transforms=(),
                height=420,
                # The editor sometimes scales a fresh upload to the canvas size; at the model's own size that
                # is harmless (the pipeline works at that size anyway).
                canvas_size=(engine.preset.default_size, engine.preset.default_size),
                brush=gr.Brush(colors=[MASK_COLOUR], color_mode="fixed", default_size=6),
                eraser=gr.Eraser(default_size=6),
                layers=gr.LayerOptions(allow_additional_layers=False, layers=["Mask"]),
                elem_id=f"{TAB}-editor",
                elem_classes=["lds-pixelated"],
                max_pixels=max_pixels,
            )
            prompt = gr.Textbox(
                value="",
                label="Prompt (what to paint in the masked area: the mask says where)",
                lines=2,
                max_length=engine.limits.max_prompt_chars,
                elem_id=f"{TAB}-prompt",
            )
            unknown_words_warning(engine, prompt)
            with gr.Row():
                strength = Slider(
                    elem_id=f"{TAB}-strength",
                    label="Strength",
                    minimum=0.05,
                    maximum=1.0,
                    step=0.05,
                    value=STRENGTH_DEFAULT,
                    info="how much of the masked area is re-noised (1 = all)",
                )
                mask_blur = Slider(
                    elem_id=f"{TAB}-mask-blur",
                    label="Mask blur (px)",
                    minimum=0,
                    maximum=MASK_BLUR_MAX,
                    step=1,
                    value=DEFAULT_MASK_BLUR,
                    info="pixels inside the mask's edge where the result fades into the picture (its colours are "
                    "first matched to the picture's along the edge)",
                )
            gr.Markdown(method_note(engine), elem_id=f"{TAB}-method")
            with gr.Accordion("Upload a mask instead of painting", open=False):
                mask_upload = safe_image(label="Mask: white = repaint, black = keep", type="pil",
                                               image_mode=None, format="png", height=200, sources=("upload",),
                                               elem_classes=["lds-pixelated"], max_pixels=max_pixels)
            settings = common_settings(engine, tab=TAB, size=False)
            rows = []
            for layer, scene, text in EXAMPLES:
                files = example_files(
                    *(f"{name}{EXAMPLE_SIZE}.png" for name in (scene, layer, f"{layer}_composite"))
                )
                if len(files) == 3:
                    rows.append([{"background": files[0], "layers": [files[1]], "composite": files[2]}, text])
            if rows:
                gr.Examples(
                    rows, inputs=[editor, prompt], label="Examples (the mask is painted; paint your own over it)"
                )
        with gr.Column(scale=3):
            panel = output_panel(TAB, studio, generate_label="Inpaint")

    def inpaint(image: dict | None, prompt: str, strength: float, mask_blur: float, mask: object,
                negative_prompt: str, seed: float, steps: float, guidance: float, scheduler: str,
                batch_size: float, request: gr.Request, progress=gr.Progress()):
        """Repaint the masked part of an image. `image` is an ImageEditor value (background + painted layers);
        `mask` (optional) is a black/white mask image used instead of the painted layers."""
        background = (image or {}).get("background") if isinstance(image, dict) else image
        if background is None:
            raise gr.Error("Upload an image to inpaint first.")
        kwargs = dict(image=open_image(background), mask=mask if mask is not None else image,
                      prompt=prompt, strength=strength, mask_blur=mask_blur, negative_prompt=negative_prompt,
                      seed=resolve_seed(engine, seed), steps=steps, guidance=guidance, scheduler=scheduler,
                      batch_size=batch_size)
        from pipelines.inpaint import inpaint as task  # imports torch: on first use, never with the UI

        yield from run_task(engine, studio, TAB, task, kwargs,
                                   request=request, progress=progress)

    wire_model_event(TAB, studio, panel, inpaint, api_name="inpaint", inputs_kwargs=dict(
        image=editor, prompt=prompt, strength=strength, mask_blur=mask_blur, mask=mask_upload, **settings.kwargs()))
    wire_restore(engine, settings, {"prompt": prompt, "strength": strength, "mask_blur": mask_blur})
    studio.register_target(TAB, editor, kind="editor")


def method_note(engine) -> str:
    """How this model applies a mask, in one line for the Inpaint and Outpaint tabs."""
    if engine.unet_in_channels == 9 or engine.preset.inpaint_model:
        return ("Inpainting U-Net: the model sees the picture around the mask, so name what to paint (or nothing, to "
                "remove what the mask covers); the mask says where.")
    return ("This model has no inpainting U-Net: the mask is applied by latent blending on "
            f"{engine.vae_scale_factor}x{engine.vae_scale_factor}-pixel cells, so say where in the prompt "
            "(\"on the left\") and expect the mask's edge to show.")
