"""Learned annotators for Shapes-world pictures: image -> depth map, image -> OpenPose keypoints.

They turn a picture into the control map a ControlNet needs, like controlnet-aux's MiDaS and OpenPose do
for photos, but small enough to train here in minutes (`python -m training.train_annotators`):

- depth: a small U-Net, 64x64 RGB (+ 2 coordinate channels) -> 64x64 depth in [0, 1], 1 = near
  (the world's and ControlNet's convention); the coordinate channels let it learn that the ground
  plane comes nearer toward the bottom edge.
- pose: a strided conv net with dilated residual blocks -> 18 heatmaps at 16x16, soft-argmax to
  sub-pixel (x, y) keypoints in the OpenPose body-18 order, plus 18 visibility logits from pooled
  features (all zero when the picture has no person). The map is drawn by controlnet-aux's own
  `draw_bodypose`, so it matches `training.shapes.pose_to_image` and the Hub's OpenPose ControlNets.

Any input size works: the picture is resized to 64x64 for the net and the map is made at the input's size.
Saved as `model.safetensors` + `config.json` in one folder per kind. The networks live here, with the app,
because both sides need them: `load_annotator(kind, folder)` serves the engine (pipelines/engine.py), the
rest serves the trainer and the evaluation (training/train_annotators.py, training/evaluate.py).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from pipelines.world import IMAGE_SIZE, NUM_KEYPOINTS

KINDS = ("depth", "pose")
INPUT_SIZE = IMAGE_SIZE  # the nets see 64x64 pictures, as the world renders them
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
POSE_DRAW_TARGET = 512  # skeletons are drawn on a canvas of about this long side, then resized (stick width)


# ----------------------------------------------------------------------------- networks

def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels // 4), channels)


class ConvBlock(nn.Sequential):
    """conv3x3 -> GroupNorm -> SiLU, optionally strided or dilated."""

    def __init__(self, cin: int, cout: int, *, stride: int = 1, dilation: int = 1):
        super().__init__(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation), _norm(cout), nn.SiLU())


class ResBlock(nn.Module):
    def __init__(self, channels: int, dilation: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            ConvBlock(channels, channels, dilation=dilation),
            nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation),
            _norm(channels),
        )

    def forward(self, x):
        return F.silu(x + self.body(x))


def with_coordinates(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 5, H, W): appends x and y in [-1, 1] (CoordConv), so position is learnable."""
    b, _, h, w = images.shape
    ys = torch.linspace(-1, 1, h, dtype=images.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
    xs = torch.linspace(-1, 1, w, dtype=images.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
    return torch.cat([images, xs, ys], dim=1)


@dataclass
class DepthConfig:
    channels: tuple = (16, 32, 48, 64)  # 64, 32, 16, 8 px levels


class DepthNet(nn.Module):
    """A small U-Net: (B, 3, 64, 64) in [-1, 1] -> (B, 1, 64, 64) depth in [0, 1]."""

    def __init__(self, config: DepthConfig):
        super().__init__()
        c = list(config.channels)
        self.stem = nn.Sequential(ConvBlock(5, c[0]), ConvBlock(c[0], c[0]))
        self.down = nn.ModuleList(
            nn.Sequential(ConvBlock(c[i], c[i + 1], stride=2), ConvBlock(c[i + 1], c[i + 1]))
            for i in range(len(c) - 1)
        )
        self.middle = ResBlock(c[-1], dilation=2)
        self.up = nn.ModuleList(
            nn.Sequential(ConvBlock(c[i + 1] + c[i], c[i]), ConvBlock(c[i], c[i])) for i in reversed(range(len(c) - 1))
        )
        self.head = nn.Conv2d(c[0], 1, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(with_coordinates(images))  # (B, c0, 64, 64)
        skips = [x]
        for block in self.down:
            x = block(x)
            skips.append(x)
        x = self.middle(skips.pop())  # (B, c3, 8, 8)
        for block in self.up:
            skip = skips.pop()
            x = block(
                torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False), skip], 1)
            )
        return torch.sigmoid(self.head(x))  # (B, 1, 64, 64)


