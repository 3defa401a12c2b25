"""The Engine: one base LDM loaded once, task pipelines shared from it, one lock for all model work.

    engine = Engine(resolve_preset("shapes"))
    view = engine.pipeline("img2img", scheduler="DDIM")   # request-scoped: its own scheduler, same modules

Task pipelines (img2img, inpaint, ControlNet, ...) are built with `from_pipe` from the base
StableDiffusionPipeline and cached, so the U-Net, VAE and text encoder exist in memory exactly once.
Each request gets a *view*: `from_pipe(cached, scheduler=fresh_scheduler)`, a new pipeline object over
the same modules. Nothing per-request is ever assigned onto a shared pipeline.
"""
from __future__ import annotations

import copy
import functools
import logging
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from pipelines import fast_backend
from pipelines.adapters import AdapterSet, prompt_words
from pipelines.batching import RequestBatcher
from pipelines.common import InputError, ModelNotAvailable, check_choice
from pipelines.compute import EngineCompute, default_decode_threads, default_threads, model_thread
from pipelines.loading import is_local, load_errors, not_available
from pipelines.registry import CONTROL_TYPES, ModelPreset
from pipelines.schedulers import LCM_ONLY, SCHEDULERS, make_scheduler
from pipelines.settings import PREVIEW_EVERY_S, Limits, onnx_cache_dir, resolve_backend
from pipelines.world import text as world_text

logger = logging.getLogger(__name__)

TASKS = ("txt2img", "img2img", "inpaint", "controlnet", "controlnet_img2img", "controlnet_inpaint")
DTYPES = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}
DECODE_PREVIEW_MAX_LATENT = 32 * 32  # latents up to this many positions get a real (cheap) VAE decode as preview
ANNOTATOR_FILES = ("dpt_hybrid-midas-501f0c75.pt", "body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")


def _task_classes() -> dict[str, type]:
    from diffusers import (
        StableDiffusionControlNetImg2ImgPipeline,
        StableDiffusionControlNetInpaintPipeline,
        StableDiffusionControlNetPipeline,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
    )

    return {
        "txt2img": StableDiffusionPipeline,
        "img2img": StableDiffusionImg2ImgPipeline,
        "inpaint": StableDiffusionInpaintPipeline,
        "controlnet": StableDiffusionControlNetPipeline,
        "controlnet_img2img": StableDiffusionControlNetImg2ImgPipeline,
        "controlnet_inpaint": StableDiffusionControlNetInpaintPipeline,
    }


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """diffusers >= 0.36 names it `dtype` (and deprecates `torch_dtype`); older releases know only `torch_dtype`."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401  (exists since the rename)
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


class _DropEmptyFp32Warning(logging.Filter):
    """from_pipe casts modules with `.to(dtype)`; diffusers then warns "should be kept in float32: []" even
    when the list is empty. A request view is made per request, so that no-op warning would fill the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


def _quiet_from_pipe_warnings() -> None:
    target = logging.getLogger("diffusers.models.modeling_utils")
    if not any(isinstance(f, _DropEmptyFp32Warning) for f in target.filters):
        target.addFilter(_DropEmptyFp32Warning())


def pick_device(device: str | None, dtype: str | None, *, builtin: bool) -> tuple[str, torch.dtype]:
    """Auto: CUDA/MPS -> fp16 for hub models, fp32 for the small built-in model; CPU fp32; flags override."""
    if device is None:
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
        return device, DTYPES[dtype]
    # Half precision only where it pays: the built-in model is small enough that fp32 costs nothing and
    # rules out fp16 overflow in a model nobody tuned for it; CPU half is slow and poorly supported.
    if (device.startswith("cuda") or device == "mps") and not builtin:
        return device, torch.float16
    return device, torch.float32


