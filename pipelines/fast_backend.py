"""The U-Net's denoising steps through ONNX Runtime on the CPU (`--backend onnx` / `LDS_BACKEND=onnx`).

    fast = build(engine.base.unet, threads=engine.threads, cache_dir=settings.onnx_cache_dir())
    view.register_modules(unet=fast)        # what Engine.pipeline does for a view over the base U-Net

Why: a step of the built-in model is hundreds of small ops on 16x16 latents, where PyTorch's per-op overhead, not
arithmetic, is the cost; ONNX Runtime runs the same graph with far less of it (README, Performance: Fast backend).

The base U-Net is exported once with the TorchScript exporter (seconds for the built-in model, no compiler) into
a cache folder keyed by a hash of its weights and config, the torch version and the opset, and later starts only
load it. `OnnxUNet` stands in for the U-Net in a request's pipeline view: same call, same `.config`, `.dtype`,
`.device`, everything else read from the eager U-Net. It runs a call through ONNX Runtime only when the call is
exactly what the export covers: the plain (sample, timestep, encoder_hidden_states) of the base weights (and the
guidance embedding `timestep_cond` of a distilled LCM U-Net, which its export takes as a fourth input), with no
hook, no changed attention processor and no active LoRA layer on the eager U-Net. Everything else runs the eager
U-Net itself, unchanged: Explain's probes and attention maps, prompt-to-prompt's processors, LoRA and full
fine-tune adapters, ControlNet residuals, any extra keyword, latent sizes the export does not cover, other
dtypes and devices. The 9-channel inpainting U-Net is never wrapped (Engine.pipeline wraps the base U-Net only).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# ONNX opset of the export: 17 has LayerNormalization and the ops diffusers' attention decomposes into, and every
# onnxruntime release this app accepts (requirements.txt) runs it. Part of the cache key.
OPSET = 17
ONNX_FILE = "unet.onnx"
INPUTS = ("sample", "timestep", "encoder_hidden_states")
# A distilled (LCM) U-Net also takes the guidance scale's embedding (`time_cond_proj_dim`): its export has a fourth
# input, and a call without it runs eager
COND_INPUT = "timestep_cond"
# The exports' free dimensions (dynamic axes), in the order OnnxUNet compares a call's shape with its common call
BATCH, HEIGHT, WIDTH, TOKENS = FREE_DIMS = ("batch", "height", "width", "tokens")
EXAMPLE_TOKENS = 77  # the text length of the traced example; the exported graph takes any length
# Keyword arguments the wrapper passes over when they hold nothing (the pipelines pass them as None); any other
# value of any keyword sends the call to the eager U-Net.
EMPTY_OK = ("timestep_cond", "cross_attention_kwargs", "added_cond_kwargs", "class_labels", "attention_mask",
            "encoder_attention_mask", "down_block_additional_residuals", "mid_block_additional_residual",
            "down_intrablock_additional_residuals")


def check_supported(device: str, dtype: torch.dtype) -> None:
    """The ONNX backend runs fp32 on the CPU (its provider here); say so instead of silently running eager."""
    if str(device) != "cpu" or dtype != torch.float32:
        raise ValueError(f"backend 'onnx' runs the U-Net on the CPU in fp32; this engine runs on {device} in "
                         f"{str(dtype).removeprefix('torch.')}: use backend 'eager' (--backend / LDS_BACKEND)")


# --- the cached export ---------------------------------------------------------------------------------------

def weights_key(unet: torch.nn.Module) -> str:
    """A hash of the U-Net's weights and config: the exported graph holds the weights, so other weights (another
    model, a fused LoRA) need another file."""
    digest = hashlib.sha256()
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(unet.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes: any dtype
    return digest.hexdigest()[:20]


def cache_folder(model: torch.nn.Module, cache_dir: Path, kind: str = "unet") -> Path:
    """Where this model's export lives: weights, torch version (the exporter) and opset each change the file."""
    torch_version = torch.__version__.replace("+", "_")
    return Path(cache_dir) / f"{kind}-{weights_key(model)}-torch{torch_version}-opset{OPSET}"


