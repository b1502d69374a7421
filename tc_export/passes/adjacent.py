"""Adjacent merging's config (A-ToMe, fixed ratio): merge the r most similar neighbouring pairs per layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import ConfigError
from ..ops.adjacent import AdjacentMerge, effective_pairs
from .token_pass import validate_placement


@dataclass(frozen=True)
class AdjacentConfig:
    """``r``: pairs merged at each chosen layer (default: every layer). ``prop_attn``: log-size attention bias."""

    method: ClassVar[str] = "adjacent"
    needs_class_token: ClassVar[bool] = False

    r: int = 8
    layers: tuple[int, ...] | None = None
    prop_attn: bool = True
    protected: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 0:
            raise ConfigError(f"r must be a whole number >= 0 (pairs merged per layer), got {self.r!r}")
        validate_placement(self.method, self.layers, self.protected)

    def default_layers(self, num_layers: int) -> list[int]:
        return list(range(num_layers))

    def check(self, first_tokens: int, protected: int, num_layers: int) -> None:
        limit = (first_tokens - protected) // 2
        if self.r > limit:
            raise ConfigError(
                f"r={self.r} is too large: the first layer has {first_tokens} tokens ({protected} protected), "
                f"so at most {limit} adjacent pairs can merge"
            )

    def make_op(self, layer: int, num_tokens: int, protected: int, num_layers: int, padded: bool = False) -> AdjacentMerge | None:
        return AdjacentMerge(self.r, protected, padded) if effective_pairs(num_tokens, self.r, protected) > 0 else None
