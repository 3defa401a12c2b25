"""The model side of Latent Diffusion Studio: one Engine, thin task functions, plain values in and out.

Nothing is loaded at import time and no module holds state; importing `pipelines.common`,
`pipelines.settings` or `pipelines.registry` does not import torch (UI code may use them freely).

Public API (keyword-only after `engine`; every task returns `GenerationResult(images, params, previews)`):

    registry.ModelPreset, registry.PRESETS, registry.resolve_preset(name_or_local_folder) -> ModelPreset
    registry.preset_from_folder(path, **overrides) -> ModelPreset
    settings.Limits.from_env()                      LDS_MAX_SIZE/STEPS/BATCH/PROMPT_CHARS/GUIDANCE/IMAGE_PIXELS/UPLOAD_MB/OUTPAINT
    engine.Engine(preset, *, device=None, dtype=None, attention_slicing=False, vae_tiling=False, cpu_offload=False)
        .pipeline(task, *, scheduler=None, controls=()) -> request-scoped diffusers pipeline view
        .controlnet(type | (type, type)), .annotator(type) -> callable(PIL, **options) -> PIL
        .lock (RLock), .limits, .preset, .device, .torch_dtype, .base (the one StableDiffusionPipeline)
        .unknown_words(prompt) -> list[str], .vocabulary() -> list[str], .info() -> dict
        .scheduler_names, .control_types, .tasks, .unet_in_channels, .vae_scale_factor
        .preview(latents) -> PIL
    engine.download(preset) -> list[str]            for `python app.py --download NAME`
    schedulers.SCHEDULERS, schedulers.make_scheduler(name, config)
    txt2img.generate(engine, *, prompt, negative_prompt="", seed, steps, guidance, scheduler=None,
                     width=None, height=None, batch_size=1, on_step=None, cancel=None)
    common: GenerationResult, InputError(ValueError), ModelError, ModelNotAvailable(ModelError), Cancelled,
            params_to_png_info(params) -> PngInfo, params_from_png(image) -> dict | None

Extensions to the contract (compatible): schedulers also include "DPM++ 2M" (non-Karras; the built-in
model's own); `ModelNotAvailable` subclasses `ModelError`, so a UI catching (InputError, ModelError,
Cancelled) shows every error; `GenerationResult.image_params(i)` gives the params that redo image i alone.

Progress: `on_step(step, total, preview)` after every denoising step (1-based). Cancel: any object with
`is_set()`; the run stops within one step and raises `Cancelled`.
"""
