"""5. The LDM claim (Rombach et al. 2022): denoising in the VAE's latent space costs far less per step than the
same U-Net would in pixel space. FLOPs of one U-Net evaluation on a latent (4 channels, image / f) against the
same U-Net config with 3 input/output channels at the full image resolution (a pixel-space diffusion model of
the same width and depth), counted with torch.utils.flop_counter.FlopCounterMode on the meta device (shapes
only: nothing is allocated or computed, so SD1.5 at 512x512 in pixel space costs nothing to count).

    python -m benchmarks.ldm_flops [--model FOLDER] [--no-sd15]
"""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks.common import Options, Row, model_folder, standalone

PART = "5 LDM claim"


def unet_flops(config: dict, *, channels: int, size: int, text_tokens: int, text_dim: int) -> int:
    """FLOPs of one U-Net evaluation (batch 1) built from `config` with `channels` in/out at size x size."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    settings = {k: v for k, v in config.items() if not k.startswith("_")}
    settings.update(in_channels=channels, out_channels=channels, sample_size=size)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**settings).eval()
        sample = torch.empty(1, channels, size, size)
        hidden = torch.empty(1, text_tokens, text_dim)
        timestep = torch.tensor(500)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        unet(sample, timestep, hidden)
    return int(counter.get_total_flops())


def compare(label: str, unet_config: dict, *, image: int, factor: int, text_tokens: int) -> Row:
    latent_channels = int(unet_config.get("in_channels", 4))
    text_dim = int(unet_config["cross_attention_dim"])
    latent = unet_flops(unet_config, channels=latent_channels, size=image // factor, text_tokens=text_tokens,
                        text_dim=text_dim)
    pixel = unet_flops(unet_config, channels=3, size=image, text_tokens=text_tokens, text_dim=text_dim)
    return Row(PART, f"{label}: U-Net FLOPs per step, pixel space {image}x{image}x3 / latent "
                     f"{image // factor}x{image // factor}x{latent_channels}",
               pixel / latent, detail=f"{pixel / 1e9:,.1f} GFLOP vs {latent / 1e9:,.2f} GFLOP per evaluation "
                                      f"(f={factor}; CFG doubles both)")


def run(opts: Options) -> list[Row]:
    from benchmarks.models import SD15_UNET

    folder, note = model_folder(opts)
    if note:
        opts.notes.append(note)
    path = Path(folder)
    unet = json.loads((path / "unet" / "config.json").read_text())
    vae = json.loads((path / "vae" / "config.json").read_text())
    text = json.loads((path / "text_encoder" / "config.json").read_text())
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    image = int(unet["sample_size"]) * factor
    rows = [compare("built-in", unet, image=image, factor=factor, text_tokens=int(text["max_position_embeddings"]))]
    if opts.sd15 and not opts.quick:
        rows.append(compare("SD1.5", {**SD15_UNET}, image=512, factor=8, text_tokens=77))
    else:
        rows.append(Row(PART, "SD1.5: U-Net FLOPs per step, pixel space 512x512x3 / latent 64x64x4", float("nan"),
                        detail="skipped (--quick)" if opts.quick else "skipped (--no-sd15)"))
    return rows


if __name__ == "__main__":
    raise SystemExit(standalone(PART, run))