class _Traced(torch.nn.Module):
    """The U-Net's plain call with the output tensor alone, which is what the exporter traces."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, timestep_cond=timestep_cond,
                         return_dict=False)[0]


def cond_dim(unet: torch.nn.Module) -> int | None:
    """Width of the guidance embedding a distilled U-Net takes (`timestep_cond`), or None for a plain U-Net."""
    value = unet.config.get("time_cond_proj_dim") if hasattr(unet.config, "get") else None
    return int(value) if value else None


def export(unet: torch.nn.Module, path: Path) -> None:
    """Write the U-Net as ONNX to `path`: batch, text length and latent height/width are dynamic axes."""
    config = unet.config
    size = int(config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0])
    sample = torch.randn(2, int(config.in_channels), size, size)  # batch 2: a CFG step
    timestep = torch.full((2,), 500.0)  # float: the graph takes every scheduler's timesteps (int or float)
    hidden = torch.randn(2, EXAMPLE_TOKENS, int(config.cross_attention_dim))
    axes = {"sample": {0: BATCH, 2: HEIGHT, 3: WIDTH}, "timestep": {0: BATCH},
            "encoder_hidden_states": {0: BATCH, 1: TOKENS}, "noise_pred": {0: BATCH, 2: HEIGHT, 3: WIDTH}}
    inputs, names = (sample, timestep, hidden), list(INPUTS)
    if cond_dim(unet):
        inputs, names = (*inputs, torch.randn(2, cond_dim(unet))), [*names, COND_INPUT]
        axes[COND_INPUT] = {0: BATCH}
    was_training = unet.training
    unet.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python branches: shapes() below guards them
            torch.onnx.export(_Traced(unet), inputs, str(path), dynamo=False,
                              opset_version=OPSET, input_names=names, output_names=["noise_pred"],
                              dynamic_axes=axes, do_constant_folding=True)
    finally:
        unet.train(was_training)


class _Decoder(torch.nn.Module):
    """The VAE's decode (scaled latents -> image in [-1, 1]) with the output tensor alone, for the exporter."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


