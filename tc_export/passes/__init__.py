"""Graph passes that insert token compression, and the method registry (one entry per method)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigError
from ..registry import Registry
from .adjacent import AdjacentConfig
from .base import GraphPass, LayerTokens, PassResult, run_passes
from .prumerge import PruMergeConfig
from .token_pass import TokenMethod, TokenPass
from .tome import ToMeConfig
from .topk import TopKConfig


@dataclass(frozen=True)
class MethodSpec:
    name: str
    description: str
    config_type: type


METHODS: Registry[MethodSpec] = Registry("method")
for _spec in (
    MethodSpec("tome", "ToMe bipartite token merging (--r, --inflect)", ToMeConfig),
    MethodSpec("topk", "Top-K pruning by class attention, EViT (--keep, --layers, --fuse, --keep-order)", TopKConfig),
    MethodSpec("prumerge", "fixed-budget prune-and-merge, PruMerge (--tokens, --extra, --layers)", PruMergeConfig),
    MethodSpec("adjacent", "adjacent pair merging for sequences, A-ToMe fixed ratio (--r, --layers)", AdjacentConfig),
):
    METHODS.register(_spec.name, _spec)


def token_pass(configs: Sequence[object]) -> GraphPass:
    """One pass applying every method config (a multi-stage recipe) in a single walk over the layers."""
    known = tuple(spec.config_type for _, spec in METHODS.items())
    for config in configs:
        if not isinstance(config, known):
            raise ConfigError(
                f"no method takes a {type(config).__name__}: known methods {', '.join(METHODS.names())}"
            )
    return TokenPass(list(configs))  # type: ignore[arg-type]


__all__ = [
    "METHODS",
    "AdjacentConfig",
    "GraphPass",
    "LayerTokens",
    "MethodSpec",
    "PassResult",
    "PruMergeConfig",
    "ToMeConfig",
    "TokenMethod",
    "TokenPass",
    "TopKConfig",
    "run_passes",
    "token_pass",
]
