"""Video: a per-frame tower over (B, T, C, H, W) clips, so towers and projectors run on every frame, statically."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .base import InputSpec, LoadedModel


class FrameTower(nn.Module):
    """Runs ``tower`` on each of ``frames`` frames: (B, T, ...) -> the tower's output per frame, (B, T, ...)."""

    def __init__(self, tower: nn.Module, frames: int) -> None:
        super().__init__()
        self.tower, self.frames = tower, frames

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.tower(video.flatten(0, 1)).unflatten(0, (-1, self.frames))


def video_model(loaded: LoadedModel, frames: int) -> LoadedModel:
    """``loaded`` (one image input) as a video model with ``frames`` frames per clip."""
    if frames < 1:
        raise ConfigError(f"--frames must be >= 1, got {frames}")
    if len(loaded.inputs) != 1 or len(loaded.inputs[0].shape) != 3 or loaded.make_inputs is not None:
        raise ConfigError(f"--frames needs an image model with one (C, H, W) input; {loaded.name} is not one")
    spec = loaded.inputs[0]
    video = InputSpec("video", (frames, *spec.shape), spec.dtype, onnx_name="video")
    return LoadedModel(f"{loaded.name} x{frames} frames", FrameTower(loaded.module, frames).eval(), [video],
                       loaded.output_names, loaded.random_init, None, frames, loaded.weights_seed)
