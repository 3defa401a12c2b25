"""What every training script shares: data seeds, the optimiser step, checkpoints, logs and sample grids."""
from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

# Training scenes use seeds below HELD_OUT_SEED; evaluation draws its scenes from HELD_OUT_SEED up,
# so no held-out image is ever seen in training.
HELD_OUT_SEED = 1_000_000_000
REPO = Path(__file__).resolve().parent.parent
SHIPPED_BASE = REPO / "assets" / "models" / "shapes-ldm"  # the built-in pipeline: what the trainers start from


def repo_relative(path: Path) -> str:
    """`path` relative to the repository when it lies inside (what a training record stores, so that its command
    runs from any clone), else as given."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


# A pipeline folder's training step, and the step its text encoder last changed at (absent: the same). Models that
# read the base's text states (the inpainting U-Net, the ControlNets) fit any base whose text step is theirs.
STEP_FILE, TEXT_STEP_FILE = "TRAINING_STEP", "TEXT_ENCODER_STEP"


def folder_step(folder: Path, *, text: bool = False) -> str:
    """A pipeline folder's TRAINING_STEP (`text`: its TEXT_ENCODER_STEP, else the same), or "?" if it has none."""
    for name in ((TEXT_STEP_FILE, STEP_FILE) if text else (STEP_FILE,)):
        path = Path(folder) / name
        if path.exists():
            return path.read_text().strip()
    return "?"


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def tensor_to_images(tensor: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) float in [-1, 1] -> (N, H, W, 3) uint8."""
    return tensor.clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: np.ndarray, path: Path, columns: int = 8, scale: int = 2) -> None:
    from PIL import Image

    n, h, w, _ = images.shape
    rows = -(-n // columns)
    sheet = np.full((rows * h, columns * w, 3), 255, np.uint8)
    for i, image in enumerate(images):
        sheet[(i // columns) * h:(i // columns + 1) * h, (i % columns) * w:(i % columns + 1) * w] = image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).resize((columns * w * scale, rows * h * scale), Image.NEAREST).save(path)


class Checkpoint:
    """One resumable file per run: `save` writes atomically, `load` returns None on a fresh start."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / "checkpoint.pt"

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        return torch.load(self.path, map_location="cpu", weights_only=False)

    def save(self, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".tmp")
        torch.save(state, partial)
        os.replace(partial, self.path)


class LossLog:
    """Appends one CSV row per logged step and echoes it, with seconds per step since the last row."""

    def __init__(self, out_dir: Path, fields: list[str]):
        self.path = Path(out_dir) / "log.csv"
        self.fields = ["step", "s_per_step"] + fields
        self.last_time, self.last_step = time.time(), None
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(self.fields)

    def write(self, step: int, **values: float) -> None:
        now = time.time()
        per_step = (
            (now - self.last_time) / (step - self.last_step)
            if self.last_step is not None and step > self.last_step
            else float("nan")
        )
        self.last_time, self.last_step = now, step
        row = [step, f"{per_step:.3f}"] + [f"{values.get(k, float('nan')):.5g}" for k in self.fields[2:]]
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow(row)
        print(" ".join(f"{k}={v}" for k, v in zip(self.fields, row)), flush=True)


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, *, lr: float | None = None,
                   clip: Iterable[torch.nn.Parameter] | None = None, max_norm: float = 1.0) -> None:
    """One optimiser step on `loss`: the learning rate `lr` on every parameter group (when given), fresh
    gradients, backpropagation, the gradient norm of `clip` limited to `max_norm` (when given), the update."""
    if lr is not None:
        for group in opt.param_groups:
            group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, max_norm)
    opt.step()


def due(step: int, every: int, last: int) -> bool:
    """Whether something done every `every` steps (0: never) is due after `step`; always at the `last` step."""
    return bool(every) and (step % every == 0 or step == last)
