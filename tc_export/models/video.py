"""Video: a per-frame tower over (B, T, C, H, W) clips, so towers and projectors run on every frame, statically."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .base import InputSpec, LoadedModel


class FrameTower(nn.Module):
    """Runs ``tower`` on each of ``frames`` frames: (B, T, ...) -> the tower's output per frame, (B, T, ...).

    ``group``: a tower that embeds ``group`` consecutive frames at once (Qwen2-VL's temporal patch of 2: its
    ``frames_per_step``, and it takes such groups once ``grouped_input`` is set) runs on each of T / group steps,
    given (B * T / group, group, ...): its output is per step, (B, T / group, ...).
    """

    def __init__(self, tower: nn.Module, frames: int, group: int = 1) -> None:
        super().__init__()
        self.tower, self.frames, self.group = tower, frames, group
        if group > 1:
            tower.grouped_input = True  # a static switch: fx cannot branch on the input's rank

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        steps = self.frames // self.group
        if self.group > 1:
            return self.tower(video.flatten(0, 1).unflatten(0, (-1, self.group))).unflatten(0, (-1, steps))
        return self.tower(video.flatten(0, 1)).unflatten(0, (-1, steps))


def video_model(loaded: LoadedModel, frames: int) -> LoadedModel:
    """``loaded`` (one image input) as a video model with ``frames`` frames per clip."""
    if frames < 1:
        raise ConfigError(f"--frames must be >= 1, got {frames}")
    if len(loaded.inputs) != 1 or len(loaded.inputs[0].shape) != 3 or loaded.make_inputs is not None:
        raise ConfigError(f"--frames needs an image model with one (C, H, W) input; {loaded.name} is not one")
    group = int(getattr(loaded.module, "frames_per_step", 1))
    if frames % group:
        raise ConfigError(f"--frames {frames}: {loaded.name} embeds {group} consecutive frames at once (its temporal "
                          f"patch), so a clip needs a multiple of {group} frames")
    spec = loaded.inputs[0]
    video = InputSpec("video", (frames, *spec.shape), spec.dtype, onnx_name="video")
    own = None
    if loaded.own_projector is not None:  # a tower with its own merger (Qwen2-VL): the tokens tower per frame too
        module, stage = loaded.own_projector
        own = (FrameTower(module, frames, group).eval(), stage)
    # The token passes see one row per tower step: frames / group of them per clip.
    return LoadedModel(f"{loaded.name} x{frames} frames", FrameTower(loaded.module, frames, group).eval(), [video],
                       loaded.output_names, loaded.random_init, None, frames // group,
                       weights_seed=loaded.weights_seed, own_projector=own)
