"""Tiny random-weight models with the real classes and shapes, saved like hub/built-in models.

Built once per test session (see conftest.py). Weights are random, so images are noise; the tests check
plumbing: sizes, determinism, sharing, masks, metadata, cancel, errors.

- shapes_like: the built-in model's layout (word-level tokenizer, f=4 VAE, addition_embed_type="text",
  DPM-Solver scheduler), smaller channels.
- sd_like: Stable Diffusion 1.5's layout (CLIP BPE tokenizer, f=8 VAE with 4 levels, PNDM config).
- *_controlnet: ControlNetModel.from_unet of each U-Net; sd_inpaint: the SD layout with a 9-channel U-Net.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DPMSolverMultistepScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from training.text import build_text_encoder, build_tokenizer

TEXT_HIDDEN = 32
TEXT_HEADS = 4  # also the U-Net's addition_embed_type_num_heads: 32 / 4 = 8 dims per head


def _vae(levels: tuple[int, ...]) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        block_out_channels=levels, layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * len(levels), up_block_types=("UpDecoderBlock2D",) * len(levels),
    )


def shapes_like_components(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(tokenizer, hidden_size=TEXT_HIDDEN, heads=TEXT_HEADS)
    vae = _vae((8, 16, 16))  # f = 4: 64x64x3 -> 16x16x4
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=8,
        addition_embed_type="text", addition_embed_type_num_heads=TEXT_HEADS,
    )
    scheduler = DPMSolverMultistepScheduler(steps_offset=1)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def _clip_tokenizer(folder: Path) -> CLIPTokenizer:
    """A real CLIP BPE tokenizer over a tiny vocabulary: single letters, no merges."""
    folder.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters] + [",", ",</w>", ".</w>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def sd_like_components(folder: Path, *, in_channels: int = 4, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    tokenizer = _clip_tokenizer(folder / "_vocab")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=TEXT_HEADS, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        projection_dim=TEXT_HIDDEN,
    ))
    vae = _vae((8, 8, 16, 16))  # f = 8, four levels like SD's VAE
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4,  # 8 latents * f 8 = 64 px default
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=8,
    )
    # Stable Diffusion 1.5's scheduler config: PNDM, scaled-linear betas, steps_offset 1.
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def controlnet_from_unet(unet: UNet2DConditionModel, vae_factor: int) -> ControlNetModel:
    """ControlNetModel.from_unet, sized for the VAE, plus the one setting it forgets to copy.

    The conditioning embedding must shrink the control image by the VAE factor f: one stride-2 stage per
    entry after the first, so f = 4 needs three entries (from_unet's default of four is for f = 8).

    diffusers' from_unet does not pass addition_embed_type_num_heads, so a U-Net with
    addition_embed_type="text" and a non-default head count would get a ControlNet whose text pooling
    splits heads differently (and 32 dims / 64 default heads = 0 dims per head fails outright).
    """
    stages = {4: (8, 8, 16), 8: (8, 8, 16, 16)}[vae_factor]
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=stages)
    heads = unet.config.get("addition_embed_type_num_heads", 64)
    if controlnet.config.get("addition_embed_type_num_heads", 64) != heads:
        state = controlnet.state_dict()
        # Direct construction: from_config would reset keys listed in the config's "_use_default_values".
        settings = {k: v for k, v in controlnet.config.items() if not k.startswith("_")}
        controlnet = ControlNetModel(**{**settings, "addition_embed_type_num_heads": heads})
        controlnet.load_state_dict(state)
    return controlnet


def _save_pipeline(components: dict, folder: Path) -> Path:
    pipe = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_all(root: Path) -> dict[str, Path]:
    """Build and save every tiny model under `root`; returns name -> folder."""
    root = Path(root)
    paths: dict[str, Path] = {}
    shapes = shapes_like_components()
    paths["shapes"] = _save_pipeline(shapes, root / "shapes-like")
    sd = sd_like_components(root / "sd-like")
    paths["sd"] = _save_pipeline(sd, root / "sd-like")
    sd9 = sd_like_components(root / "sd-inpaint", in_channels=9, seed=1)
    paths["sd_inpaint"] = _save_pipeline(sd9, root / "sd-inpaint")
    for name, unet, factor in (("shapes", shapes["unet"], 4), ("sd", sd["unet"], 8)):
        for index, control in enumerate(("canny", "depth", "pose")):
            torch.manual_seed(100 + index)
            controlnet = controlnet_from_unet(unet, factor)
            # from_unet's zero convs make a ControlNet a no-op; random ones make the tests see its effect.
            for module in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
                torch.nn.init.normal_(module.weight, std=0.5)
            folder = root / f"{name}-controlnet-{control}"
            controlnet.save_pretrained(folder, safe_serialization=True)
            paths[f"{name}_controlnet_{control}"] = folder
    paths["sd_lcm_lora"] = build_lora(root / "tiny-lcm-lora", paths["sd"])
    return paths


def build_lora(folder: Path, unet_folder: Path, *, rank: int = 4, seed: int = 0) -> Path:
    """A random LoRA for the U-Net in `unet_folder`, saved as diffusers LoRA weights (like LCM-LoRA)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(unet_folder, subfolder="unet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for name, parameter in unet.named_parameters():
        if "lora_B" in name:  # peft starts B at zero (an identity LoRA); a random B makes its effect visible
            torch.nn.init.normal_(parameter, std=0.2)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet),
                                              safe_serialization=True)
    return folder


def tiny_safety_checker(seed: int = 0):
    """(StableDiffusionSafetyChecker, CLIPImageProcessor): the real classes SD1.5 ships, with a tiny random CLIP
    vision tower. Every concept starts unreachable (threshold 2 is above any cosine): set the ones a test needs."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(seed)
    config = CLIPConfig(projection_dim=16, text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                                            num_attention_heads=4),
                        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                           num_attention_heads=4, image_size=32, patch_size=8))
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
        checker.concept_embeds_weights.fill_(2.0)
        checker.special_care_embeds_weights.fill_(2.0)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return checker, processor


def save_safety_checker(checker, processor, model_folder: Path) -> None:
    """Into `model_folder` as diffusers' SD1.5 repositories lay it out (safety_checker/, feature_extractor/)."""
    checker.save_pretrained(Path(model_folder) / "safety_checker", safe_serialization=True)
    processor.save_pretrained(Path(model_folder) / "feature_extractor")
