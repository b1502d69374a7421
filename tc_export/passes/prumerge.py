"""Prune-and-merge's config: a fixed token budget kept by class attention, the rest merged into it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import ConfigError
from ..ops.prumerge import PruMerge
from .token_pass import validate_placement


@dataclass(frozen=True)
class PruMergeConfig:
    """``tokens``: the budget K of unprotected tokens kept at each chosen layer (default: the last layer).

    ``extra``: one more token holding the pruned tokens' class-attention-weighted average.
    """

    method: ClassVar[str] = "prumerge"
    needs_class_token: ClassVar[bool] = True

    tokens: int
    extra: bool = False
    layers: tuple[int, ...] | None = None
    protected: int | None = None
    prop_attn: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1:
            raise ConfigError(f"tokens must be a whole number >= 1 (the budget of kept tokens), got {self.tokens!r}")
        validate_placement(self.method, self.layers, self.protected)

    def default_layers(self, num_layers: int) -> list[int]:
        return [num_layers - 1]

    def check(self, first_tokens: int, protected: int, num_layers: int) -> None:
        if self.tokens >= first_tokens - protected:
            raise ConfigError(
                f"prumerge: tokens={self.tokens} is not below the {first_tokens - protected} unprotected tokens of "
                f"the model; the budget must be at most {first_tokens - protected - 1}"
            )

    def make_op(self, layer: int, num_tokens: int, protected: int, num_layers: int, padded: bool = False) -> PruMerge | None:
        if self.tokens >= num_tokens - protected:
            raise ConfigError(
                f"prumerge: tokens={self.tokens} at layer {layer}, where only {num_tokens - protected} unprotected "
                f"tokens are left; the budget must be at most {num_tokens - protected - 1}"
            )
        return PruMerge(self.tokens, protected, extra=self.extra)