class Engine:
    def __init__(self, preset: ModelPreset, *, device: str | None = None, dtype: str | None = None,
                 attention_slicing: bool = False, vae_tiling: bool = False, cpu_offload: bool = False,
                 threads: int | None = None, backend: str | None = None, decode_threads: int | None = None):
        self.preset = preset
        self.device, self.torch_dtype = pick_device(device, dtype, builtin=preset.is_builtin)
        self.backend = resolve_backend(backend)  # what runs U-Net steps: "eager" or "onnx" (pipelines/fast_backend.py)
        if self.backend == "onnx":  # refused before minutes of loading, not after
            fast_backend.check_supported(self.device, self.torch_dtype)
        self.lock = threading.RLock()  # serialises all model work: API, CLI and UI callers alike
        # Loads and runs the model on one OS thread, whatever thread a request arrives on: one OpenMP pool per
        # process, or every CPU op waits for a wake-up (pipelines/compute.py)
        # threads: intra-op threads of every model call (None: all usable cores but one on CPU;
        # compute.default_threads)
        self.threads = int(threads) if threads else default_threads(self.device)
        # decode_threads: the ONNX backend's VAE decode (None: `threads` when those were set, else every usable
        # core on CPU; compute.default_decode_threads)
        self.decode_threads = int(decode_threads or threads or default_decode_threads(self.device))
        self.compute = EngineCompute(model_thread(), self.threads)
        env_limits = Limits.from_env()
        max_size = min(preset.max_size, env_limits.max_size) if env_limits.max_size else preset.max_size
        self.limits = replace(env_limits, max_size=max_size)
        self.cpu_offload = cpu_offload and self.device != "cpu"
        self._task_pipes: dict[tuple[str, tuple[str, ...]], Any] = {}
        self._controlnets: dict[str, Any] = {}
        self._annotators: dict[str, Callable] = {}
        self._inpaint_unet: Any = None
        self.fast_unet: fast_backend.OnnxUNet | None = None  # backend "onnx": built below, once the weights are final
        # The VAE request views decode with, when not the base VAE itself: the preset's tiny decoder
        # (fast_backend.TinyDecoding), and with backend "onnx" the ONNX stand-in over whichever decodes
        self.fast_vae: Any = None
        self._preview_fit: tuple[torch.Tensor, torch.Tensor] | None = None
        self.preview_every_s = (
            PREVIEW_EVERY_S  # live previews at most this often (0: every step); see run.PreviewClock
        )
        self.preview_cost_s = 0.0  # what the last live preview took (PreviewClock spaces previews by it)
        self.safety = None  # the safety checker of a public deployment (pipelines/safety.py), set by the app
        self.batcher = RequestBatcher(self)  # merges queued compatible txt2img requests (limits.batch_requests)
        self.adapters = AdapterSet(self)  # fine-tuned / loaded LoRAs and U-Nets, each used by prompts with its word
        _quiet_from_pipe_warnings()

        # 1. Load the one base pipeline (U-Net, VAE, text encoder, tokenizer, scheduler config)
        self.base = self.compute.run(self._load_base)
        # 2. Memory options act on the shared modules once, at load time, never per request
        if self.preset.lora:
            # Loaded like any adapter, then folded into the U-Net weights: no per-step cost for a preset's LoRA
            self.adapters.load_source(self.preset.lora, name="preset-lora")
            self.adapters.fuse("preset-lora")
        if attention_slicing:
            self.base.enable_attention_slicing()
        if vae_tiling:
            self.base.vae.enable_tiling()
        if self.cpu_offload:
            self.base.enable_model_cpu_offload(device=self.device)
        elif cpu_offload:
            logger.warning("cpu_offload ignored: the model already runs on the CPU")
        self.base.set_progress_bar_config(disable=True)
        self._task_pipes[("txt2img", ())] = self.base
        # 3. The ONNX stand-in for the base U-Net (its weights final now: the preset's LoRA is fused), which
        # request views call instead of it; exported once per weights, later starts load the cached file
        decoding = self._tiny_decoding() or self.base.vae
        if self.backend == "onnx":
            self.fast_unet = self._build_fast_unet()
            self.fast_vae = self.compute.run(fast_backend.build_decoder, decoding, threads=self.decode_threads,
                                             cache_dir=onnx_cache_dir(), int8=self.preset.int8_decoder)
        elif decoding is not self.base.vae:
            self.fast_vae = decoding

    # --- loading -------------------------------------------------------------------------------------

    def _load_base(self):
        from diffusers import StableDiffusionPipeline

        base = self.preset.base
        if self.preset.is_builtin and not (Path(base) / "model_index.json").is_file():
            raise ModelNotAvailable(
                f"the built-in Shapes model is not at {base} yet: train it with the scripts in training/ "
                f"(`python -m training.train_ldm --help`), or start with `--model sd15`."
            )
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                base, **_dtype_kwarg(self.torch_dtype), use_safetensors=True,
                safety_checker=None, requires_safety_checker=False, feature_extractor=None,
            )
        except load_errors() as error:
            raise not_available("model", base, self.preset.name, error) from error
        if not self.cpu_offload:
            pipe = pipe.to(self.device)
        return pipe

    def _build_fast_unet(self):
        common = fast_backend.common_call(self.base.unet, self.preset.default_size // self.base.vae_scale_factor,
                                          self.base.tokenizer.model_max_length)
        return self.compute.run(fast_backend.build, self.base.unet, threads=self.threads, cache_dir=onnx_cache_dir(),
                                common=common)

    def _tiny_decoding(self):
        """The base VAE decoding through the preset's tiny decoder, or None (no fast decoder, or not loadable:
        then the VAE's own decoder decodes, and the log says why)."""
        if not self.preset.fast_decoder:
            return None
        from diffusers import AutoencoderTiny

        try:
            tiny = self._load_model(AutoencoderTiny, self.preset.fast_decoder, "fast decoder")
        except ModelNotAvailable as error:
            logger.warning("%s; images are decoded by the VAE's own decoder", error)
            return None
        return fast_backend.TinyDecoding(self.base.vae, tiny.eval())

    def _load_model(self, cls, model_id: str, what: str, **kwargs):
        try:
            model = self.compute.run(cls.from_pretrained, model_id, **_dtype_kwarg(self.torch_dtype),
                                     use_safetensors=True, **kwargs)
        except load_errors() as error:
            raise not_available(what, model_id, self.preset.name, error) from error
        # Lazily loaded models live on the device even with cpu_offload: the offload hooks were attached to
        # the base modules at load time, and re-hooking shared modules per request would mutate them.
        return model.to(self.device)

    # --- what this model can do ------------------------------------------------------------------------

    @property
    def unet_in_channels(self) -> int:
        return int(self.base.unet.config.in_channels)  # 4: plain LDM; 9: dedicated inpainting U-Net

    @property
    def vae_scale_factor(self) -> int:
        return int(self.base.vae_scale_factor)  # f: image pixels per latent position (4 for Shapes, 8 for SD)

    @property
    def size_multiple(self) -> int:
        return 8  # widths/heights are whole latents at f = 8 (and f = 4); diffusers' check_inputs wants 8

    @property
    def scheduler_names(self) -> tuple[str, ...]:
        names = tuple(n for n in self.preset.scheduler_names if n in SCHEDULERS)
        if self.preset.lora and "lcm" in self.preset.lora.lower() and "LCM" not in names:
            names = ("LCM",) + names
        return names

    def check_scheduler(self, name: str | None) -> str:
        """The scheduler a request runs with: `name`, or the preset's default when empty; refused when unknown."""
        name = name or self.preset.default_scheduler
        if name not in self.scheduler_names:
            hint = " (LCM needs an LCM model or LCM-LoRA)" if name in LCM_ONLY else ""
            raise InputError(f"scheduler={name!r} is not one of {', '.join(map(repr, self.scheduler_names))}{hint}")
        return name

    def check_control_type(self, control_type: str) -> str:
        """A ControlNet type this model has; refused with the ones it has."""
        if control_type not in self.control_types:
            raise InputError(f"control_type={control_type!r} has no ControlNet for model {self.preset.name}; "
                             f"available: {', '.join(self.control_types) or 'none'}")
        return control_type

    @property
    def control_types(self) -> tuple[str, ...]:
        if self.unet_in_channels != 4:
            return ()
        return tuple(t for t in CONTROL_TYPES if t in self.preset.controlnets)

    @property
    def tasks(self) -> tuple[str, ...]:
        if self.unet_in_channels == 9:
            return ("txt2img", "inpaint")  # txt2img runs as inpaint over a full mask
        return tuple(t for t in TASKS if not t.startswith("controlnet") or self.control_types)

    def info(self) -> dict[str, Any]:
        return {
            "model": self.preset.name,
            "base": self.preset.base,
            "builtin": self.preset.is_builtin,
            "device": self.device,
            "dtype": str(self.torch_dtype).removeprefix("torch."),
            "threads": self.threads,
            "backend": self.backend,
            "decode_threads": self.decode_threads if self.backend == "onnx" else None,
            "default_size": self.preset.default_size,
            "max_size": self.limits.max_size,
            "size_multiple": self.size_multiple,
            "default_steps": self.preset.default_steps,
            "default_guidance": self.preset.default_guidance,
            "tab_guidance": dict(self.preset.tab_guidance),
            "default_scheduler": self.preset.default_scheduler,
            "schedulers": list(self.scheduler_names),
            "controls": list(self.control_types),
            "tasks": list(self.tasks),
            "styles": dict(self.preset.style_presets),
            "unet_in_channels": self.unet_in_channels,
            "vae_scale_factor": self.vae_scale_factor,
            "vocabulary": self.vocabulary(),
            "example_prompts": list(self.preset.example_prompts),
            "limits": {k: v for k, v in vars(self.limits).items()},
        }

    def unknown_words(self, prompt: str) -> list[str]:
        switched_off = self.adapters.disabled_words() & prompt_words(prompt)  # words of adapters that are off
        return world_text.unknown_words(self.base.tokenizer, prompt or "") + sorted(switched_off)

    def vocabulary(self) -> list[str]:
        """The words a word-level tokenizer knows (the built-in model); [] for CLIP's open BPE vocabulary."""
        return world_text.vocabulary(self.base.tokenizer)

    # --- task pipelines ----------------------------------------------------------------------------------

    def pipeline(self, task: str, *, scheduler: str | None = None, controls: tuple[str, ...] = ()):
        """A request-scoped pipeline view for `task`: shared modules, its own fresh scheduler."""
        check_choice("task", task, TASKS)
        scheduler = self.check_scheduler(scheduler)
        controls = tuple(controls)
        if task.startswith("controlnet") != bool(controls):
            raise InputError(
                f"task={task!r} with controls={controls!r}: ControlNet tasks need 1 or 2 control types, others none"
            )
        with self.lock:
            cached = self._task_pipeline(task, controls)
            swaps = {"scheduler": make_scheduler(scheduler, self.base.scheduler.config)}
            if self.fast_unet is not None and cached.unet is self.base.unet:  # not the 9-channel inpainting U-Net
                swaps["unet"] = self.fast_unet  # falls back to the eager U-Net call by call
            if self.fast_vae is not None and cached.vae is self.base.vae:
                swaps["vae"] = self.fast_vae  # decode on ONNX Runtime; encode and the rest eager
            view = _view(cached, **swaps)
        view.set_progress_bar_config(disable=True)
        return view

    def _task_pipeline(self, task: str, controls: tuple[str, ...]):
        key = (task, controls)
        if key in self._task_pipes:
            return self._task_pipes[key]
        if task not in self.tasks:
            raise InputError(f"task={task!r} is not available for model {self.preset.name}; "
                             f"it supports {', '.join(self.tasks)}")
        cls = _task_classes()[task]
        extra: dict[str, Any] = {}
        if controls:
            extra["controlnet"] = self.controlnet(controls if len(controls) > 1 else controls[0])
        if task.endswith("inpaint") and self.unet_in_channels == 4:
            unet = self.inpaint_unet()
            if unet is not None:
                extra["unet"] = unet
        pipe = cls.from_pipe(self.base, **_dtype_kwarg(self.torch_dtype), **extra)
        pipe.set_progress_bar_config(disable=True)
        self._task_pipes[key] = pipe
        return pipe

    def task_unet(self, task: str, controls: tuple[str, ...] = ()):
        """The U-Net that requests of `task` run through (for inpainting: a dedicated 9-channel one, if any)."""
        with self.lock:
            return self._task_pipeline(task, tuple(controls)).unet

    def preload(self) -> None:
        """Load now what is otherwise loaded on first use: the inpainting U-Net, the ControlNets and the learned
        annotators. On ZeroGPU every call runs in a process forked from this one, and what a worker loads is gone
        when its call ends, so each call would load them again."""
        self.inpaint_unet()
        for control_type in self.control_types:
            self.controlnet(control_type)
            if control_type != "canny":  # canny is OpenCV
                try:
                    self.annotator(control_type)
                except ModelNotAvailable as error:  # the tab then asks for a ready map, as it would on first use
                    logger.warning("%s", error)

    def inpaint_unet(self):
        """The preset's dedicated 9-channel U-Net (lazy, cached), or None: inpaint then blends latents."""
        if not self.preset.inpaint_model or self.unet_in_channels != 4:
            return None
        with self.lock:
            if self._inpaint_unet is None:
                from diffusers import UNet2DConditionModel

                try:
                    self._inpaint_unet = self._load_model(UNet2DConditionModel, self.preset.inpaint_model,
                                                          "inpainting model", subfolder="unet")
                except ModelNotAvailable as error:
                    # The 4-channel latent-blending path still inpaints; say why quality may differ.
                    logger.warning("%s; inpainting falls back to latent blending with the base U-Net", error)
                    self._inpaint_unet = False
            return None if self._inpaint_unet is False else self._inpaint_unet

    def controlnet(self, control_type: str | tuple[str, ...]):
        """A ControlNetModel (lazy, cached per type), or a MultiControlNetModel for a tuple of two types."""
        if isinstance(control_type, (tuple, list)):
            types = tuple(control_type)
            if not 1 <= len(types) <= 2:
                raise InputError(f"control_types={types!r}: use one or two ControlNets at once")
            if len(types) == 1:
                return self.controlnet(types[0])
            from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

            return MultiControlNetModel([self.controlnet(t) for t in types])
        self.check_control_type(control_type)
        with self.lock:
            if control_type not in self._controlnets:
                from diffusers import ControlNetModel

                self._controlnets[control_type] = self._load_model(
                    ControlNetModel, self.preset.controlnets[control_type], f"{control_type} ControlNet")
            return self._controlnets[control_type]

    def annotator(self, control_type: str) -> Callable[..., Image.Image]:
        """image -> control map for `control_type` (lazy, cached): OpenCV canny, learned or hub depth/pose."""
        from pipelines import preprocess

        check_choice("control_type", control_type, CONTROL_TYPES)
        if control_type == "canny":
            return preprocess.canny
        with self.lock:
            if control_type not in self._annotators:
                self._annotators[control_type] = self.compute.run(self._load_annotator, control_type)
            return functools.partial(self.compute.run, self._annotators[control_type])  # runs on the model thread

    def _load_annotator(self, control_type: str) -> Callable[..., Image.Image]:
        source = self.preset.annotators
        if source is None:
            raise ModelNotAvailable(f"model {self.preset.name} has no {control_type} annotator: "
                                    f"upload a ready {control_type} map and choose preprocessor 'none'")
        if self.preset.is_builtin or is_local(source):
            return _local_annotator(Path(source), control_type)
        return _hub_annotator(source, control_type, self.preset.name, self.device)

    # --- previews ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def preview(self, latents: torch.Tensor) -> Image.Image:
        """A cheap RGB picture of the first latent in a batch: (B, 4, h, w) -> PIL at latent or image size."""
        return self.previews(latents[:1])[0]

    @torch.no_grad()
    def previews(self, latents: torch.Tensor) -> list[Image.Image]:
        """One RGB picture per latent: (B, 4, h, w) -> B PIL images at latent or image size.

        Small latents (the Shapes model's 16x16) get a real VAE decode (in one call for the batch), which
        costs about as much as a U-Net step of that model (so run_pipeline makes previews only now and then);
        large ones a linear latent->RGB map fitted to this model's VAE (see `_fit_preview`).
        """
        z = latents.detach()
        if z.shape[-1] * z.shape[-2] <= DECODE_PREVIEW_MAX_LATENT:
            vae = self.base.vae
            x = vae.decode(z.to(vae.dtype) / vae.config.scaling_factor).sample  # (B, 3, H, W) in [-1, 1]
        else:
            weight, bias = self._fit_preview()
            x = torch.einsum("bchw,cd->bdhw", z.float().cpu(), weight) + bias[None, :, None, None]  # (B, 3, h, w)
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
        return [Image.fromarray(image) for image in x]

    @torch.no_grad()
    def _fit_preview(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Least-squares fit rgb ≈ z @ W + b at latent resolution, from smooth random images through the VAE.

        Done once per engine (a handful of 64x64 encodes); published fixed factors exist for SD1.5 only,
        a fit works for any VAE, the built-in one included.
        """
        if self._preview_fit is None:
            f = self.vae_scale_factor
            g = torch.Generator().manual_seed(0)
            coarse = torch.rand(16, 3, 4, 4, generator=g) * 2 - 1  # (16, 3, 4, 4) random colour fields
            images = torch.nn.functional.interpolate(coarse, size=(8 * f, 8 * f), mode="bilinear", align_corners=False)
            vae = self.base.vae
            z = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
            small = torch.nn.functional.avg_pool2d(images, f)  # (16, 3, 8, 8): colour under each latent
            zf = z.float().cpu().permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (N, 4)
            design = torch.cat([zf, torch.ones(len(zf), 1)], dim=1)  # (N, 5)
            target = small.permute(0, 2, 3, 1).reshape(-1, 3)  # (N, 3)
            solution = torch.linalg.lstsq(design, target).solution  # (5, 3)
            self._preview_fit = (solution[:-1], solution[-1])
        return self._preview_fit

    def after_run(self) -> None:
        """Views share the base modules but not the base pipeline's offload bookkeeping: put every offloaded
        model back on the CPU after each run, as the base pipeline would itself."""
        if self.cpu_offload:
            self.base.maybe_free_model_hooks()

    def free_memory(self) -> None:
        """After a failure (e.g. out of memory): drop cached allocator blocks so the next request can run."""
        if self.device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()
        elif self.device == "mps" and hasattr(torch, "mps"):
            torch.mps.empty_cache()


def _view(pipe, **modules):
    """A request-scoped pipeline over `pipe`'s modules with its own scheduler (and any other `modules`: the
    fast backend's stand-ins).

    A shallow copy: a new pipeline object with its own attributes and config, holding the very same module
    objects; `modules` are registered on the copy only, in one call (each call rebuilds the config).
    `from_pipe(pipe, scheduler=...)` makes the same thing but first re-casts every shared module to the dtype, a
    walk over every parameter and hook on every request that costs far more than the copy (README, Performance:
    cheap request views).
    The copy leaves the model-offload bookkeeping behind, as from_pipe would: `Engine.after_run` offloads
    through the base pipeline.
    """
    view = copy.copy(pipe)
    for name in ("_all_hooks", "_offload_device", "_offload_gpu_id"):
        view.__dict__.pop(name, None)
    view.register_modules(**modules)
    return view


def _local_annotator(folder: Path, control_type: str) -> Callable[..., Image.Image]:
    """Learned Shapes-world annotators (`pipelines.world.annotators`) saved in `folder`/<control_type>."""
    from pipelines.world.annotators import load_annotator

    sub = folder / control_type
    if not sub.exists():
        raise ModelNotAvailable(
            f"the built-in {control_type} annotator is not at {sub} yet (train it with "
            f"`python -m training.train_annotators`); meanwhile upload a ready {control_type} map "
            f"and choose preprocessor 'none'")
    return load_annotator(control_type, sub)


def _hub_annotator(repo: str, control_type: str, preset_name: str, device: str) -> Callable[..., Image.Image]:
    try:
        if control_type == "depth":
            from controlnet_aux.midas import MidasDetector

            detector = MidasDetector.from_pretrained(repo)
        else:
            from controlnet_aux.open_pose import OpenposeDetector

            detector = OpenposeDetector.from_pretrained(repo)
    except load_errors() as error:
        raise not_available(f"{control_type} annotator", repo, preset_name, error) from error
    detector = detector.to(device) if hasattr(detector, "to") else detector

    def annotate(image: Image.Image, **_: Any) -> Image.Image:
        side = max(image.size)
        result = detector(image, detect_resolution=min(512, side), image_resolution=side, output_type="pil")
        return result.resize(image.size, Image.BILINEAR)

    return annotate


def download(preset: ModelPreset) -> list[str]:
    """Snapshot-download everything `preset` needs (for `python app.py --download NAME`); returns the ids."""
    from huggingface_hub import hf_hub_download, snapshot_download

    # Only the diffusers-format safetensors and configs: SD1.5 repos also hold multi-GB .ckpt, non-EMA
    # and fp16-variant files that this app never reads. The safety checker comes along: public deployments
    # use it (pipelines/safety.py).
    patterns = dict(allow_patterns=["*.json", "*.txt", "*.safetensors"],
                    ignore_patterns=["*.fp16.*", "*non_ema*", "v1-5-*", "*.ckpt", "*emaonly*"])
    fetched = []
    for model_id in [preset.base, preset.inpaint_model, preset.lora, *preset.controlnets.values()]:
        if model_id and not is_local(model_id):
            if model_id == preset.lora:
                snapshot_download(model_id, allow_patterns=["*.safetensors", "*.json"])
            else:
                snapshot_download(model_id, **patterns)
            fetched.append(model_id)
    if preset.annotators and not is_local(preset.annotators):
        for filename in ANNOTATOR_FILES:
            hf_hub_download(preset.annotators, filename)
        fetched.append(preset.annotators)
    return fetched
