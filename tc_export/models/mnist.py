"""``mnist_vit``: a small timm ViT trained in this repository on real MNIST digits, with its weights shipped.

A convolutional stem, then 14 x 14 patches of 2 x 2 pixels plus a class token give 197 tokens, as in ViT-B/16 at
224 px, so token schedules have the same shape. Trained by ``benchmarks/train_mnist_vit.py`` on the fixed
4,000-digit training split of ``tc_export.data.mnist`` (held-out accuracy 95.3%, in the file's metadata); compressed
variants are measured against it with ``tc_export.data.mnist.mnist_accuracy``. MNIST is easy: see that module for
what that means for transfer (ToMe at its maximum rate here, 197 -> 14 tokens, loses 0.1 points).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from timm.layers import PatchEmbed
from torch import nn

from ..data.mnist import heldout_split, mnist_accuracy
from ..errors import ConfigError
from .base import InputSpec, LoadedModel
from .registry import ModelOptions, register_model
from .weights import load_weights

__all__ = ["MNIST_VIT_CONFIG", "WEIGHTS_FILE", "build_mnist_vit", "build_mnist_vit_module", "heldout_split",
           "mnist_accuracy", "shipped_config"]

# The exact architecture of the shipped weights: timm.models.vision_transformer.VisionTransformer arguments, plus
# "stem_channels": the widths of the 3 x 3 convolutions in front of the 2 x 2 patch projection (ConvStemPatchEmbed).
MNIST_VIT_CONFIG: dict[str, object] = {
    "img_size": 28,
    "patch_size": 2,
    "in_chans": 1,
    "num_classes": 10,
    "embed_dim": 64,
    "depth": 4,
    "num_heads": 2,
    "mlp_ratio": 2.0,
    "class_token": True,
    "global_pool": "token",
    "stem_channels": [16, 16],
}
WEIGHTS_FILE = Path(__file__).resolve().parent.parent / "data" / "mnist_vit.safetensors"


class ConvStemPatchEmbed(PatchEmbed):
    """timm's PatchEmbed behind a small convolutional stem (3 x 3 convolutions + GELU, same resolution).

    Early convolutions make a ViT learn from few images in far fewer steps (Xiao et al., 2021, "Early
    convolutions help transformers see better"); the token sequence and every block are unchanged, so
    token compression sees a plain ViT with 197 tokens.
    """

    def __init__(self, *args: Any, in_chans: int = 1, stem_channels: Sequence[int] = (16, 16), **kwargs: Any):
        super().__init__(*args, in_chans=stem_channels[-1], **kwargs)
        layers: list[nn.Module] = []
        for width in stem_channels:
            layers += [nn.Conv2d(in_chans, width, kernel_size=3, padding=1), nn.GELU()]
            in_chans = width
        self.stem = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.stem(x))


def build_mnist_vit_module(config: dict[str, object] | None = None) -> nn.Module:
    """The untrained architecture (a timm VisionTransformer with a convolutional stem), in eval mode."""
    from timm.models.vision_transformer import VisionTransformer

    options = dict(config or MNIST_VIT_CONFIG)
    stem = tuple(options.pop("stem_channels"))
    return VisionTransformer(**options, embed_layer=functools.partial(ConvStemPatchEmbed, stem_channels=stem)).eval()


def shipped_config() -> dict[str, object]:
    """The architecture recorded in the shipped weights file's metadata."""
    from safetensors import safe_open

    with safe_open(str(WEIGHTS_FILE), framework="pt") as handle:
        return json.loads((handle.metadata() or {}).get("config", "{}"))


@register_model("mnist_vit", "ViT (197 tokens, 4 x 64, conv stem) trained on 4,000 real MNIST digits, real weights")
def build_mnist_vit(options: ModelOptions) -> LoadedModel:
    """The trained model; example inputs are held-out digits (seeded), never training ones."""
    from ..data.mnist import IMAGE_SHAPE, heldout_inputs

    if options.img_size not in (None, IMAGE_SHAPE[-1]):
        raise ConfigError(f"mnist_vit takes {IMAGE_SHAPE[-1]} px digits only, not --img-size {options.img_size}")
    if options.pretrained:
        raise ConfigError("mnist_vit always loads its shipped weights: drop --pretrained")
    if options.weights is None and not WEIGHTS_FILE.is_file():
        raise ConfigError(f"mnist_vit's shipped weights {WEIGHTS_FILE} are missing: run benchmarks/train_mnist_vit.py")
    module = build_mnist_vit_module()
    load_weights(module, options.weights or WEIGHTS_FILE)
    return LoadedModel(
        name="mnist_vit",
        module=module.eval(),
        inputs=[InputSpec("x", IMAGE_SHAPE, onnx_name="pixel_values")],
        output_names=["logits"],
        random_init=False,
        make_inputs=heldout_inputs,
    )
