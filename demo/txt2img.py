"""Text to image tab: a prompt in, images out (the LDM sampling loop from noise); Live mode (demo/live.py) makes
the image again as the prompt or a setting changes."""
from __future__ import annotations

import gradio as gr

from demo.live import live_key, live_toggle, wire_live, without_previews
from demo.outputs import output_panel, wire_model_event
from demo.running import run_task
from demo.settings_box import common_settings, resolve_seed, unknown_words_warning, wire_restore
from demo.studio import Studio

TAB = "txt2img"


def build_tab(engine, *, studio: Studio | None = None) -> None:
    studio = studio or Studio()
    preset = engine.preset
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            prompt = gr.Textbox(value="", label="Prompt", lines=2, max_length=engine.limits.max_prompt_chars,
                                placeholder=preset.example_prompts[0] if preset.example_prompts else "",
                                elem_id=f"{TAB}-prompt")
            unknown_words_warning(engine, prompt)
            live = live_toggle(TAB)
            settings = common_settings(engine, tab=TAB, size=True)
            if preset.example_prompts:
                gr.Examples([[p] for p in preset.example_prompts], inputs=[prompt], label="Example prompts")
        with gr.Column(scale=3):
            panel = output_panel(TAB, studio)

    def task_kwargs(prompt, negative_prompt, seed, steps, guidance, scheduler, width, height, batch_size) -> dict:
        return dict(prompt=prompt, negative_prompt=negative_prompt, seed=resolve_seed(engine, seed),
                    steps=steps, guidance=guidance, scheduler=scheduler, width=width, height=height,
                    batch_size=batch_size)

    def txt2img(prompt: str, negative_prompt: str, seed: float, steps: float, guidance: float, scheduler: str,
                width: float, height: float, batch_size: float, request: gr.Request, progress=gr.Progress()):
        """Generate images from a prompt. Returns (preview, gallery of PNG files with parameters, params, status)."""
        kwargs = task_kwargs(prompt, negative_prompt, seed, steps, guidance, scheduler, width, height, batch_size)
        from pipelines.txt2img import generate  # imports torch: on first use, never with the UI

        yield from run_task(engine, studio, TAB, generate, kwargs,
                                   request=request, progress=progress)

    def txt2img_live(prompt: str, negative_prompt: str, seed: float, steps: float, guidance: float, scheduler: str,
                     width: float, height: float, batch_size: float, request: gr.Request):
        """Generate's request (same checks, seed and recorded parameters) without live previews or progress."""
        kwargs = task_kwargs(prompt, negative_prompt, seed, steps, guidance, scheduler, width, height, batch_size)
        from pipelines.txt2img import generate

        yield from run_task(engine, studio, live_key(TAB), without_previews(generate), kwargs,
                            request=request, progress=None)

    inputs = dict(prompt=prompt, **settings.kwargs())
    wire_model_event(TAB, studio, panel, txt2img, inputs_kwargs=inputs, api_name="txt2img")
    wire_live(engine, studio, TAB, panel, live, settings.seed, inputs, txt2img_live)
    wire_restore(engine, settings, {"prompt": prompt}, api_name="restore_params")
    prompt.submit(lambda: None, None, None, js=f"() => document.getElementById('{TAB}-generate').click()",
                  api_visibility="private", queue=False)
