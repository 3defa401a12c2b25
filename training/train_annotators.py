"""Trains the Shapes-world annotators: image -> depth map, image -> OpenPose keypoints.

    python -m training.train_annotators --kind depth --out runs/annotator-depth --max-steps 1500 --threads 1
    python -m training.train_annotators --kind pose  --out runs/annotator-pose  --max-steps 1500 --threads 1
    (add --vae assets/models/shapes-ldm/vae to train on VAE round trips too)

Reads top to bottom: 1. render a fixed training set once and cache it (depth: any scene; pose: scenes
with a person plus a share without one, whose visibility targets are all zero), 2. train with
augmentations that make the nets robust to generated pictures (blur, noise, colour jitter, a
down-up resize; horizontal flips for depth) and, with `--vae`, on half of each batch pictures after
the Shapes VAE's encode/decode (what every generated picture goes through; 2000 spread over the set),
3. every `--eval-every` steps score held-out renders
(seeds from HELD_OUT_SEED up: depth abs-rel, pose PCK@0.1 of the person's box) and export the model
folder (model.safetensors + config.json) to OUT/annotator; resumes from OUT/checkpoint.pt.
Losses: depth = L1 + 0.5 * relative error on pixels with depth > 0 (the sky is 0);
pose = L1 of soft-argmax keypoints (pixels / 4) + 0.1 * heatmap cross-entropy against a Gaussian target
+ visibility BCE.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training import annotators, shapes
from training.common import Checkpoint, LossLog, due, optimizer_step, save_grid, set_threads

TARGETS = {"depth": ("abs_rel", 0.15, "<="), "pose": ("pck", 0.8, ">=")}  # the bar each annotator must pass


@dataclass
class AnnotatorTrainConfig:
    train_scenes: int = 12_000  # rendered once and cached; pose: scenes with a person
    no_person_share: float = 0.2  # pose: extra scenes without a person (visibility 0), as a share of train_scenes
    batch_size: int = 32
    learning_rate: float = 2e-3
    final_lr_fraction: float = 0.05  # cosine decay to this share of the learning rate at max_steps
    warmup_steps: int = 50
    weight_decay: float = 1e-4
    eval_count: int = 200  # held-out scenes scored during training
    heatmap_weight: float = 0.1
    heatmap_sigma_cells: float = 0.75  # Gaussian target width in 4-px heatmap cells
    vae_share: float = 0.5  # with --vae: share of each batch taken from the VAE round trips of the pictures
    low_contrast_share: float = 0.0
    # with --vae: this many training pictures (spread over the set) are round-tripped
    vae_scenes: int = 2000


# ----------------------------------------------------------------------------- data

def build_dataset(
    kind: str, config: AnnotatorTrainConfig, cache: Path, vae: Path | None = None
) -> dict[str, np.ndarray]:
    """Rendered training set (cached): images (N, 64, 64, 3) uint8 and depth (N, 64, 64) or keypoints (N, 18, 3);
    with a `vae`, also images_vae: the same pictures after the VAE's round trip."""
    if cache.exists():
        data = dict(np.load(cache))
        if len(data["images"]) >= config.train_scenes and (
            vae is None or len(data.get("images_vae", ())) >= config.vae_scenes
        ):
            return data
    started = time.time()
    if kind == "depth":
        seeds = list(range(config.train_scenes))
    else:
        people = annotators.person_seeds(0, config.train_scenes)
        taken = set(people)
        others = [s for s in range(people[-1]) if s not in taken][: int(config.train_scenes * config.no_person_share)]
        seeds = people + others
    samples = [shapes.sample(seed) for seed in seeds]
    data = {"images": np.stack([s.image for s in samples])}
    if kind == "depth":
        data["depth"] = np.stack([s.depth for s in samples]).astype(np.float16)
    else:
        data["keypoints"] = np.stack([s.keypoints for s in samples])
    print(f"rendered {len(samples)} training scenes in {time.time() - started:.0f} s", flush=True)
    if vae is not None:
        # Spread evenly over the set, so the round trips hold scenes with and without a person alike.
        data["vae_index"] = (
            np.linspace(0, len(samples) - 1, min(config.vae_scenes, len(samples))).round().astype(np.int64)
        )
        data["images_vae"] = vae_round_trip(vae, data["images"][data["vae_index"]])
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **data)
    return data


