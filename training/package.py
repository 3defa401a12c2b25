"""Assembles the shipped Shapes LDM: the U-Net and text encoder of an LDM run with the newest VAE decoder.

    python -m training.package --ldm runs/ldm/pipeline --vae runs/vae/vae --out assets/models/shapes-ldm

The VAE's encoder is frozen once its adversarial phase starts (see train_vae), so a decoder trained
longer than the encoder the U-Net learned on (train_vae's decoder phase, or train_decoder's deeper
decoder) decodes the same latents better. This script refuses a
VAE whose encoder differs from the one the LDM was trained with.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline


def same_encoder(a: AutoencoderKL, b: AutoencoderKL) -> bool:
    """Whether both encode world scenes to the same latents, bit for bit.

    Compared by what they compute, not by their tensors: a VAE grown by `train_decoder` has more
    encoder blocks than its source, all of them identities."""
    from training import shapes
    from training.common import images_to_tensor

    images = images_to_tensor(shapes.batch(range(8))[0])
    with torch.no_grad():
        first, second = a.encode(images).latent_dist, b.encode(images).latent_dist
    return torch.equal(first.mean, second.mean) and torch.equal(first.std, second.std)


def package(ldm: Path, vae: Path | None, out: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(ldm)
    if vae is not None:
        newer = AutoencoderKL.from_pretrained(vae)
        if not same_encoder(pipe.vae, newer):
            raise SystemExit(
                f"{vae} has a different encoder than the VAE {ldm} was trained on; its latents would not match"
            )
        # The U-Net learned latents scaled by the factor measured when it was trained; keep exactly that.
        newer.register_to_config(scaling_factor=pipe.vae.config.scaling_factor)
        pipe.register_modules(vae=newer)
    card = out / "README.md"
    kept_card = card.read_text() if card.exists() else None
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    for extra in ("TRAINING_STEP",):
        if (Path(ldm) / extra).exists():
            shutil.copy(Path(ldm) / extra, out / extra)
    if kept_card is not None:
        card.write_text(kept_card)
    return pipe


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ldm", type=Path, default=Path("runs/ldm/pipeline"), help="train_ldm's exported pipeline")
    parser.add_argument(
        "--vae", type=Path, default=None, help="a VAE folder with the same encoder and a newer decoder"
    )
    parser.add_argument("--out", type=Path, default=Path("assets/models/shapes-ldm"))
    args = parser.parse_args(argv)
    package(args.ldm, args.vae, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
