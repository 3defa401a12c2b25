"""Assembles the shipped Shapes LDM: the U-Net and text encoder of an LDM run with the newest VAE decoder.

    python -m training.package --ldm runs/ldm/pipeline --vae runs/vae/vae --out assets/models/shapes-ldm

The VAE's encoder is frozen once its adversarial phase starts (see train_vae), so a decoder trained
longer than the encoder the U-Net learned on (train_vae's decoder phase, or train_decoder's deeper
decoder) decodes the same latents better. This script refuses a
VAE whose encoder differs from the one the LDM was trained with.

    python -m training.package --ldm assets/models/shapes-ldm --vocabulary 2 --out assets/models/shapes-ldm

`--vocabulary 2` grows the tokenizer and text encoder to world 2's vocabulary (docs/MODEL_V2.md: world 1's
words with their ids, plus the generic word "shape"): every old caption encodes bit for bit as before, and the
new word starts as the mean of the shape words and "person" (text.grow_text_encoder), so a ControlNet prompt
can leave the form to its map before the U-Net has been trained on world 2.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline

from training.common import STEP_FILE, TEXT_STEP_FILE


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


def package(ldm: Path, vae: Path | None, out: Path, vocabulary: int | None = None) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(ldm)
    if vocabulary == 2:
        from training import shapes, text

        tokenizer = text.build_tokenizer(shapes.vocabulary_v2())
        added = text.grow_text_encoder(pipe.text_encoder, tokenizer)
        pipe.register_modules(tokenizer=tokenizer)
        print(f"vocabulary grown by: {', '.join(added) or 'nothing (already world 2)'}")
    if vae is not None:
        newer = AutoencoderKL.from_pretrained(vae)
        if not same_encoder(pipe.vae, newer):
            raise SystemExit(
                f"{vae} has a different encoder than the VAE {ldm} was trained on; its latents would not match"
            )
        # The U-Net learned latents scaled by the factor measured when it was trained; keep exactly that.
        newer.register_to_config(scaling_factor=pipe.vae.config.scaling_factor)
        pipe.register_modules(vae=newer)
    # The folder's own files (its card, the step, figures) survive a rewrite, even one in place (--out = --ldm)
    kept = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file() and f.name != "model_index.json"} \
        if out.exists() else {}
    # The step files are the LDM's: its step, and the step its text encoder last changed at if earlier (a marker
    # the LDM lacks is dropped: its text encoder trained up to its own step)
    kept.pop(TEXT_STEP_FILE, None)
    for name in (STEP_FILE, TEXT_STEP_FILE):
        if (Path(ldm) / name).exists():
            kept[name] = (Path(ldm) / name).read_bytes()
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    for name, data in kept.items():
        (out / name).write_bytes(data)
    return pipe


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ldm", type=Path, default=Path("runs/ldm/pipeline"), help="train_ldm's exported pipeline")
    parser.add_argument(
        "--vae", type=Path, default=None, help="a VAE folder with the same encoder and a newer decoder"
    )
    parser.add_argument("--out", type=Path, default=Path("assets/models/shapes-ldm"))
    parser.add_argument("--vocabulary", type=int, choices=(1, 2), default=None,
                        help="2: grow the tokenizer and text encoder to world 2's vocabulary (old ids unchanged)")
    args = parser.parse_args(argv)
    package(args.ldm, args.vae, args.out, args.vocabulary)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