def _gaussian_kernel(sigma: float, radius: int = 3) -> torch.Tensor:
    taps = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2 / (2 * max(sigma, 1e-3) ** 2))
    return taps / taps.sum()


def augment(images: torch.Tensor, generator: torch.Generator, low_contrast_share: float = 0.0) -> torch.Tensor:
    """Photometric and resampling noise: (B, 3, 64, 64) in [-1, 1] -> same. Geometry is unchanged.

    Generated pictures are softer than renders (the VAE decoder blurs edges and bleeds colour), so half of
    each batch is blurred (Gaussian, sigma up to 1.5 px) and a third of batches is resized down and back.
    """
    b = images.shape[0]

    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand((b, *shape), generator=generator)

    x = images * uniform(0.8, 1.2, 1, 1, 1) + uniform(-0.15, 0.15, 1, 1, 1) + uniform(-0.05, 0.05, 3, 1, 1)
    if low_contrast_share > 0:  # washed-out pictures: less contrast around the mean colour, less saturation
        washed = torch.rand((b, 1, 1, 1), generator=generator) < low_contrast_share
        mean = x.mean(dim=(2, 3), keepdim=True)
        grey = x.mean(dim=1, keepdim=True)
        faded = mean + uniform(0.35, 1, 1, 1, 1) * (x - mean)
        faded = grey + uniform(0.3, 1, 1, 1, 1) * (faded - grey)
        x = torch.where(washed, faded, x)
    if torch.rand((), generator=generator) < 0.33:
        size = int(torch.randint(20, 57, (), generator=generator))
        x = F.interpolate(F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False),
                          size=images.shape[-1], mode="bilinear", align_corners=False)
    # Separable Gaussian blur with one sigma per batch, blended into a random half of the samples.
    taps = _gaussian_kernel(float(torch.empty(()).uniform_(0.5, 1.5, generator=generator)))
    padded = F.pad(x, (3, 3, 3, 3), mode="replicate")
    blurred = F.conv2d(padded, taps.view(1, 1, 1, 7).expand(3, 1, 1, 7), groups=3)
    blurred = F.conv2d(blurred, taps.view(1, 1, 7, 1).expand(3, 1, 7, 1), groups=3)
    mix = uniform(0.3, 1, 1, 1, 1) * (torch.rand((b, 1, 1, 1), generator=generator) < 0.5)
    x = x * (1 - mix) + blurred * mix
    x = x + torch.randn(x.shape, generator=generator) * uniform(0, 0.08, 1, 1, 1)
    return x.clamp(-1.2, 1.2)


@torch.no_grad()
def vae_round_trip(vae_path: Path, images: np.ndarray, chunk: int = 128) -> np.ndarray:
    """(N, 64, 64, 3) uint8 pictures after the Shapes VAE's encode -> decode: what generated pictures look like."""
    from diffusers import AutoencoderKL

    from training.common import images_to_tensor, tensor_to_images

    vae = AutoencoderKL.from_pretrained(vae_path).eval()
    started, out = time.time(), []
    for first in range(0, len(images), chunk):
        latents = vae.encode(images_to_tensor(images[first:first + chunk])).latent_dist.mode()
        out.append(tensor_to_images(vae.decode(latents).sample))
        if first // chunk % 20 == 0:
            print(f"VAE round trip {first + len(out[-1])}/{len(images)} ({time.time() - started:.0f} s)", flush=True)
    return np.concatenate(out)


# ----------------------------------------------------------------------------- losses

