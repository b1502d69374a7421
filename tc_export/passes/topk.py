"""Top-K pruning's config (EViT): keep a fraction of the tokens by class attention at chosen layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import ConfigError
from ..ops.topk import TopKPrune, keep_count
from .token_pass import validate_placement

EVIT_LAYERS = (3, 6, 9)  # EViT's pruning layers on DeiT-S (zero-indexed)


@dataclass(frozen=True)
class TopKConfig:
    """``keep``: fraction of the unprotected tokens kept at each chosen layer, ceil(keep * (N - protected)).

    ``fuse``: add EViT's fused token (the pruned tokens averaged by class attention). ``keep_order``: survivors
    stay in their original order instead of descending attention. ``layers``: default 3, 6, 9 (EViT).
    """

    method: ClassVar[str] = "topk"
    needs_class_token: ClassVar[bool] = True

    keep: float = 0.7
    layers: tuple[int, ...] | None = None
    fuse: bool = False
    keep_order: bool = False
    protected: int | None = None
    prop_attn: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0.0 < self.keep <= 1.0:
            raise ConfigError(f"keep must be a fraction in (0, 1], got {self.keep!r}")
        validate_placement(self.method, self.layers, self.protected)

    def default_layers(self, num_layers: int) -> list[int]:
        return [layer for layer in EVIT_LAYERS if layer < num_layers]

    def check(self, first_tokens: int, protected: int, num_layers: int) -> None:
        if first_tokens - protected < 1:
            raise ConfigError(f"topk: the model has no tokens besides its {protected} protected ones")

    def make_op(self, layer: int, num_tokens: int, protected: int, num_layers: int, padded: bool = False) -> TopKPrune | None:
        keep = max(1, keep_count(num_tokens, self.keep, protected))
        if keep >= num_tokens - protected and not self.fuse:
            return None
        return TopKPrune(keep, protected, fuse=self.fuse and keep < num_tokens - protected, keep_order=self.keep_order)
