"""The Gradio UI of Latent Diffusion Studio: one module per tab, the pieces they share in
their own modules (fields, settings_box, outputs, running, cancelling, studio, zerogpu, common).

Each tab module has `build_tab(engine, *, studio=None) -> None`, called inside a `gr.Tab` by
`app.build_app`. Nothing here imports torch or diffusers; the task functions of pipelines/ are
imported lazily when a request runs.
"""