def depth_loss(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """L1 everywhere + 0.5 * relative error where depth > 0. pred, true: (B, 64, 64)."""
    valid = true > 0
    relative = ((pred - true).abs() / true.clamp(min=0.05))[valid].mean() if valid.any() else pred.sum() * 0
    return (pred - true).abs().mean() + 0.5 * relative


def pose_loss(points, visibility_logits, heatmap_logits, keypoints, config: AnnotatorTrainConfig):
    """points (B, K, 2) px, visibility_logits (B, K), heatmap_logits (B, K, h, w); keypoints (B, K, 3) targets."""
    visible = keypoints[..., 2]  # (B, K)
    b, k, h, w = heatmap_logits.shape
    cell = shapes.IMAGE_SIZE / w
    visibility = F.binary_cross_entropy_with_logits(visibility_logits, visible)
    if visible.sum() == 0:
        return visibility, {"visibility": visibility.item()}
    coordinate = ((points - keypoints[..., :2]).abs().sum(-1) / cell * visible).sum() / visible.sum()
    # Cross-entropy against a Gaussian around each true keypoint (in cells): early, sharp localisation.
    centres = (torch.arange(w, dtype=points.dtype) + 0.5)
    gx = torch.exp(
        -((centres.view(1, 1, 1, w) - keypoints[..., 0, None, None] / cell) ** 2) / (2 * config.heatmap_sigma_cells**2)
    )
    gy = torch.exp(
        -((centres.view(1, 1, h, 1) - keypoints[..., 1, None, None] / cell) ** 2) / (2 * config.heatmap_sigma_cells**2)
    )
    target = (gx * gy).flatten(2)
    target = target / target.sum(-1, keepdim=True).clamp(min=1e-8)
    heat = -(target * heatmap_logits.flatten(2).log_softmax(-1)).sum(-1)  # (B, K)
    heat = (heat * visible).sum() / visible.sum()
    total = coordinate + config.heatmap_weight * heat + visibility
    return total, {"coordinate_px": coordinate.item() * cell, "heatmap": heat.item(), "visibility": visibility.item()}


# ----------------------------------------------------------------------------- evaluation

class HeldOut:
    """Held-out renders (seeds from HELD_OUT_SEED up), built once per run."""

    def __init__(self, kind: str, count: int, vae: Path | None = None):
        from training import evaluate

        self.kind = kind
        if kind == "depth":
            self.images, self.depth = evaluate.held_out_depth_set(count)
        else:
            self.images, self.keypoints, self.sizes = evaluate.held_out_pose_set(count)
        self.images_vae = vae_round_trip(vae, self.images) if vae is not None else None

    def score(self, model) -> dict[str, float]:
        """Scores on the renders; with a VAE also on their round trips (suffix _vae_round_trip)."""
        from training import evaluate

        model.eval()
        result = {}
        for suffix, images in (("", self.images), ("_vae_round_trip", self.images_vae)):
            if images is None:
                continue
            if self.kind == "depth":
                pred = annotators.predict_depth(model, images)
                result[f"abs_rel{suffix}"] = evaluate.depth_abs_rel(pred, self.depth)
                result[f"mae{suffix}"] = float(np.abs(pred - self.depth).mean())
            else:
                pred = annotators.predict_keypoints(model, images)
                result[f"pck{suffix}"] = evaluate.pck(pred, self.keypoints, self.sizes)
                result[f"pck_0.05{suffix}"] = evaluate.pck(pred, self.keypoints, self.sizes, alpha=0.05)
        model.train()
        return result

    def grid(self, model, path: Path, count: int = 16) -> None:
        """Rows of (picture, prediction, truth) for the first `count` held-out scenes."""
        model.eval()
        images = self.images[:count]
        if self.kind == "depth":
            pred = [shapes.depth_to_image(d) for d in annotators.predict_depth(model, images)]
            true = [shapes.depth_to_image(d) for d in self.depth[:count]]
        else:
            pred = [shapes.pose_to_image(k) for k in annotators.predict_keypoints(model, images)]
            true = [shapes.pose_to_image(k) for k in self.keypoints[:count]]
        model.train()
        rows = [np.stack(list(images)), np.stack(pred), np.stack(true)]
        save_grid(np.concatenate(rows), path, columns=count)


def _git_commit() -> str | None:
    """The repository's commit, recorded with each export so a run can be traced to its code."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def meets_target(kind: str, scores: dict[str, float]) -> bool:
    key, bar, sense = TARGETS[kind]
    value = scores.get(key, float("nan"))
    return value <= bar if sense == "<=" else value >= bar


# ----------------------------------------------------------------------------- training

def schedule_segments(segments: list[dict], max_steps: int, step: int) -> list[dict]:
    """The run's learning-rate schedule so far: one entry per stretch of steps trained with one --max-steps
    (the cosine's length), e.g. [{"max_steps": 3000, "until": 250}, {"max_steps": 1200, "until": 1200}]. The
    model card's Reproduce commands repeat each stretch (`--max-steps M --stop-at U`)."""
    segments = [dict(s) for s in segments]
    if segments and segments[-1]["max_steps"] == max_steps:
        segments[-1]["until"] = step
    else:
        segments.append({"max_steps": max_steps, "until": step})
    return segments


def train(kind: str, out_dir: Path, max_steps: int, config: AnnotatorTrainConfig, *, log_every: int = 25,
          eval_every: int = 250, seed: int = 0, stop_at_target: bool = False, vae: Path | None = None,
          stop_at: int | None = None) -> dict:
    """Train to `max_steps` (the cosine schedule's length), or stop early at step `stop_at` on that schedule:
    a later run with another --max-steps resumes from there on its own schedule."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    # 1. Training set (rendered once; with a VAE also round-tripped through it) and held-out set.
    data = build_dataset(kind, config, out_dir / "data.npz", vae)
    images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2)  # (N, 3, 64, 64) uint8
    images_vae = (
        torch.from_numpy(data["images_vae"]).permute(0, 3, 1, 2) if vae is not None else None
    )  # (V, 3, 64, 64)
    vae_index = torch.from_numpy(data["vae_index"]) if vae is not None else None  # (V,) their rows in `images`
    targets = torch.from_numpy(data["depth"].astype(np.float32) if kind == "depth" else data["keypoints"])
    held_out = HeldOut(kind, config.eval_count, vae)

    # 2. Model and optimiser; resume if a checkpoint exists.
    net_config = annotators.CONFIGS[kind]()
    model = annotators.build_model(kind, net_config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    step, seconds, checkpoint, scores, history, segments = 0, 0.0, Checkpoint(out_dir), {}, [], []
    state = checkpoint.load()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, seconds, history = state["step"], state["seconds"], state.get("history", [])
        segments = state.get("segments", [])
        print(f"resumed from {checkpoint.path} at step {step}")
    end = min(max_steps, stop_at) if stop_at else max_steps  # the last step of this run
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"{kind} annotator: {type(model).__name__} {parameters / 1e3:.0f} k parameters, {len(images)} training scenes",
        flush=True,
    )
    log = LossLog(out_dir, ["loss", "lr", "coordinate_px", "visibility", TARGETS[kind][0]])
    generator = torch.Generator().manual_seed(seed + step)
    last = time.time()

    while step < end:
        # 3. A batch, augmented; depth also flips left-right (the world has no handedness in depth).
        index = torch.randint(0, len(images), (config.batch_size,), generator=generator)
        pictures = images[index]
        if images_vae is not None:  # swap part of the batch for round-tripped pictures (and their targets)
            from_vae = torch.rand(config.batch_size, generator=generator) < config.vae_share
            pick = torch.randint(0, len(images_vae), (config.batch_size,), generator=generator)
            index = torch.where(from_vae, vae_index[pick], index)
            pictures = torch.where(from_vae[:, None, None, None], images_vae[pick], pictures)
        x = augment(pictures.float().div(127.5).sub(1), generator, config.low_contrast_share)
        y = targets[index]
        if kind == "depth":
            flip = torch.rand(config.batch_size, generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            y = torch.where(flip[:, None, None], y.flip(-1), y)
            loss, parts = depth_loss(model(x)[:, 0], y), {}
        else:
            points, visibility, heatmaps = model(x)
            loss, parts = pose_loss(points, visibility, heatmaps, y, config)

        # 4. Warm-up, then cosine decay.
        progress = min(1.0, step / max(max_steps, 1))
        lr = config.learning_rate * min(1.0, (step + 1) / config.warmup_steps) * (
            config.final_lr_fraction + (1 - config.final_lr_fraction) * 0.5 * (1 + np.cos(np.pi * progress)))
        optimizer_step(opt, loss, lr=lr, clip=model.parameters())
        step += 1
        now = time.time()
        seconds += now - last
        last = now

        # 5. Held-out score, sample grid, export and checkpoint.
        if due(step, eval_every, end):
            scores = held_out.score(model)
            segments = schedule_segments(segments, max_steps, step)
            history.append({"step": step, "seconds": round(seconds, 1), **{k: round(v, 5) for k, v in scores.items()}})
            held_out.grid(model, out_dir / "samples" / f"step-{step:06d}.png")
            annotators.save_model(model, kind, net_config, out_dir / "annotator", steps=step,
                                  train_seconds=round(seconds), parameters=parameters, held_out=scores,
                                  train=asdict(config), vae=str(vae) if vae else None, history=history,
                                  code_commit=_git_commit(), schedule=segments)
            checkpoint.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "seconds": seconds,
                             "history": history, "config": asdict(config), "segments": segments})
            print(f"step {step}: held-out {scores} ({seconds / 60:.1f} min of training)", flush=True)
            if stop_at_target and meets_target(kind, scores):
                log.write(step, loss=loss.item(), lr=lr, **parts, **{TARGETS[kind][0]: scores[TARGETS[kind][0]]})
                print(f"target {TARGETS[kind]} reached at step {step}", flush=True)
                break
            last = time.time()  # evaluation time is not training time
        if due(step, log_every, end):
            log.write(
                step, loss=loss.item(), lr=lr, **parts, **{k: v for k, v in scores.items() if k == TARGETS[kind][0]}
            )
            scores = {}
    return {"step": step, "seconds": seconds, "history": history}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=annotators.KINDS, required=True)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="run folder (default runs/annotator-KIND): checkpoint, log, samples, annotator/",
    )
    parser.add_argument(
        "--max-steps", type=int, default=1500, help="train until this step (resumes from the checkpoint)"
    )
    parser.add_argument("--train-scenes", type=int, default=AnnotatorTrainConfig.train_scenes)
    parser.add_argument("--batch-size", type=int, default=AnnotatorTrainConfig.batch_size)
    parser.add_argument(
        "--eval-count", type=int, default=AnnotatorTrainConfig.eval_count, help="held-out scenes per evaluation"
    )
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument(
        "--stop-at-target", action="store_true", help=f"stop at the first evaluation that meets {TARGETS}"
    )
    parser.add_argument(
        "--vae",
        type=Path,
        default=None,
        help="a Shapes VAE folder: also train (and score) on pictures after its encode/decode, "
        "as generated pictures look",
    )
    parser.add_argument("--low-contrast-share", type=float, default=AnnotatorTrainConfig.low_contrast_share,
                        help="share of samples washed out (contrast/saturation reduced), for weak VAE decoders")
    parser.add_argument(
        "--vae-scenes",
        type=int,
        default=AnnotatorTrainConfig.vae_scenes,
        help="training pictures round-tripped through --vae",
    )
    parser.add_argument("--stop-at", type=int, default=None,
                        help="stop at this step on the --max-steps schedule (a later run resumes on its own)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    config = AnnotatorTrainConfig(
        train_scenes=args.train_scenes,
        batch_size=args.batch_size,
        eval_count=args.eval_count,
        vae_scenes=args.vae_scenes,
        low_contrast_share=args.low_contrast_share,
    )
    train(args.kind, args.out or Path(f"runs/annotator-{args.kind}"), args.max_steps, config,
          log_every=args.log_every, eval_every=args.eval_every, stop_at_target=args.stop_at_target, vae=args.vae,
          stop_at=args.stop_at)


if __name__ == "__main__":
    main()
