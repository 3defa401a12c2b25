"""Random-weight models for the benchmarks: Stable Diffusion 1.5's exact architecture (configs written out
below, no hub access needed) and random ControlNets for models that have none yet.

Built once under benchmarks.common.CACHE and reused (a COMPLETE marker says a folder is whole).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from benchmarks.common import CACHE, REPO

# Stable Diffusion 1.5 (stable-diffusion-v1-5/stable-diffusion-v1-5), the non-default config values.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD15_VAE = dict(
    sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.18215,
)
SD15_TEXT = dict(  # CLIP ViT-L/14 text tower
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406,
    eos_token_id=49407, pad_token_id=1,
)
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                      steps_offset=1, set_alpha_to_one=False)
CONTROL_TYPES = ("canny", "depth", "pose")


def _complete(folder: Path) -> bool:
    return (folder / "COMPLETE").is_file()


def _mark(folder: Path) -> Path:
    (folder / "COMPLETE").write_text("ok\n")
    return folder


def _tokenizer(folder: Path):
    """A real CLIP BPE tokenizer over a small alphabet (the real vocabulary is on the hub); it pads to 77
    tokens like SD1.5's, which is all the cost model needs."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters] + [",</w>", ".</w>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def sd15_unet(*, in_channels: int = 4, out_channels: int = 4, sample_size: int = 64):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{**SD15_UNET, "in_channels": in_channels, "out_channels": out_channels,
                                   "sample_size": sample_size})


def sd15_random(dtype: str = "fp16") -> tuple[Path, dict[str, Path]]:
    """(pipeline folder, control type -> ControlNet folder): SD1.5-shaped, random weights, saved in `dtype`.

    About 2.2 GB (fp16) for the pipeline and 0.7 GB per ControlNet; the three ControlNets hold the same random
    weights (memory is what they are for here).
    """
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    root = CACHE / f"sd15-random-{dtype}"
    pipe_dir = root / "pipeline"
    controls = {t: root / f"controlnet-{t}" for t in CONTROL_TYPES}
    if _complete(pipe_dir) and all(_complete(p) for p in controls.values()):
        return pipe_dir, controls
    shutil.rmtree(root, ignore_errors=True)
    torch_dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    torch.manual_seed(0)
    unet = sd15_unet()
    pipe = StableDiffusionPipeline(
        unet=unet, vae=AutoencoderKL(**SD15_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT)),
        tokenizer=_tokenizer(root / "_vocab"), scheduler=PNDMScheduler(**SD15_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch_dtype).save_pretrained(pipe_dir, safe_serialization=True)
    _mark(pipe_dir)
    controlnet = ControlNetModel.from_unet(unet.float()).to(torch_dtype)  # SD1.5 ControlNet v1.1 layout
    del pipe, unet
    first = controls[CONTROL_TYPES[0]]
    controlnet.save_pretrained(first, safe_serialization=True)
    _mark(first)
    for control in CONTROL_TYPES[1:]:
        shutil.copytree(first, controls[control])
    return pipe_dir, controls


def random_controlnets(model_folder: str | Path) -> tuple[dict[str, Path], bool]:
    """(control type -> ControlNet folder, random?): the model's own trained ControlNets where they exist
    (assets/models/shapes-controlnet-*), otherwise random ones made with the trainer's `controlnet_from_unet`
    from this model's U-Net (same architecture as the real ones will have)."""
    import torch
    from diffusers import UNet2DConditionModel

    real = {t: REPO / "assets" / "models" / f"shapes-controlnet-{t}" for t in CONTROL_TYPES}
    if all((p / "config.json").is_file() for p in real.values()):
        return real, False
    unet_config = json.loads((Path(model_folder) / "unet" / "config.json").read_text())
    key = hashlib.sha1(json.dumps(unet_config, sort_keys=True).encode()).hexdigest()[:10]
    root = CACHE / f"random-controlnets-{key}"
    folders = {t: root / t for t in CONTROL_TYPES}
    if all(_complete(p) for p in folders.values()):
        return folders, True
    shutil.rmtree(root, ignore_errors=True)
    from training.train_controlnet import controlnet_from_unet

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(Path(model_folder) / "unet")
    controlnet = controlnet_from_unet(unet)
    for folder in folders.values():
        controlnet.save_pretrained(folder, safe_serialization=True)
        _mark(folder)
    return folders, True
