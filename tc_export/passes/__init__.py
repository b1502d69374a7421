"""Graph passes that insert token compression, and the method registry (one entry per method).

Every module in this package is imported here, so a method registers itself (``@register_method``) in its own
file and needs no edit anywhere else.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Sequence

from ..errors import ConfigError
from .adjacent import AdjacentConfig
from .base import GraphPass, LayerTokens, PassResult, run_passes
from .methods import METHODS, MethodSpec, config_from_dict, config_to_dict, register_method
from .prumerge import PruMergeConfig
from .site import Site
from .token_pass import TokenMethod, TokenPass
from .tome import ToMeConfig
from .topk import TopKConfig

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def token_pass(configs: Sequence[object], features: int | None = None, frames: int | None = None,
               emit_positions: bool = False, unit: int | None = None) -> TokenPass:
    """One pass applying every method config (a multi-stage recipe) in a single walk over the layers."""
    known = tuple(spec.config_type for _, spec in METHODS.items())
    for config in configs:
        if not isinstance(config, known):
            raise ConfigError(
                f"no method takes a {type(config).__name__}: known methods {', '.join(METHODS.names())}"
            )
    return TokenPass(list(configs), features=features, frames=frames,  # type: ignore[arg-type]
                     emit_positions=emit_positions, unit=unit)


__all__ = [
    "METHODS",
    "AdjacentConfig",
    "GraphPass",
    "LayerTokens",
    "MethodSpec",
    "PassResult",
    "PruMergeConfig",
    "Site",
    "ToMeConfig",
    "TokenMethod",
    "TokenPass",
    "TopKConfig",
    "config_from_dict",
    "config_to_dict",
    "register_method",
    "run_passes",
    "token_pass",
]
