"""Graph passes that insert token compression, and the method registry (one entry per method)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..registry import Registry
from .base import GraphPass, LayerTokens, PassResult, run_passes
from .tome import ToMeConfig, ToMePass


@dataclass(frozen=True)
class MethodSpec:
    name: str
    description: str
    config_type: type
    make_pass: Callable[[Any], GraphPass]


METHODS: Registry[MethodSpec] = Registry("method")
METHODS.register("tome", MethodSpec("tome", "ToMe bipartite token merging (--r, --inflect)", ToMeConfig, ToMePass))


def pass_for(config: object) -> GraphPass:
    """The pass for a method config instance."""
    for _, spec in METHODS.items():
        if isinstance(config, spec.config_type):
            return spec.make_pass(config)
    raise ConfigError(f"no method takes a {type(config).__name__}: known methods {', '.join(METHODS.names())}")


__all__ = [
    "METHODS",
    "GraphPass",
    "LayerTokens",
    "MethodSpec",
    "PassResult",
    "ToMeConfig",
    "ToMePass",
    "pass_for",
    "run_passes",
]
