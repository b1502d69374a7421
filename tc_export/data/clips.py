"""Moving-digit clips from the shipped MNIST digits: a real signal of what stays still between frames.

A clip (T, 3, S, S) is a still background (one seeded, smooth texture, the same in every frame) with ``digits``
MNIST digits (each scaled to ``S // 4`` pixels, raw pixel values in [0, 1]) moving at constant seeded velocities
and bouncing off the borders. Only the patches a digit covers or leaves change from one frame to the next; the
rest of the frame repeats exactly. ``frozen`` gives the same clip with every frame equal to the first: everything
after frame 0 is redundant. Pixels are in [0, 1], not normalised for any one tower (a random-weight tower reads
them as they are; a trained one would take its own normalisation first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .mnist import MEAN, STD, train_split


def _background(size: int, generator: torch.Generator) -> torch.Tensor:
    """A smooth seeded texture (3, S, S) in [0.1, 0.5]: low-resolution noise upsampled."""
    coarse = torch.rand(1, 3, 4, 4, generator=generator)
    return 0.1 + 0.4 * F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0]


def moving_digit_clip(frames: int = 8, size: int = 224, digits: int = 2, seed: int = 0, frozen: bool = False,
                      speed: float = 0.06) -> torch.Tensor:
    """A (frames, 3, size, size) clip of ``digits`` MNIST digits moving over a still background.

    ``speed``: each digit's step per frame as a fraction of ``size`` (directions seeded). ``frozen``: every frame
    is frame 0.
    """
    if frames < 1 or size < 8 or digits < 0:
        raise ValueError("frames >= 1, size >= 8 and digits >= 0 are needed")
    generator = torch.Generator().manual_seed(seed)
    background = _background(size, generator)
    images, _ = train_split()
    side = max(4, size // 4)
    picks = torch.randint(0, images.shape[0], (digits,), generator=generator)
    sprites = [F.interpolate((images[i:i + 1] * STD + MEAN).clamp(0, 1), size=(side, side), mode="bilinear",
                             align_corners=False)[0, 0] for i in picks.tolist()]
    span = size - side
    starts = torch.rand(digits, 2, generator=generator) * span
    angles = torch.rand(digits, generator=generator) * 2 * torch.pi
    steps = torch.stack([angles.cos(), angles.sin()], dim=-1) * speed * size
    clip = background.unsqueeze(0).repeat(frames, 1, 1, 1)
    for t in range(frames):
        for index, sprite in enumerate(sprites):
            row, col = (_bounce(float(starts[index, axis] + t * steps[index, axis]), span) for axis in (0, 1))
            region = clip[t, :, row:row + side, col:col + side]
            clip[t, :, row:row + side, col:col + side] = torch.maximum(region, sprite.expand_as(region))
        if frozen:
            return clip[:1].repeat(frames, 1, 1, 1)
    return clip


def _bounce(position: float, span: int) -> int:
    """``position`` reflected into [0, span] (a digit bouncing off the borders), as a whole pixel."""
    if span <= 0:
        return 0
    period = 2 * span
    folded = position % period
    return int(round(folded if folded <= span else period - folded))


def clip_batch(batch: int, frames: int = 8, size: int = 224, seed: int = 0, frozen: bool = False,
               digits: int = 2) -> torch.Tensor:
    """``batch`` clips (B, T, 3, S, S), clip i seeded ``seed + i``: a video model's input."""
    return torch.stack([moving_digit_clip(frames, size, digits, seed + i, frozen) for i in range(batch)])