@dataclass
class PoseConfig:
    channels: tuple = (24, 48, 64)  # 64, 32, 16 px levels; heatmaps live on the last
    residual_dilations: tuple = (1, 2, 4, 2)  # receptive field over the whole 40-px figure at 16x16
    keypoints: int = NUM_KEYPOINTS


class PoseNet(nn.Module):
    """(B, 3, 64, 64) -> keypoints (B, K, 2) in 64-px pixel coordinates, visibility logits (B, K), heatmap logits."""

    def __init__(self, config: PoseConfig):
        super().__init__()
        c = list(config.channels)
        layers: list[nn.Module] = [ConvBlock(5, c[0])]
        for i in range(len(c) - 1):
            layers += [ConvBlock(c[i], c[i + 1], stride=2)]
        layers += [ResBlock(c[-1], d) for d in config.residual_dilations]
        self.features = nn.Sequential(*layers)
        self.heatmaps = nn.Conv2d(c[-1], config.keypoints, 1)
        self.visibility = nn.Linear(c[-1], config.keypoints)

    def forward(self, images: torch.Tensor):
        features = self.features(with_coordinates(images))  # (B, C, 16, 16)
        logits = self.heatmaps(features)  # (B, K, 16, 16)
        b, k, h, w = logits.shape
        probabilities = logits.flatten(2).softmax(-1).view(b, k, h, w)
        cell = images.shape[-1] / w  # 4 px per heatmap cell at 64x64
        xs = (torch.arange(w, dtype=logits.dtype) + 0.5) * cell
        ys = (torch.arange(h, dtype=logits.dtype) + 0.5) * cell
        x = (probabilities.sum(2) * xs).sum(-1)  # soft-argmax: (B, K)
        y = (probabilities.sum(3) * ys).sum(-1)
        visibility = self.visibility(features.mean(dim=(2, 3)))  # (B, K)
        return torch.stack([x, y], -1), visibility, logits


CONFIGS = {"depth": DepthConfig, "pose": PoseConfig}
NETS = {"depth": DepthNet, "pose": PoseNet}


def build_model(kind: str, config=None) -> nn.Module:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not an annotator; choose one of {KINDS}")
    return NETS[kind](config or CONFIGS[kind]())


# ----------------------------------------------------------------------------- save / load

def save_model(model: nn.Module, kind: str, config, folder: Path, **info) -> Path:
    """Writes model.safetensors and config.json (kind, architecture, and any training `info`)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME))
    settings = {"kind": kind, "architecture": type(model).__name__, "input_size": INPUT_SIZE,
                "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}, **info}
    (folder / CONFIG_NAME).write_text(json.dumps(settings, indent=2) + "\n")
    return folder


def load_model(kind: str, folder: Path) -> nn.Module:
    from safetensors.torch import load_file

    folder = Path(folder)
    settings = json.loads((folder / CONFIG_NAME).read_text())
    if settings.get("kind") != kind:
        raise ValueError(f"{folder} holds a {settings.get('kind')!r} annotator, not {kind!r}")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in settings["config"].items()}
    model = build_model(kind, CONFIGS[kind](**fields))
    model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- inference

def to_input(images: np.ndarray) -> torch.Tensor:
    """(N, 64, 64, 3) uint8 -> (N, 3, 64, 64) float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


