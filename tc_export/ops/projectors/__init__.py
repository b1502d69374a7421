"""Projectors for vision-language towers: static modules from (channels, grid, prefix, **settings).

Each takes (B, prefix + H*W, C) tokens (LLaMA-VID also takes text queries) and returns (B, M, D), with
``tokens_out()``, ``channels_out()``, ``output_grid()``, ``prefix_out()`` and ``reset_parameters()``.
``PROJECTORS`` maps the method name to its class.
"""

from .base import Projector
from .cabstractor import CAbstractor, adaptive_pool_matrix
from .llamavid import LlamaVidProjector
from .mlp import MLPProjector
from .patchmerger import PatchMergerProjector
from .pool import PoolProjector
from .resampler import ResamplerProjector, sincos_2d
from .unshuffle import UnshuffleProjector
from .vlm_connectors import Gemma3Projector, Idefics3Projector, Llama4Projector

PROJECTORS: dict[str, type[Projector]] = {
    "pool": PoolProjector,
    "unshuffle": UnshuffleProjector,
    "patchmerger": PatchMergerProjector,
    "cabstractor": CAbstractor,
    "llamavid": LlamaVidProjector,
    "resampler": ResamplerProjector,
    "mlp": MLPProjector,
    "idefics3": Idefics3Projector,
    "llama4": Llama4Projector,
    "gemma3": Gemma3Projector,
}

__all__ = [
    "PROJECTORS",
    "CAbstractor",
    "Gemma3Projector",
    "Idefics3Projector",
    "Llama4Projector",
    "LlamaVidProjector",
    "MLPProjector",
    "PatchMergerProjector",
    "PoolProjector",
    "Projector",
    "ResamplerProjector",
    "UnshuffleProjector",
    "adaptive_pool_matrix",
    "sincos_2d",
]
