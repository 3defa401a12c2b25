"""ControlNet tab: a control map (edges, depth or pose) steers generation through a trainable U-Net copy.

Pick a control type and a preprocessor (or "none" to upload a ready map), check the map with Preview,
then generate. A second ControlNet can be stacked (MultiControlNet).
"""
from __future__ import annotations

import gradio as gr

from demo.common import UI_EVENT
from demo.fields import Dropdown, Slider, example_files, open_image, safe_image
from demo.outputs import output_panel, wire_model_event
from demo.running import run_task, user_error
from demo.settings_box import common_settings, resolve_seed, unknown_words_warning, wire_restore
from demo.studio import Studio
from pipelines.registry import NO_PREPROCESSOR as NONE

TAB = "controlnet"
CONTROL_LABELS = {"canny": "edge (canny)", "depth": "depth", "pose": "pose"}
CANNY_LOW, CANNY_HIGH = 100, 200  # OpenCV thresholds, ControlNet v1.1's defaults


PREPROCESSOR_LABELS = {"canny": "canny edges (OpenCV)", "depth": "depth estimator", "pose": "pose detector",
                       NONE: "none: the image is a ready map"}


def preprocessors(control_type: str) -> list[tuple[str, str]]:
    """(label, name) choices for a control type: its own detector, then "none" (upload a ready map)."""
    return [(PREPROCESSOR_LABELS[n], n) for n in (control_type, NONE)]


def _control_picker(engine, suffix: str = "", *, label: str = "Control type"):
    types = list(engine.control_types) or list(CONTROL_LABELS)
    first = types[0]
    with gr.Row():
        control_type = Dropdown([(CONTROL_LABELS.get(t, t), t) for t in types], value=first, label=label,
                                   elem_id=f"{TAB}-type{suffix}")
        preprocessor = Dropdown(preprocessors(first), value=preprocessors(first)[0][1], label="Preprocessor",
                                   allow_custom_value=True,  # choices follow the control type; the pipeline validates
                                   elem_id=f"{TAB}-preprocessor{suffix}")
    control_type.change(lambda t: gr.Dropdown(choices=preprocessors(t), value=preprocessors(t)[0][1]),
                        control_type, preprocessor, **UI_EVENT)
    return control_type, preprocessor


