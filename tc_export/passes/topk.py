"""Top-K pruning's config (EViT): keep a fraction of the tokens by class attention at chosen layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import ConfigError
from ..ops.topk import TopKAtOutput, TopKPrune, keep_count
from ..ops.units import UNIT_SCORES
from .layers import (
    PREFIX_MODE_HELP,
    check_prefix_mode,
    parse_layers_flag,
    parse_prefix_mode,
    parse_protected,
    protected_suffix_setting,
    validate_placement,
)
from .methods import register_method, setting
from .site import Point, Site

SCORES = ("class", "received")
EVIT_LAYERS = (3, 6, 9)  # EViT's pruning layers on DeiT-S (zero-indexed)


@register_method("topk", "Top-K pruning by class attention, EViT (--keep, --layers, --fuse, --keep-order)")
@dataclass(frozen=True)
class TopKConfig:
    """``keep``: fraction of the unprotected tokens kept at each chosen layer, ceil(keep * (N - protected)).

    ``fuse``: add EViT's fused token (the class-attention-weighted sum of the pruned tokens). ``keep_order``:
    survivors stay in their original order instead of descending attention. ``layers``: default 3, 6, 9 (EViT).
    With ``--features N`` and ``layers`` N + 1, it acts on the tower's output: layer N + 1's class attention (its
    norm and q/k on layer N's output) ranks layer N's tokens, layer N + 1 never runs, and the class/register tokens
    are dropped from the output unless ``prefix_mode`` keep (inside the tower they are always kept).
    """

    method: ClassVar[str] = "topk"
    point: ClassVar[Point] = "attention"
    acts_at_output: ClassVar[bool] = True  # with --features N, at layer N + 1: on the tower output

    keep: float = setting(0.7, "topk: fraction of tokens kept, e.g. 0.7")
    layers: tuple[int, ...] | None = setting(None, "layers to act on, e.g. 3,6,9 or 0-5 (zero-indexed)",
                                             parse_layers_flag)
    fuse: bool = setting(False, "topk: add EViT's fused token of the pruned tokens")
    keep_order: bool = setting(False, "topk: survivors keep their original order")
    protected: int | None = setting(None, "leading tokens that never move (default: found in the graph)",
                                    parse_protected)
    protected_suffix: int | None = protected_suffix_setting()
    prop_attn: bool = setting(False, "proportional attention: log(size) added to the attention logits")
    prefix_mode: str | None = setting(None, PREFIX_MODE_HELP, parse_prefix_mode)
    unit_score: str = setting("mean", "merge units: score a unit by the mean, sum or max of its tokens' scores",
                              metavar="HOW")
    score: str = setting("class", "topk / prumerge: rank by the class token's attention (class, the published "
                                  "rule) or by the attention each token receives, averaged over queries and heads "
                                  "(received: HiPrune/QuietPrune; towers without a class token)", metavar="WHAT")

    def __post_init__(self) -> None:
        check_prefix_mode(self.method, self.prefix_mode)
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0.0 < self.keep <= 1.0:
            raise ConfigError(f"keep must be a fraction in (0, 1], got {self.keep!r}")
        validate_placement(self.method, self.layers, self.protected, self.protected_suffix)
        if self.unit_score not in UNIT_SCORES:
            raise ConfigError(f"topk: unit_score must be mean, sum or max, got {self.unit_score!r}")
        if self.score not in SCORES:
            raise ConfigError(f"topk: score must be class or received, got {self.score!r}")

    @property
    def needs_class_token(self) -> bool:  # type: ignore[override]
        return self.score == "class"

    def insertion_point(self) -> Point:
        return self.point

    def default_layers(self, num_layers: int) -> list[int]:
        return [layer for layer in EVIT_LAYERS if layer < num_layers]

    @property
    def only_drops_tokens(self) -> bool:
        """Every kept token is one original token (no fused token): position tables may be gathered."""
        return not self.fuse

    def check(self, site: Site) -> None:
        if site.tokens - site.protected < 1:
            raise ConfigError(f"topk: the model has no tokens besides its {site.protected} protected ones")

    def make_op(self, site: Site) -> TopKPrune | TopKAtOutput | None:
        keep = max(1, keep_count(site.tokens, self.keep, site.protected))
        if site.at_output:
            if site.heads is None:
                raise ConfigError(f"topk: no attention heads found at layer {site.layer} to score the tower output")
            fuse = self.fuse and keep < site.tokens - site.protected
            return TopKAtOutput(keep, site.protected, site.heads, fuse=fuse, keep_order=self.keep_order,
                                drop_prefix=self.prefix_mode != "keep", received=self.score == "received")
        if self.prefix_mode == "drop":
            raise ConfigError(
                f"topk at layer {site.layer} would drop the {site.protected} class/register tokens the later blocks "
                "read; drop them only at the tower output (--features N, topk scoring with layer N + 1)"
            )
        if keep >= site.tokens - site.protected and not self.fuse:
            return None
        return TopKPrune(keep, site.protected, fuse=self.fuse and keep < site.tokens - site.protected,
                         keep_order=self.keep_order, received=self.score == "received")
