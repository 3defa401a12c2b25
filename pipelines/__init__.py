"""The model side of Latent Diffusion Studio: one Engine, thin task functions, plain values in and out.

Nothing is loaded at import time and no module holds state; importing `pipelines.common`,
`pipelines.settings` or `pipelines.registry` does not import torch (UI code may use them freely).

Public API (keyword-only after `engine`; every task returns `GenerationResult(images, params, previews)`):

    registry.ModelPreset, registry.PRESETS, registry.resolve_preset(name_or_local_folder) -> ModelPreset
    registry.preset_from_folder(path, **overrides) -> ModelPreset
    settings.Limits.from_env()                      LDS_MAX_SIZE/STEPS/BATCH/PROMPT_CHARS/GUIDANCE/IMAGE_PIXELS/
                                                    UPLOAD_MB/OUTPAINT, LDS_BATCH_REQUESTS (images of queued
                                                    txt2img requests merged per call)
    engine.Engine(preset, *, device=None, dtype=None, attention_slicing=False, vae_tiling=False, cpu_offload=False)
        .pipeline(task, *, scheduler=None, controls=()) -> request-scoped diffusers pipeline view
        .controlnet(type | (type, type)), .annotator(type) -> callable(PIL, **options) -> PIL
        .lock (RLock), .limits, .preset, .device, .torch_dtype, .base (the one StableDiffusionPipeline)
        .unknown_words(prompt) -> list[str], .vocabulary() -> list[str], .info() -> dict
        .scheduler_names, .control_types, .tasks, .unet_in_channels, .vae_scale_factor
        .preview(latents) -> PIL, .previews(latents) -> [PIL], .preview_every_s, .batcher (pipelines.batching)
    engine.download(preset) -> list[str]            for `python app.py --download NAME`
    schedulers.SCHEDULERS, schedulers.make_scheduler(name, config)
    request.Request(task, settings, width, height, model_prompt=None, controls=(), inputs={}): one model call,
        decided once (request.check_settings, check_size, generators; .call_kwargs() -> diffusers arguments);
        run.run_pipeline(engine, request, *, on_step=None, cancel=None, capture=None) -> [PIL] under engine.lock
    txt2img.generate(engine, *, prompt, negative_prompt="", seed, steps, guidance, scheduler=None,
                     width=None, height=None, batch_size=1, on_step=None, cancel=None)
    inpaint.inpaint(engine, *, image, mask, prompt, negative_prompt="", seed, steps, guidance, scheduler=None,
                    strength=1.0, mask_blur=2, batch_size=1, on_step=None, cancel=None)
    outpaint.outpaint(engine, *, image, left=0, right=0, top=0, bottom=0, prompt, negative_prompt="", seed, steps,
                      guidance, scheduler=None, fill="edge", strength=1.0, batch_size=1, on_step=None, cancel=None)
        outpaint.FILLS = ("edge", "blur", "noise")
    style.stylize(engine, *, image, style="", prompt="", negative_prompt="", seed, steps, guidance, scheduler=None,
                  strength=0.6, mode="img2img"|"structure", control="canny", conditioning_scale=1.0,
                  batch_size=1, on_step=None, cancel=None)
    controlnet.preprocess(engine, *, image, control_type, preprocessor=None (= control_type; or "none"),
                          low_threshold=100, high_threshold=200) -> PIL control map at the working size
        controlnet.PREPROCESSORS = ("canny", "depth", "pose", "none")
    controlnet.generate(engine, *, control_images, control_types, prompt, negative_prompt="", seed, steps, guidance,
                        scheduler=None, conditioning_scales=1.0, guidance_start=0.0, guidance_end=1.0,
                        width=None, height=None, batch_size=1, on_step=None, cancel=None)
        (control_images / control_types / conditioning_scales: one value or a list of 1-2)
    explain.explain(engine, *, prompt, negative_prompt="", seed, steps, guidance, scheduler=None, width=None,
                    height=None, guidance_strip=(1, 2, 4, 7.5), attention=True, on_step=None, cancel=None)
        -> ExplainResult (a GenerationResult, batch 1, the image bit-identical to txt2img.generate) whose
        .explanation holds per step z_t, x̂0 (+ decoded), σ/ᾱ/t, ε̂ cond/uncond, per-token cross-attention,
        the guidance strip, FLOPs latent vs pixel, stage timings and a reproducing diffusers script
    explain.explain_inpaint(engine, *, image, mask, prompt, ..., strength=1.0, mask_blur=2) -> ExplainResult
        (inpaint.inpaint watched: the mask on the latent grid, z_t and x̂0 per step)
    explain.Probe(engine, *, cfg, attention=True, keep_tokens=None): context manager holding engine.lock that
        wraps the shared U-Net's cross-attention processors and hooks U-Net/text encoder/VAE decoder; all undone
        on exit. run.run_pipeline(engine, request, capture=fn(pipe, i, t, callback_kwargs)) sees every step's latents.
    preprocess.load_image(value, *, max_pixels=None), load_mask(value, size), fit_to_model(image, max_size,
        multiple=8, *, min_size=None), working_size(size, max_size, *, min_size=None), feather(mask, radius),
        canny(image, *, low_threshold, high_threshold)
    common: GenerationResult, InputError(ValueError), ModelError, ModelNotAvailable(ModelError), Cancelled,
            params_to_png_info(params) -> PngInfo, params_from_png(image) -> dict | None

Extensions to the contract (compatible): schedulers also include "DPM++ 2M" (non-Karras; the built-in
model's own); `ModelNotAvailable` subclasses `ModelError`, so a UI catching (InputError, ModelError,
Cancelled) shows every error; `GenerationResult.image_params(i)` gives the params that redo image i alone.

Sizes: image tasks run the model at `request.working_size(engine, size)` (the picture at most the preset's
picture_height tall, then long side within [default_size, max_size], multiples of 8) and map back:
inpaint/outpaint return the input's own size with unmasked / original pixels byte-identical; style and
ControlNet return the working size. params["width"/"height"] are the model's working size; params["image_size"]
the input's.

Built-in learned annotators (depth, pose): the engine calls `pipelines.world.annotators.load_annotator(kind, folder)`
with folder = assets/models/shapes-annotators/<kind>; it must return `callable(PIL.Image) -> PIL.Image`
(an RGB control map the size of the input). Until that exists, asking for them raises ModelNotAvailable
with a hint to upload a ready map and choose preprocessor "none".

Progress: `on_step(step, total, preview)` after every denoising step (1-based); preview is a new picture when
one is due (at most every `engine.preview_every_s` = 0.15 s and 5% of the run time; 0 = every step), else
None. Cancel: any object with `is_set()`; the run stops within one step and raises `Cancelled`.

Batching: txt2img requests waiting for the engine with the same size, steps, guidance and scheduler run as
one call (`pipelines.batching`), each image with its own seed; a merged image equals its solo run up to float
rounding of batched kernels (at most a level of 255 here and there on CPU). A request alone runs as before.
"""