def build_tab(engine, *, studio: Studio | None = None) -> None:
    studio = studio or Studio()
    max_pixels = engine.limits.max_image_pixels
    if not engine.control_types:
        gr.Markdown("⚠ This model has no ControlNets loaded yet; Preview still works for edges.")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            with gr.Row():
                image = safe_image(label="Input image (or a ready control map with preprocessor 'none')",
                                         type="pil", image_mode=None, format="png", sources=("upload", "clipboard"),
                                         height=260, elem_id=f"{TAB}-image", elem_classes=["lds-pixelated"],
                                         max_pixels=max_pixels)
                control_map = gr.Image(label="Control map", type="pil", format="png", interactive=False, height=260,
                                       elem_id=f"{TAB}-map", elem_classes=["lds-pixelated"])
            control_type, preprocessor = _control_picker(engine)
            with gr.Row():
                low = Slider(
                    elem_id=f"{TAB}-low", label="Canny low threshold", minimum=1, maximum=255, step=1, value=CANNY_LOW
                )
                high = Slider(
                    elem_id=f"{TAB}-high",
                    label="Canny high threshold",
                    minimum=1,
                    maximum=255,
                    step=1,
                    value=CANNY_HIGH,
                )
            preview = gr.Button("Preview control map", elem_id=f"{TAB}-preview-map")
            prompt = gr.Textbox(value="", label="Prompt", lines=2, max_length=engine.limits.max_prompt_chars,
                                elem_id=f"{TAB}-prompt")
            unknown_words_warning(engine, prompt)
            with gr.Row():
                scale = Slider(
                    elem_id=f"{TAB}-scale", label="Conditioning scale", minimum=0.0, maximum=2.0, step=0.05, value=1.0
                )
                start = Slider(
                    elem_id=f"{TAB}-start", label="Guidance start", minimum=0.0, maximum=1.0, step=0.05, value=0.0
                )
                end = Slider(
                    elem_id=f"{TAB}-end", label="Guidance end", minimum=0.0, maximum=1.0, step=0.05, value=1.0
                )
            with gr.Accordion("Second ControlNet (optional)", open=False):
                use_second = gr.Checkbox(label="Use a second ControlNet", value=False, elem_id=f"{TAB}-use-second")
                image_2 = safe_image(label="Second input (empty = use the first image)", type="pil",
                                           image_mode=None, format="png", sources=("upload", "clipboard"), height=200,
                                           elem_classes=["lds-pixelated"], max_pixels=max_pixels)
                control_type_2, preprocessor_2 = _control_picker(engine, "-2", label="Second control type")
                scale_2 = Slider(
                    label="Second conditioning scale", minimum=0.0, maximum=2.0, step=0.05, value=0.5
                )
            settings = common_settings(engine, tab=TAB, size=False)
            examples = example_files("scene_a.png", "person.png", "control_pose.png", "control_canny.png")
            if len(examples) == 4:
                # The prompts leave the form and the pose to the map ("shape", no pose word), as the ControlNets
                # were trained: what is drawn comes from the control, the colour and background from the prompt
                gr.Examples([[examples[0], "canny", "canny", "a green shape at the top"],
                             [examples[1], "pose", "pose", "a blue person on sand"],
                             [examples[2], "pose", NONE, "a blue person on grass"],
                             [examples[3], "canny", NONE, "a yellow shape at the top"]],
                            inputs=[image, control_type, preprocessor, prompt], label="Examples")
        with gr.Column(scale=3):
            panel = output_panel(TAB, studio)

    control_type.change(lambda t: [gr.Slider(visible=t == "canny")] * 2, control_type, [low, high], **UI_EVENT)

    def make_map(image, control_type, preprocessor, low_threshold, high_threshold):
        if image is None:
            raise gr.Error("Upload an image first (or a ready control map with preprocessor 'none').")
        image = open_image(image)
        from pipelines.controlnet import preprocess  # imports torch: on first use, never with the UI

        try:
            return preprocess(
                engine, image=image, control_type=control_type, preprocessor=preprocessor,
                low_threshold=low_threshold, high_threshold=high_threshold)
        except Exception as error:
            raise user_error(error) from None

    def preprocess(image: object, control_type: str, preprocessor: str, low_threshold: float,
                   high_threshold: float):
        """The control map a preprocessor makes from `image` (canny edges, depth or pose skeleton)."""
        return make_map(image, control_type, preprocessor, low_threshold, high_threshold)

    preview.click(studio.gpu_event(preprocess), inputs_kwargs=dict(
        image=image, control_type=control_type, preprocessor=preprocessor, low_threshold=low,
        high_threshold=high), outputs=control_map, api_name="preprocess", **studio.model_event())

    def controlnet(image: object, control_type: str, preprocessor: str, low_threshold: float,
                   high_threshold: float, conditioning_scale: float, guidance_start: float, guidance_end: float,
                   use_second: bool, image_2: object, control_type_2: str, preprocessor_2: str,
                   conditioning_scale_2: float, prompt: str, negative_prompt: str, seed: float, steps: float,
                   guidance: float, scheduler: str, batch_size: float, request: gr.Request,
                   progress=gr.Progress()):
        """Generate with one or two ControlNets. Each input is turned into a control map by its preprocessor
        ("none" = the image already is the map); the output has the control map's size."""
        if image is None:
            raise gr.Error("Upload an image or a control map first.")
        units = [(image, control_type, preprocessor, conditioning_scale)]
        if use_second:
            units.append((image_2 if image_2 is not None else image, control_type_2, preprocessor_2,
                          conditioning_scale_2))

        def run(engine, *, on_step=None, cancel=None, **kwargs):
            maps = [make_map(img, ctype, prep, low_threshold, high_threshold) for img, ctype, prep, _ in units]
            from pipelines.controlnet import generate  # imports torch: on first use, never with the UI

            return generate(
                engine, control_images=maps, control_types=[u[1] for u in units],
                conditioning_scales=[u[3] for u in units], on_step=on_step, cancel=cancel, **kwargs)

        kwargs = dict(guidance_start=guidance_start, guidance_end=guidance_end, prompt=prompt,
                      negative_prompt=negative_prompt, seed=resolve_seed(engine, seed), steps=steps,
                      guidance=guidance, scheduler=scheduler, batch_size=batch_size)
        yield from run_task(engine, studio, TAB, run, kwargs, request=request, progress=progress)

    wire_model_event(TAB, studio, panel, controlnet, api_name="controlnet", inputs_kwargs=dict(
        image=image, control_type=control_type, preprocessor=preprocessor, low_threshold=low, high_threshold=high,
        conditioning_scale=scale, guidance_start=start, guidance_end=end, use_second=use_second, image_2=image_2,
        control_type_2=control_type_2, preprocessor_2=preprocessor_2, conditioning_scale_2=scale_2, prompt=prompt,
        **settings.kwargs()))
    wire_restore(engine, settings, {"prompt": prompt, "guidance_start": start, "guidance_end": end})
    studio.register_target(TAB, image)
