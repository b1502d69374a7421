"""What a model loader returns: the module and a description of its inputs and outputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .seeding import DEFAULT_WEIGHTS_SEED


@dataclass(frozen=True)
class InputSpec:
    """One model input: its forward-argument name, ONNX name, shape without batch, dtype and value range."""

    name: str
    shape: tuple[int, ...]  # without the batch dimension
    dtype: torch.dtype = torch.float32
    onnx_name: str | None = None
    low: float = 0.0  # for integer inputs: values drawn from [low, high)
    high: float = 1.0

    @property
    def export_name(self) -> str:
        return self.onnx_name or self.name

    def random(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        shape = (batch, *self.shape)
        if self.dtype.is_floating_point:
            return torch.randn(shape, generator=generator, dtype=self.dtype)
        return torch.randint(int(self.low), int(self.high), shape, generator=generator, dtype=self.dtype)


@dataclass
class LoadedModel:
    """A model ready for passes: the eval-mode module, its inputs, output names, and how it was made."""

    name: str
    module: nn.Module
    inputs: list[InputSpec]
    output_names: list[str] = field(default_factory=lambda: ["logits"])
    random_init: bool = True
    make_inputs: Callable[[int, int], dict[str, torch.Tensor]] | None = None  # custom (batch, seed) -> inputs
    frames: int | None = None  # a video wrapper: the tower runs on each of this many frames
    # A tower whose own window projector ends ``module`` (Qwen-VL's merger): (the module without it, the projector as
    # a stage). Compressing runs that module with the projector appended after the methods, at merge units.
    own_projector: tuple[nn.Module, Any] | None = None
    compression_refusal: str | None = None  # why it compresses only through own_projector, or not at all
    weights_seed: int = DEFAULT_WEIGHTS_SEED  # the seed of its random weights and of any projector's (seeding.py)

    def example_inputs(self, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
        """Seeded inputs keyed by forward-argument name."""
        if self.make_inputs is not None:
            return self.make_inputs(batch, seed)
        generator = torch.Generator().manual_seed(seed)
        return {spec.name: spec.random(batch, generator) for spec in self.inputs}
