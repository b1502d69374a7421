"""PruMerge's config: the published prune-and-merge with a fixed budget, where the stream enters a layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import ConfigError
from ..ops.prumerge import NEIGHBOURS, PruMerge
from ..ops.units import UNIT_METRICS, UNIT_SCORES
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


@register_method("prumerge", "LLaVA-PruMerge with a fixed budget (--tokens, --no-extra, --layers)")
@dataclass(frozen=True)
class PruMergeConfig:
    """``tokens``: the budget K of unprotected tokens kept. ``layers``: the layers whose attention (full-width
    queries and keys of the tokens entering it) scores the tokens entering that layer; default the last, as
    LLaVA-PruMerge scores the second-to-last layer's output with the last layer's attention. ``extra``: the
    published extra token (the pruned tokens' class-attention-weighted sum). ``neighbours``: tokens added into
    each kept one (32 published). ``prefix_mode``: at the tower output (``--features N`` with the layer N + 1 scoring,
    the published placement) the class/register tokens are dropped (the published output is ``[kept, extra]``)
    unless ``keep``; inside the tower they are kept (the later blocks read them) and ``drop`` is an error.
    """

    method: ClassVar[str] = "prumerge"
    point: ClassVar[Point] = "block_input"
    acts_at_output: ClassVar[bool] = True  # with --features N, at layer N + 1: on the tower output

    tokens: int = setting(help="prumerge: token budget K kept", metavar="K")
    extra: bool = setting(True, "prumerge: the extra token holding the pruned tokens' weighted sum")
    neighbours: int = setting(NEIGHBOURS, "prumerge: nearest tokens (key cosine) added into each kept token")
    layers: tuple[int, ...] | None = setting(None, "layers to act on, e.g. 3,6,9 or 0-5 (zero-indexed)",
                                             parse_layers_flag)
    protected: int | None = setting(None, "leading tokens that never move (default: found in the graph)",
                                    parse_protected)
    protected_suffix: int | None = protected_suffix_setting()
    prop_attn: bool = setting(False, "proportional attention: log(size) added to the attention logits")
    prefix_mode: str | None = setting(None, PREFIX_MODE_HELP, parse_prefix_mode)
    score: str = setting("class", "topk / prumerge: rank by the class token's attention (class, the published "
                                  "rule) or by the attention each token receives, averaged over queries and heads "
                                  "(received: HiPrune/QuietPrune; towers without a class token)", metavar="WHAT")
    unit_score: str = setting("mean", "merge units: score a unit by the mean, sum or max of its tokens' scores",
                              metavar="HOW")
    unit_metric: str = setting("mean", "merge units: match units on the mean of their tokens' keys (mean) or on "
                                       "the keys concatenated (concat)", metavar="HOW")

    @property
    def needs_class_token(self) -> bool:
        return self.score == "class"

    def __post_init__(self) -> None:
        check_prefix_mode(self.method, self.prefix_mode)
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1:
            raise ConfigError(f"tokens must be a whole number >= 1 (the budget of kept tokens), got {self.tokens!r}")
        if isinstance(self.neighbours, bool) or not isinstance(self.neighbours, int) or self.neighbours < 1:
            raise ConfigError(f"neighbours must be a whole number >= 1, got {self.neighbours!r}")
        validate_placement(self.method, self.layers, self.protected, self.protected_suffix)
        if self.score not in ("class", "received"):
            raise ConfigError(f"prumerge: score must be class or received, got {self.score!r}")
        if self.unit_score not in UNIT_SCORES or self.unit_metric not in UNIT_METRICS:
            raise ConfigError(f"prumerge: unit_score must be one of {', '.join(UNIT_SCORES)} and unit_metric one of "
                              f"{', '.join(UNIT_METRICS)}, got {self.unit_score!r} and {self.unit_metric!r}")

    def insertion_point(self) -> Point:
        return self.point

    def default_layers(self, num_layers: int) -> list[int]:
        return [num_layers - 1]

    def check(self, site: Site) -> None:
        if self.tokens >= site.tokens - site.protected:
            raise ConfigError(
                f"prumerge: tokens={self.tokens} is not below the {site.tokens - site.protected} unprotected tokens "
                f"of the model; the budget must be at most {site.tokens - site.protected - 1}"
            )

    def make_op(self, site: Site) -> PruMerge | None:
        if self.tokens >= site.tokens - site.protected:
            raise ConfigError(
                f"prumerge: tokens={self.tokens} at layer {site.layer}, where only {site.tokens - site.protected} "
                f"unprotected tokens are left; the budget must be at most {site.tokens - site.protected - 1}"
            )
        if self.prefix_mode == "drop" and not site.at_output:
            raise ConfigError(
                f"prumerge at layer {site.layer} would drop the {site.protected} class/register tokens the later "
                "blocks read; drop them only at the tower output (--features N, PruMerge scoring with layer N + 1)"
            )
        drop = site.at_output and self.prefix_mode != "keep"
        return PruMerge(self.tokens, site.protected, extra=self.extra, neighbours=self.neighbours, drop_prefix=drop,
                        received=self.score == "received")