@torch.no_grad()
def predict_depth(model: DepthNet, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """(N, 64, 64, 3) uint8 -> (N, 64, 64) float32 depth in [0, 1], 1 = near."""
    out = [model(to_input(images[i:i + batch]))[:, 0] for i in range(0, len(images), batch)]
    return torch.cat(out).numpy().astype(np.float32)


@torch.no_grad()
def predict_keypoints(model: PoseNet, images: np.ndarray, batch: int = 64, threshold: float = 0.5) -> np.ndarray:
    """(N, 64, 64, 3) uint8 -> (N, 18, 3) float32: x, y in 64-px pixels and visibility 0/1."""
    out = []
    for i in range(0, len(images), batch):
        points, visibility, _ = model(to_input(images[i:i + batch]))
        visible = (visibility.sigmoid() > threshold).float()
        out.append(torch.cat([points, visible[..., None]], -1))
    return torch.cat(out).numpy().astype(np.float32)


def _as_net_input(image: Image.Image) -> np.ndarray:
    """Any PIL image -> (1, 64, 64, 3) uint8 (resized; aspect ratio is not kept, the map is resized back)."""
    rgb = image.convert("RGB")
    if rgb.size != (INPUT_SIZE, INPUT_SIZE):
        rgb = rgb.resize((INPUT_SIZE, INPUT_SIZE), Image.BICUBIC if min(rgb.size) < INPUT_SIZE else Image.LANCZOS)
    return np.asarray(rgb, np.uint8)[None]


def draw_pose(keypoints: np.ndarray, width: int, height: int) -> np.ndarray:
    """(18, 3) keypoints in pixels of a width x height picture -> (height, width, 3) uint8 OpenPose skeleton.

    Drawn by controlnet-aux's `draw_bodypose` on a canvas about POSE_DRAW_TARGET px on its long side, then
    resized; a 64x64 picture gives exactly `training.shapes.pose_to_image`.
    """
    import cv2
    from controlnet_aux.open_pose.body import Keypoint
    from controlnet_aux.open_pose.util import draw_bodypose

    scale = max(1, math.ceil(POSE_DRAW_TARGET / max(width, height)))
    canvas = np.zeros((height * scale, width * scale, 3), np.uint8)
    if keypoints[:, 2].sum() > 0:
        points = [Keypoint(float(x) / width, float(y) / height) if v > 0 else None for x, y, v in keypoints]
        canvas = draw_bodypose(canvas, points)
    if scale == 1:
        return canvas
    return cv2.resize(canvas, (width, height), interpolation=cv2.INTER_AREA)


class DepthAnnotator:
    """callable(PIL.Image) -> PIL.Image: grey depth map (white = near) the size of the input."""

    kind = "depth"

    def __init__(self, model: DepthNet):
        self.model = model

    def __call__(self, image: Image.Image, **options) -> Image.Image:
        depth = predict_depth(self.model, _as_net_input(image))[0]  # (64, 64)
        grey = Image.fromarray(np.clip(np.round(depth * 255), 0, 255).astype(np.uint8), "L")
        if grey.size != image.size:
            grey = grey.resize(image.size, Image.BILINEAR)
        return grey.convert("RGB")


class PoseAnnotator:
    """callable(PIL.Image, threshold=0.5) -> PIL.Image: OpenPose-colour skeleton on black, the size of the input.

    `threshold` is the visibility probability above which a keypoint is drawn; a picture without a
    person gives a black map.
    """

    kind = "pose"

    def __init__(self, model: PoseNet):
        self.model = model

    def keypoints(self, image: Image.Image, *, threshold: float = 0.5) -> np.ndarray:
        """(18, 3): x, y in the input's pixels and visibility 0/1."""
        points = predict_keypoints(self.model, _as_net_input(image), threshold=threshold)[0]
        points[:, 0] *= image.size[0] / INPUT_SIZE
        points[:, 1] *= image.size[1] / INPUT_SIZE
        return points

    def __call__(self, image: Image.Image, *, threshold: float = 0.5, **options) -> Image.Image:
        width, height = image.size
        return Image.fromarray(draw_pose(self.keypoints(image, threshold=threshold), width, height))


ANNOTATORS = {"depth": DepthAnnotator, "pose": PoseAnnotator}


def load_annotator(kind: str, folder) -> Callable[..., Image.Image]:
    """The engine's hook: the `kind` annotator saved in `folder` as callable(PIL.Image, **options) -> PIL.Image.

    Options the annotator does not use (e.g. the thresholds of the canny preprocessor) are ignored.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} has no learned annotator; choose one of {KINDS} (canny is OpenCV)")
    folder = Path(folder)
    if not (folder / WEIGHTS_NAME).is_file() or not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"no {kind} annotator in {folder}: expected {WEIGHTS_NAME} and {CONFIG_NAME} "
                                f"(train one with `python -m training.train_annotators --kind {kind}`)")
    return ANNOTATORS[kind](load_model(kind, folder))
