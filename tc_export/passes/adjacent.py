"""Adjacent merging's config (A-ToMe, fixed ratio): merge the r most similar neighbouring pairs per layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import ConfigError
from ..ops.adjacent import AdjacentMerge, effective_pairs
from .layers import parse_layers_flag, parse_protected, protected_suffix_setting, validate_placement
from .methods import register_method, setting
from .site import Point, Site


def parse_pairs(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(
            f"--r for adjacent is one whole number of pairs per layer (choose layers with --layers), got {text!r}"
        ) from None
    if value < 0:
        raise ConfigError(f"--r must be >= 0 (pairs merged per layer), got {value}")
    return value


@register_method("adjacent", "adjacent pair merging for sequences, A-ToMe fixed ratio (--r, --layers)")
@dataclass(frozen=True)
class AdjacentConfig:
    """``r``: pairs merged at each chosen layer (default: every layer). ``prop_attn``: log-size attention bias."""

    method: ClassVar[str] = "adjacent"
    point: ClassVar[Point] = "attention"
    needs_class_token: ClassVar[bool] = False

    r: int = setting(8, "adjacent: pairs merged per layer", parse_pairs)
    layers: tuple[int, ...] | None = setting(None, "layers to act on, e.g. 3,6,9 or 0-5 (zero-indexed)",
                                             parse_layers_flag)
    prop_attn: bool = setting(True, "proportional attention: log(size) added to the attention logits")
    protected: int | None = setting(None, "leading tokens that never move (default: found in the graph)",
                                    parse_protected)
    protected_suffix: int | None = protected_suffix_setting()

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 0:
            raise ConfigError(f"r must be a whole number >= 0 (pairs merged per layer), got {self.r!r}")
        validate_placement(self.method, self.layers, self.protected, self.protected_suffix)

    def insertion_point(self) -> Point:
        return self.point

    def default_layers(self, num_layers: int) -> list[int]:
        return list(range(num_layers))

    def check(self, site: Site) -> None:
        limit = (site.tokens - site.protected) // 2
        if self.r > limit:
            raise ConfigError(
                f"r={self.r} is too large: the first layer has {site.tokens} tokens ({site.protected} protected), "
                f"so at most {limit} adjacent pairs can merge"
            )

    def make_op(self, site: Site) -> AdjacentMerge | None:
        if effective_pairs(site.tokens, self.r, site.protected) == 0:
            return None
        return AdjacentMerge(self.r, site.protected, site.padded)