def export_decoder(vae: torch.nn.Module, path: Path) -> None:
    """Write the VAE decoder as ONNX to `path`: batch and latent height/width are dynamic axes."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = max(1, int(vae.config.sample_size) // factor)
    latents = torch.randn(1, int(vae.config.latent_channels), size, size)
    axes = {"latents": {0: BATCH, 2: HEIGHT, 3: WIDTH}, "image": {0: BATCH, 2: HEIGHT, 3: WIDTH}}
    was_training = vae.training
    vae.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_Decoder(vae), (latents,), str(path), dynamo=False, opset_version=OPSET,
                              input_names=["latents"], output_names=["image"], dynamic_axes=axes,
                              do_constant_folding=True)
    finally:
        vae.train(was_training)


# Latents the int8 decoder's activation ranges are calibrated on: what a U-Net is trained to end on, unit Gaussian
# scaled latents (divided by the VAE's scaling_factor, as the pipelines decode them). Drawn from a fixed seed, so
# an export is the same on every machine; on the built-in VAE they scored as the decoded pictures of held-out
# scenes did (README, Fast backend).
CALIBRATION_LATENTS = 16
CALIBRATION_SEED = 0


def calibration_latents(vae: torch.nn.Module) -> torch.Tensor:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = max(1, int(vae.config.sample_size) // factor)
    generator = torch.Generator().manual_seed(CALIBRATION_SEED)
    shape = (CALIBRATION_LATENTS, int(vae.config.latent_channels), size, size)
    return torch.randn(shape, generator=generator) / float(vae.config.scaling_factor)


def export_decoder_int8(vae: torch.nn.Module, path: Path) -> None:
    """The VAE decoder as ONNX with int8 convolutions (ONNX Runtime's static quantization: weights per output
    channel, activations per tensor, ranges calibrated on `calibration_latents`). Why: the decoder's full-resolution
    convolutions are most of a distilled 4-step image, and int8 kernels run them in about a third of the time."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    float_path, prepared = path.with_name("float.onnx"), path.with_name("prepared.onnx")
    export_decoder(vae, float_path)
    quant_pre_process(str(float_path), str(prepared))  # shapes inferred and graph folded: what quantize expects

    class Latents(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter({"latents": z[None].numpy()} for z in calibration_latents(vae))

        def get_next(self):
            return next(self.feeds, None)

    # reduce_range: 7-bit weights, so that x86 CPUs without VNNI (AVX2 only) do not saturate the u8 x s8 products
    # (onnxruntime's quantization notes); with 8-bit weights such a CPU decoded at 18.6 dB PSNR
    quantize_static(str(prepared), str(path), Latents(), quant_format=QuantFormat.QOperator, per_channel=True,
                    reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["Conv"])
    float_path.unlink()
    prepared.unlink()


# cache-folder prefix -> what writes its .onnx. The int8 decoder's "w7": its 7-bit weights (reduce_range), so that a
# cache written with 8-bit weights, which saturate on CPUs without VNNI, is never loaded again
INT8_DECODER = "vae-decoder-int8w7"
EXPORTERS = {"unet": export, "vae-decoder": export_decoder, INT8_DECODER: export_decoder_int8}


def cached_export(model: torch.nn.Module, cache_dir: Path, kind: str = "unet") -> tuple[Path, float | None]:
    """(path of this model's .onnx, seconds the export took or None when the cache already had it); `kind`: a key
    of EXPORTERS.

    Exported into a private folder renamed into place at the end, so a crash or a second process starting at
    the same time never leaves or reads half a file (an export over 2 GB also writes weight files beside it)."""
    folder = cache_folder(model, cache_dir, kind)
    path = folder / ONNX_FILE
    if path.is_file():
        return path, None
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    started = time.perf_counter()
    try:
        EXPORTERS[kind](model, partial / ONNX_FILE)
        try:
            os.replace(partial, folder)
        except OSError:  # another process put its (identical) export there first
            if not path.is_file():
                raise
    except Exception as error:
        raise RuntimeError(f"backend 'onnx': exporting the {kind} to {folder} failed ({type(error).__name__}: "
                           f"{error}); start with backend 'eager' (--backend eager / LDS_BACKEND=eager)") from error
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return path, time.perf_counter() - started


def common_call(unet: torch.nn.Module, latent_size: int, tokens: int) -> dict[str, int]:
    """The export's free dimensions (its dynamic axes) in the call an engine makes most: one image at the model's
    default size with the prompt at the tokenizer's length, a batch of 2 with classifier-free guidance, or of 1 for
    a U-Net that takes the guidance scale as an input (a distilled one: no unconditional pass)."""
    return dict(zip(FREE_DIMS, (1 if cond_dim(unet) else 2, latent_size, latent_size, tokens)))


def open_session(path: Path, threads: int, fixed: dict[str, int] | None = None):
    """An ONNX Runtime CPU session with `threads` intra-op threads (the engine's model threads) and no inter-op
    pool: one U-Net call at a time runs on the engine's model thread. `fixed`: free dimensions given a size, so
    the session only takes that shape, and ONNX Runtime folds away the shape arithmetic of the dynamic axes,
    hundreds of tiny nodes that cost time at every step of a small U-Net (README, Fast backend)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise here
    # Idle pool threads sleep instead of spinning: spinning threads of the U-Net's and the decoder's sessions took
    # the cores from each other and from the web server (distilled model, 2 threads: 128 ms an image spinning,
    # 79 ms not; 1 thread unchanged)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for name, value in (fixed or {}).items():
        options.add_free_dimension_override_by_name(name, int(value))
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class BuildInfo:
    path: Path  # the .onnx file
    export_s: float | None  # seconds this build spent exporting; None: loaded from the cache
    load_s: float  # seconds to open the ONNX Runtime session (every start pays this)
    threads: int


def build(unet: torch.nn.Module, *, threads: int, cache_dir: Path, common: dict[str, int] | None = None
          ) -> "OnnxUNet":
    """The ONNX-backed stand-in for `unet`, exporting it first when the cache has no file for these weights.
    `common` (see common_call): the session opened now takes only that shape, the fastest for the calls made
    most; one for every other shape opens at the first such call."""
    path, export_s = cached_export(unet, cache_dir)
    started = time.perf_counter()
    session = open_session(path, threads, fixed=common)
    info = BuildInfo(path=path, export_s=export_s, load_s=time.perf_counter() - started, threads=threads)
    logger.info("ONNX U-Net %s: %s, session opened in %.2f s", path,
                "loaded from the cache" if export_s is None else f"exported in {export_s:.1f} s", info.load_s)
    return OnnxUNet(unet, session, info, common=common)


def build_decoder(vae: torch.nn.Module, *, threads: int, cache_dir: Path, int8: bool = False) -> "OnnxDecoder":
    """The ONNX-backed stand-in for `vae` whose decode runs ONNX Runtime (encode stays eager); `int8`: its
    convolutions quantized (a preset's `int8_decoder`)."""
    path, export_s = cached_export(vae, cache_dir, INT8_DECODER if int8 else "vae-decoder")
    started = time.perf_counter()
    session = open_session(path, threads)
    info = BuildInfo(path=path, export_s=export_s, load_s=time.perf_counter() - started, threads=threads)
    logger.info("ONNX VAE decoder %s: %s, session opened in %.2f s", path,
                "loaded from the cache" if export_s is None else f"exported in {export_s:.1f} s", info.load_s)
    return OnnxDecoder(vae, session, info)


# --- the stand-ins ---------------------------------------------------------------------------------------------

class _StandIn(torch.nn.Module):
    """What the stand-ins share: the module they stand in for (`eager`) held outside torch's module tree, so `.to()`,
    `.modules()` or a state_dict of the stand-in never reach the shared module; its `.config`, `.dtype` and `.device`
    as their own, and anything else read from it."""

    def __init__(self, eager: torch.nn.Module):
        super().__init__()
        object.__setattr__(self, "eager", eager)

    @property
    def config(self):
        return self.eager.config

    # `dtype` and `device` as diffusers' own lookups answer them without layerwise casting or group offloading
    # (the engine enables neither): the first floating-point weight's. Those lookups first walk every module for
    # such hooks, ~1 ms a call, and a pipeline call asks each component several times.
    @property
    def dtype(self) -> torch.dtype:
        if getattr(self.eager, "_keep_in_fp32_modules", None):
            return self.eager.dtype  # some weights kept in fp32 on purpose: diffusers' rule skips them
        return next((p.dtype for p in self.eager.parameters() if p.is_floating_point()), None) or self.eager.dtype

    @property
    def device(self) -> torch.device:
        return next(self.eager.parameters()).device

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            eager = self.__dict__.get("eager")
            if eager is None:
                raise
            return getattr(eager, name)

    def forward(self, *args: Any, **kwargs: Any):
        return self.eager(*args, **kwargs)


def _hooked(modules) -> bool:
    """A forward hook on any of `modules`, or a global one: someone watches the eager module's calls."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _weight_versions(params) -> int:
    """In-place changes to the weights bump these counters (an optimiser step, `param.add_`)."""
    return sum(p._version for p in params)


def _tiled(vae) -> bool:
    return bool(getattr(vae, "use_tiling", False) or getattr(vae, "use_slicing", False))


def _decoder_output(image: torch.Tensor, return_dict: bool):
    if not return_dict:
        return (image,)
    from diffusers.models.autoencoders.vae import DecoderOutput

    return DecoderOutput(sample=image)


class OnnxUNet(_StandIn):
    """Called like UNet2DConditionModel by the diffusers pipelines; runs ONNX Runtime where the export is exact
    and the eager U-Net everywhere else (see the module docstring). `calls` counts both, for tests and benchmarks.

    The eager U-Net is held outside torch's module tree: `.to()`, `.modules()` or a state_dict of this wrapper
    never reach the shared U-Net, and hooks or processors are only ever set on the eager U-Net itself."""

    def __init__(self, eager: torch.nn.Module, session, info: BuildInfo, common: dict[str, int] | None = None):
        super().__init__(eager)
        self.info = info
        self.calls = {"onnx": 0, "eager": 0}
        # (batch, latent height, latent width, tokens) that `common_session` takes, or None: `session` takes all
        self.common = tuple(common[name] for name in FREE_DIMS) if common else None
        self.common_session = session if common else None
        self._any_session = None if common else session
        from diffusers.models.attention_processor import Attention

        self._modules_seen = tuple(eager.modules())
        # The processors at export time: Explain and prompt-to-prompt swap them per request (then put them back)
        self._processors = tuple((m, m.processor) for m in self._modules_seen if isinstance(m, Attention))
        # In-place changes to the weights bump these counters (an optimiser step, `param.add_`): the export
        # would then be stale, so such a U-Net runs eager
        self._params = tuple(eager.parameters())
        self._versions = _weight_versions(self._params)
        # The exported graph holds the branch taken for latents divisible by the U-Net's total upsampling
        self._multiple = 2 ** int(eager.num_upsamplers)
        self._channels = int(eager.config.in_channels)
        self._text_dim = int(eager.config.cross_attention_dim)
        self._cond_dim = cond_dim(eager)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor | None = None,
                *args: Any, return_dict: bool = True, **kwargs: Any):
        if args or not self._covers(sample, timestep, encoder_hidden_states, kwargs):
            self.calls["eager"] += 1
            return self.eager(sample, timestep, *args, encoder_hidden_states=encoder_hidden_states,
                              return_dict=return_dict, **kwargs)
        self.calls["onnx"] += 1
        batch = sample.shape[0]
        t = torch.as_tensor(timestep).reshape(-1).expand(batch)  # as the U-Net broadcasts a scalar timestep
        feed = {"sample": sample.detach().contiguous().numpy(),
                "timestep": t.to(torch.float32).contiguous().numpy(),  # exact: the U-Net casts it to float itself
                "encoder_hidden_states": encoder_hidden_states.detach().contiguous().numpy()}
        if self._cond_dim:
            feed[COND_INPUT] = kwargs["timestep_cond"].detach().contiguous().numpy()
        common = (batch, sample.shape[2], sample.shape[3], encoder_hidden_states.shape[1]) == self.common
        noise_pred = torch.from_numpy((self.common_session if common else self.session).run(None, feed)[0])
        if not return_dict:
            return (noise_pred,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=noise_pred)

    @property
    def session(self):
        """The session for any shape (opened at the first call that is not the common one)."""
        if self._any_session is None:
            self._any_session = open_session(self.info.path, self.info.threads)
        return self._any_session

    # --- when the export is exact ---------------------------------------------------------------------------

    def _covers(self, sample, timestep, hidden, kwargs: dict) -> bool:
        return (self._plain_call(kwargs) and self._cond(sample, kwargs.get(COND_INPUT))
                and self._shapes(sample, timestep, hidden) and self._plain_unet())

    def _plain_call(self, kwargs: dict) -> bool:
        exported = (COND_INPUT,) if self._cond_dim else ()
        return all(name in exported or (name in EMPTY_OK and not value) for name, value in kwargs.items())

    def _cond(self, sample, cond) -> bool:
        """A distilled U-Net's export needs the guidance embedding, of its width and float32; a plain one none."""
        if not self._cond_dim:
            return cond is None
        return (torch.is_tensor(cond) and cond.dtype == torch.float32 and cond.device.type == "cpu"
                and tuple(cond.shape) == (sample.shape[0], self._cond_dim))

    def _shapes(self, sample, timestep, hidden) -> bool:
        if not (torch.is_tensor(sample) and torch.is_tensor(hidden)) or torch.is_grad_enabled():
            return False
        if sample.device.type != "cpu" or sample.dtype != torch.float32 or hidden.dtype != torch.float32:
            return False
        if sample.ndim != 4 or sample.shape[1] != self._channels or sample.shape[0] == 0:
            return False
        if sample.shape[2] % self._multiple or sample.shape[3] % self._multiple:
            return False  # the eager U-Net then passes explicit upsample sizes: another graph
        if hidden.ndim != 3 or hidden.shape[0] != sample.shape[0] or hidden.shape[2] != self._text_dim:
            return False
        t = torch.as_tensor(timestep)
        return not t.is_complex() and t.device.type == "cpu" and t.numel() in (1, sample.shape[0])

    def _plain_unet(self) -> bool:
        """No hook, no swapped processor, no active LoRA layer and no in-place weight change on the eager U-Net."""
        peft = getattr(self.eager, "_hf_peft_config_loaded", False)
        modules = tuple(self.eager.modules()) if peft else self._modules_seen  # LoRA adds modules
        if _hooked(modules):
            return False
        if any(m.processor is not original for m, original in self._processors):
            return False
        if peft and _lora_active(modules):
            return False
        return _weight_versions(self._params) == self._versions


def _lora_active(modules) -> bool:
    """A LoRA layer that changes the output: enabled with an adapter, or merged into its base weights.
    (With every adapter disabled, peft's layers return their base layer's output as it is.)"""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return True  # unknown layers: assume they act
    return any(isinstance(m, BaseTunerLayer) and (m.merged or (not m.disable_adapters and m.active_adapters))
               for m in modules)


class OnnxDecoder(_StandIn):
    """Stands in for the AutoencoderKL in a request's pipeline view: `decode` of plain float32 CPU latents runs
    ONNX Runtime, everything else (encode for img2img and inpainting, tiling, other dtypes, a call with grad, a
    VAE whose weights changed or that has hooks) runs the eager VAE. Held outside torch's module tree, as OnnxUNet
    holds its U-Net. At the built-in model's 64x64 the decoder is the larger part of a distilled 4-step image:
    convolutions at full resolution, where ONNX Runtime's kernels beat eager PyTorch's (README, Fast backend)."""

    def __init__(self, eager: torch.nn.Module, session, info: BuildInfo):
        super().__init__(eager)
        self.session = session
        self.info = info
        self.calls = {"onnx": 0, "eager": 0}
        # a TinyDecoding also reports the full VAE's modules: hooks there (Explain's) send decode to the full VAE
        self._modules_seen = tuple(getattr(eager, "watched_modules", eager.modules)())
        self._params = tuple(eager.parameters())
        self._versions = _weight_versions(self._params)
        self._channels = int(eager.config.latent_channels)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None, **kwargs: Any):
        if kwargs or not self._covers(z):
            self.calls["eager"] += 1
            return self.eager.decode(z, return_dict=return_dict, generator=generator, **kwargs)
        self.calls["onnx"] += 1
        image = torch.from_numpy(self.session.run(None, {"latents": z.detach().contiguous().numpy()})[0])
        return _decoder_output(image, return_dict)

    def _covers(self, z) -> bool:
        if not torch.is_tensor(z) or torch.is_grad_enabled() or z.device.type != "cpu" or z.dtype != torch.float32:
            return False
        if z.ndim != 4 or z.shape[0] == 0 or z.shape[1] != self._channels:
            return False
        # tiling or slicing switched on, hooks anywhere, or weights changed in place: the eager VAE decides
        if _tiled(self.eager) or _hooked(self._modules_seen):
            return False
        return _weight_versions(self._params) == self._versions


class TinyDecoding(_StandIn):
    """The full VAE with its decode done by a tiny decoder (diffusers AutoencoderTiny, training/train_tiny_vae.py):
    the fast path's decoder (a preset's `fast_decoder`). Encode, config, tiling and everything else are the full
    VAE's. The full VAE decodes instead whenever something watches it (a hook on any of its modules: Explain's
    timers and probes), or tiling or slicing is on, so Explain shows and times the model's own decoder.

    The tiny model takes the latents the U-Net works on (its scaling_factor is 1.0, as TAESD's), so the pipelines'
    `decode(latents / scaling_factor)` is scaled back first. Held like OnnxUNet holds its U-Net: the full VAE
    outside torch's module tree, the tiny one inside it (its weights key the ONNX export of this decoding)."""

    def __init__(self, full: torch.nn.Module, tiny: torch.nn.Module):
        super().__init__(full)
        self.tiny = tiny
        self.calls = {"tiny": 0, "full": 0}
        self._full_modules = tuple(full.modules())

    def watched_modules(self) -> tuple:
        return (*self._full_modules, *self.modules())

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None, **kwargs: Any):
        if kwargs or self._full_watched():
            self.calls["full"] += 1
            return self.eager.decode(z, return_dict=return_dict, generator=generator, **kwargs)
        self.calls["tiny"] += 1
        image = self.tiny.decode(z * self.eager.config.scaling_factor, return_dict=False)[0]
        return _decoder_output(image, return_dict)

    def _full_watched(self) -> bool:
        return _tiled(self.eager) or _hooked(self._full_modules)
