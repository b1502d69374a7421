"""Top-K pruning's config (EViT): keep a fraction of the tokens by class attention at chosen layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import ConfigError
from ..ops.topk import TopKPrune, keep_count
from .layers import parse_layers_flag, parse_protected, protected_suffix_setting, validate_placement
from .methods import register_method, setting
from .site import Point, Site

EVIT_LAYERS = (3, 6, 9)  # EViT's pruning layers on DeiT-S (zero-indexed)


@register_method("topk", "Top-K pruning by class attention, EViT (--keep, --layers, --fuse, --keep-order)")
@dataclass(frozen=True)
class TopKConfig:
    """``keep``: fraction of the unprotected tokens kept at each chosen layer, ceil(keep * (N - protected)).

    ``fuse``: add EViT's fused token (the class-attention-weighted sum of the pruned tokens). ``keep_order``:
    survivors stay in their original order instead of descending attention. ``layers``: default 3, 6, 9 (EViT).
    """

    method: ClassVar[str] = "topk"
    point: ClassVar[Point] = "attention"
    needs_class_token: ClassVar[bool] = True

    keep: float = setting(0.7, "topk: fraction of tokens kept, e.g. 0.7")
    layers: tuple[int, ...] | None = setting(None, "layers to act on, e.g. 3,6,9 or 0-5 (zero-indexed)",
                                             parse_layers_flag)
    fuse: bool = setting(False, "topk: add EViT's fused token of the pruned tokens")
    keep_order: bool = setting(False, "topk: survivors keep their original order")
    protected: int | None = setting(None, "leading tokens that never move (default: found in the graph)",
                                    parse_protected)
    protected_suffix: int | None = protected_suffix_setting()
    prop_attn: bool = setting(False, "proportional attention: log(size) added to the attention logits")

    def __post_init__(self) -> None:
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0.0 < self.keep <= 1.0:
            raise ConfigError(f"keep must be a fraction in (0, 1], got {self.keep!r}")
        validate_placement(self.method, self.layers, self.protected, self.protected_suffix)

    def insertion_point(self) -> Point:
        return self.point

    def default_layers(self, num_layers: int) -> list[int]:
        return [layer for layer in EVIT_LAYERS if layer < num_layers]

    def check(self, site: Site) -> None:
        if site.tokens - site.protected < 1:
            raise ConfigError(f"topk: the model has no tokens besides its {site.protected} protected ones")

    def make_op(self, site: Site) -> TopKPrune | None:
        keep = max(1, keep_count(site.tokens, self.keep, site.protected))
        if keep >= site.tokens - site.protected and not self.fuse:
            return None
        return TopKPrune(keep, site.protected, fuse=self.fuse and keep < site.tokens - site.protected,
                         keep_order=self.keep_order)
