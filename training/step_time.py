"""Seconds per training step of the Shapes LDM's U-Net and text encoder at given canvas sizes (one thread):

    python -m training.step_time --sizes 64x64,128x128,128x64 --batch-size 64 --steps 3
    python -m training.step_time --sizes 64x64,128x128,128x64 --pixel-budget   # train_ldm --pixel-budget's batches

What train_ldm does per step, on random latents: text encoder and U-Net forward, v-prediction loss, backward,
AdamW update (the shipped architecture: channels 32, 64, 64 and cross-attention in the last up block). The
first step warms up and is not counted. The figure depends on what else the machine runs: say so beside it.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from training import shapes, text
from training.train_ldm import LDMConfig, bucket_batch_size, build_unet, parse_sizes


def seconds_per_step(size: tuple[int, int], *, batch_size: int, steps: int) -> float:
    config = LDMConfig(attention_16x16_up=True)
    tokenizer = text.build_tokenizer(shapes.vocabulary_v2())
    encoder = text.build_text_encoder(tokenizer, hidden_size=config.text_hidden_size, layers=config.text_layers)
    unet = build_unet(config)
    optimiser = torch.optim.AdamW(list(unet.parameters()) + list(encoder.parameters()), lr=1e-4)
    ids = text.tokenize(tokenizer, ["a big red circle on the left in striped style on grass"] * batch_size)
    generator = torch.Generator().manual_seed(0)
    width, height = size
    timings = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        latents = torch.randn((batch_size, 4, height // 4, width // 4), generator=generator)
        timesteps = torch.randint(0, 1000, (batch_size,), generator=generator)
        prediction = unet(latents, timesteps, encoder(ids).last_hidden_state).sample
        loss = F.mse_loss(prediction, torch.randn(prediction.shape, generator=generator))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        timings.append(time.perf_counter() - started)
    return float(sorted(timings[1:])[len(timings[1:]) // 2])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64x64,128x128")
    parser.add_argument("--batch-size", type=int, default=LDMConfig.batch_size)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--pixel-budget", action="store_true",
                        help="--batch-size is the 64x64 batch; each canvas gets as many pixels (train_ldm's option)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for size in parse_sizes(args.sizes):
        batch = bucket_batch_size(args.batch_size, *size) if args.pixel_budget else args.batch_size
        per_step = seconds_per_step(size, batch_size=batch, steps=args.steps)
        print(f"{size[0]}x{size[1]}, batch {batch}: {per_step:.2f} s/step (median of {args.steps})", flush=True)


if __name__ == "__main__":
    main()
