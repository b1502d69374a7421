"""What every tower adapter shares: the pooling it was asked for, the tower built with its weights (alone or from a
whole VLM checkpoint), and the LoadedModel of its fixed-size image input.

An adapter (``pixtral.py``, ``idefics3.py``, ``siglip2.py``, ``llama4_vision.py``) runs the tower's own modules
batch first on (B, C, H, W) pixels at one size, with every input the tower computes from the image size (position
ids, rotary tables, resized position embeddings, all-true masks) evaluated once by the tower's own code and kept as
a constant.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError
from .base import InputSpec, LoadedModel
from .registry import ModelOptions

OUTPUT_NAMES = {"pooler": "pooler_output", "tokens": "last_hidden_state", "cls": "cls_embedding",
                "mean": "mean_embedding"}


def fixed_size(config: Any, options: ModelOptions, name: str, what: str, unit: int | None = None) -> int:
    """The exported image side: ``--img-size`` or the config's, a multiple of the patch size (or ``unit``)."""
    unit = unit or config.patch_size
    size = options.img_size if options.img_size is not None else config.image_size
    if size % unit:
        raise ConfigError(f"{name}: --img-size {size} is not a multiple of {what} = {unit}")
    return size


def config_size(config: Any, options: ModelOptions, name: str, why: str) -> int:
    """The config's own ``image_size``, the only size the tower takes (``why``: what fixes it)."""
    size = config.image_size
    if options.img_size is not None and options.img_size != size:
        raise ConfigError(f"{name}: --img-size {options.img_size}: {why} {size}, the size exported")
    if size % config.patch_size:
        raise ConfigError(f"{name}: image_size {size} is not a multiple of patch_size {config.patch_size}")
    return size


def build_adapted(name: str, choice: Any, folder: Path | None, options: ModelOptions, poolings: dict[str, str],
                  default: str, make: Callable[[nn.Module, int, str], nn.Module], size: int, tower: str) -> LoadedModel:
    """Build ``choice`` (its weights from ``folder``, else random) and wrap it with ``make(tower, size, pooling)``.
    ``poolings``: the outputs this adapter gives (pooling -> what it is, for the refusal of any other)."""
    from .hf_auto import instantiate, load_given_weights, refuse_pretrained

    pooling = options.pooling or default
    if pooling not in poolings:
        offered = "; ".join(f"{k}: {v}" for k, v in poolings.items())
        raise ConfigError(f"{name}: --pooling {pooling} does not apply to {tower} (it gives {offered})")
    refuse_pretrained(options, name)
    model, random_init = instantiate(choice, folder, name)
    if load_given_weights(model, options, name):
        random_init = False
    adapter = make(model, size, pooling).eval()
    spec = InputSpec("pixel_values", (getattr(choice.config, "num_channels", 3), size, size))
    return LoadedModel(name, adapter, [spec], [OUTPUT_NAMES[pooling]], random_init)
