"""Named model presets: the built-in Shapes LDM and Stable Diffusion 1.5-class hub models.

A preset is plain data (no torch): which base weights, which ControlNets, which defaults the UI shows.
Paths come only from the CLI or the environment (`app.py --model`, `LDS_MODEL`), never from a browser user.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / "assets" / "models"
CONTROL_TYPES = ("canny", "depth", "pose")
NO_PREPROCESSOR = "none"  # the image already is a control map
PREPROCESSORS = (*CONTROL_TYPES, NO_PREPROCESSOR)

# Scheduler display names (the factories live in pipelines/schedulers.py, which needs diffusers).
COMMON_SCHEDULERS = ("DPM++ 2M Karras", "DPM++ 2M", "Euler a", "DDIM", "UniPC")


@dataclass(frozen=True)
class ModelPreset:
    name: str  # shown in the UI and written into PNG params as "model"
    base: str  # hub id or local diffusers folder of a StableDiffusionPipeline
    is_builtin: bool = False  # True for the Shapes LDM shipped in assets/models
    default_size: int = 512  # pixels, square; what the model was trained at
    max_size: int = 768  # longest side allowed (LDS_MAX_SIZE may lower it)
    default_steps: int = 25
    default_guidance: float = 7.5
    # A tab's own default where that tab's held-out measure chose another guidance than default_guidance
    tab_guidance: dict[str, float] = field(default_factory=dict)  # tab name ("outpaint", ...) -> guidance
    default_scheduler: str = "DPM++ 2M Karras"
    scheduler_names: tuple[str, ...] = COMMON_SCHEDULERS
    controlnets: dict[str, str] = field(default_factory=dict)  # control type ("canny"|"depth"|"pose") -> id or path
    inpaint_model: str | None = None  # optional dedicated 9-channel inpainting model (its unet is used)
    # Image tasks (Inpaint, Outpaint, Style transfer, ControlNet maps, Compare on a picture) scale the user's
    # picture so it is at most this tall, the scale the model knows (request.working_size; the canvas around an
    # outpainted picture scales with it); None: only the size limits apply
    picture_height: int | None = None
    # Text to image: the (lowest, highest) canvas heights the model drew whole scenes at in training, where a
    # request outside them gets a warning; None: picture_height alone
    scene_heights: tuple[int, int] | None = None
    lora: str | None = None  # optional LoRA fused into the U-Net at load time (LCM-LoRA)
    # optional tiny decoder (diffusers AutoencoderTiny folder, as TAESD) that decodes instead of the VAE's own
    # (pipelines/fast_backend.TinyDecoding); the VAE still encodes
    fast_decoder: str | None = None
    # with backend "onnx": the decoder's convolutions in int8 (pipelines/fast_backend.export_decoder_int8), for a
    # preset whose decode is most of an image's time; its model card says what it costs in prompt following
    int8_decoder: bool = False
    style_presets: dict[str, str] = field(default_factory=dict)  # style name -> prompt suffix
    annotators: str | None = None  # hub id (controlnet_aux) or local folder of the depth/pose annotators
    example_prompts: tuple[str, ...] = ()

    def guidance_for(self, tab: str) -> float:
        """The guidance a tab starts at: its own default if the preset has one, else default_guidance."""
        return self.tab_guidance.get(tab, self.default_guidance)

    def __hash__(self) -> int:  # dict fields make the generated hash fail; name + base identify a preset
        return hash((self.name, self.base))


SHAPES_STYLES = ("flat", "outline", "striped", "dotted", "glow")
SD15_STYLES = {
    "oil painting": "oil painting, thick brush strokes, canvas texture",
    "watercolor": "watercolor painting, soft washes, paper texture",
    "pencil sketch": "pencil sketch, graphite, cross-hatching, black and white",
    "ukiyo-e": "ukiyo-e woodblock print, flat colours, bold outlines",
    "van gogh": "in the style of Vincent van Gogh, swirling brush strokes, impasto",
    "anime": "anime illustration, cel shading, clean lines",
    "pixel art": "pixel art, 16-bit, limited palette",
}
SD15_CONTROLNETS = {
    "canny": "lllyasviel/control_v11p_sd15_canny",
    "depth": "lllyasviel/control_v11f1p_sd15_depth",
    "pose": "lllyasviel/control_v11p_sd15_openpose",
}
SD15_BASE = dict(
    is_builtin=False,
    default_size=512,
    max_size=1024,
    default_steps=25,
    default_guidance=7.5,
    default_scheduler="DPM++ 2M Karras",
    controlnets=SD15_CONTROLNETS,
    style_presets=SD15_STYLES,
    annotators="lllyasviel/Annotators",
    example_prompts=(
        "a photo of an astronaut riding a horse on the moon",
        "a cozy cabin in a snowy forest, golden hour",
    ),
)

SHAPES = ModelPreset(
    name="shapes",
    base=str(MODELS_DIR / "shapes-ldm"),
    is_builtin=True,
    default_size=64,
    max_size=128,  # a convolutional U-Net extends to 2x its training size before scenes fall apart
    default_steps=20,
    # The best two-object binding on a held-out prompt set; from about 5 up this small model oversaturates
    # and loses colours (the sweep is in assets/models/shapes-ldm/README.md)
    default_guidance=2.5,
    # Outpainting with the inpainting U-Net: chosen on training.evaluate_inpaint's validation split, where less
    # guidance let the picture overrule the prompt's background words more often (the model card has the sweep)
    tab_guidance={"outpaint": 1.5},
    default_scheduler="DPM++ 2M",
    controlnets={t: str(MODELS_DIR / f"shapes-controlnet-{t}") for t in CONTROL_TYPES},
    inpaint_model=str(MODELS_DIR / "shapes-inpaint"),  # training/train_inpaint.py derives it from the base
    picture_height=64,  # trained on 64x64 scenes: a picture at another scale gets stray backgrounds and objects
    style_presets={s: f"in {s} style" for s in SHAPES_STYLES},
    annotators=str(MODELS_DIR / "shapes-annotators"),
    example_prompts=(
        "a red circle left of a blue square",
        "a big yellow star on grass",
        "a green person waving on sand",
    ),
)

PRESETS = MappingProxyType(
    {
        "shapes": SHAPES,
        # The built-in model distilled for 1-4 steps (training/train_lcm.py): one U-Net pass a step, the guidance
        # scale an input of the U-Net instead of a second, unconditional pass. Its VAE, text encoder and ControlNets
        # are the built-in model's; the 9-channel inpainting U-Net is not distilled (4 LCM steps through it give
        # mush), so inpainting blends latents with the distilled U-Net.
        "shapes-lcm": replace(
            SHAPES,
            name="shapes-lcm",
            base=str(MODELS_DIR / "shapes-lcm"),
            # chosen on the validation split by evaluate_lcm's rule (assets/models/shapes-lcm/README.md)
            default_steps=4,
            default_guidance=1.5,
            default_scheduler="LCM",
            scheduler_names=("LCM",) + COMMON_SCHEDULERS,
            inpaint_model=None,
            tab_guidance={},  # the outpainting default was chosen for the inpainting U-Net, which this preset lacks
            # kept within the goals of prompt following on the validation split (the model card has both rows)
            int8_decoder=True,
        ),
        # The built-in model's next version (docs/MODEL_V2.md): its U-Net trained on world 2 at every canvas from
        # 64x64 to 128x128, so 128 px pictures keep one horizon, with a decoder trained on that U-Net's latents and
        # world 2's textures. Its text encoder, VAE encoder and ControlNets are the built-in model's (the ControlNets
        # were measured on it, its card); its inpainting U-Net is the built-in one moved onto it and trained on
        # (`train_inpaint --rebase-from`), the tabs' guidance as chosen for that one.
        "shapes-v2": replace(
            SHAPES,
            name="shapes-v2",
            base=str(MODELS_DIR / "shapes-ldm-v2"),
            inpaint_model=str(MODELS_DIR / "shapes-inpaint-v2"),
            # trained on world 2's canvases 64-128 px on each side; image tasks stay at picture_height (64), the
            # height the ControlNets and the inpainting U-Net were trained at
            scene_heights=(64, 128),
        ),
        "sd15": ModelPreset(
            name="sd15",
            base="stable-diffusion-v1-5/stable-diffusion-v1-5",
            inpaint_model="stable-diffusion-v1-5/stable-diffusion-inpainting",
            **SD15_BASE,
        ),
        "sd15-lcm": ModelPreset(
            name="sd15-lcm",
            base="stable-diffusion-v1-5/stable-diffusion-v1-5",
            lora="latent-consistency/lcm-lora-sdv1-5",
            **{
                **SD15_BASE,
                "default_steps": 4,
                "default_guidance": 1.0,
                "default_scheduler": "LCM",
                "scheduler_names": ("LCM",) + COMMON_SCHEDULERS,
            },
        ),
        "sd15-inpainting": ModelPreset(
            name="sd15-inpainting",
            base="stable-diffusion-v1-5/stable-diffusion-inpainting",
            **{**SD15_BASE, "controlnets": {}},
        ),
    }
)


def _is_pipeline_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def _local_only(controlnets: dict[str, str]) -> dict[str, str]:
    """Keep the local ControlNet folders that exist (the built-in ones are trained one by one)."""
    return {t: p for t, p in controlnets.items() if (Path(p) / "config.json").is_file()}


def _has_unet(path: Path) -> bool:
    return (path / "unet" / "config.json").is_file()


def preset_from_folder(path: str | Path, **overrides) -> ModelPreset:
    """An ad-hoc preset for a local diffusers StableDiffusionPipeline folder; sizes come from its configs."""
    path = Path(path).resolve()
    unet = json.loads((path / "unet" / "config.json").read_text())
    vae = json.loads((path / "vae" / "config.json").read_text())
    factor = 2 ** (len(vae.get("block_out_channels", (1, 1, 1, 1))) - 1)  # VAE downsampling factor f
    size = int(unet.get("sample_size") or 64) * factor
    values = dict(
        name=path.name,
        base=str(path),
        default_size=size,
        max_size=size * 2,
        default_steps=20 if size <= 128 else 25,
        default_guidance=4.0 if size <= 128 else 7.5,
    )
    if unet.get("time_cond_proj_dim"):  # an LCM-distilled U-Net (guidance embedding): a few LCM steps, no CFG pass
        values.update(default_steps=4, default_scheduler="LCM", scheduler_names=("LCM",) + COMMON_SCHEDULERS)
    values.update(overrides)
    return ModelPreset(**values)


def resolve_preset(name_or_path: str) -> ModelPreset:
    """A preset by name ("shapes", "sd15", ...) or a local diffusers folder; ValueError otherwise."""
    value = str(name_or_path).strip()
    if value in PRESETS:
        preset = PRESETS[value]
        if preset.is_builtin:
            inpaint = preset.inpaint_model if preset.inpaint_model and _has_unet(Path(preset.inpaint_model)) else None
            preset = replace(preset, controlnets=_local_only(preset.controlnets), inpaint_model=inpaint)
        return preset
    path = Path(value).expanduser()
    if path.is_dir() and _is_pipeline_folder(path):
        return preset_from_folder(path)
    if path.is_dir():
        raise ValueError(f"model {value!r} is a folder without model_index.json, so not a diffusers pipeline; "
                         f"known presets: {', '.join(PRESETS)}")
    raise ValueError(f"unknown model {value!r}: use one of the presets {', '.join(PRESETS)} "
                     f"or a local diffusers pipeline folder")
