"""ToMe's config: a bipartite merge after the attention residual add of every layer (or the chosen ones)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import ConfigError
from ..ops.tome import ToMeMerge, effective_r
from ..ops.units import UNIT_METRICS
from .layers import parse_layers_flag, parse_protected, protected_suffix_setting, validate_placement
from .methods import register_method, setting
from .site import Point, Site


def linear_r_schedule(r: int, inflection: float, num_layers: int) -> list[int]:
    """ToMe's (r, inflection) schedule: linear from int(r*(1-inflection)) to 2r minus that, truncated to ints."""
    low = int(r * (1.0 - inflection))
    high = 2 * r - low
    if num_layers == 1:
        return [low]
    step = (high - low) / (num_layers - 1)
    return [int(low + step * i) for i in range(num_layers)]


def parse_r(text: str) -> int | tuple[int, ...]:
    """``16`` -> 16; ``8,8,4`` -> (8, 8, 4) (a per-layer list). Rejects non-integers and negatives."""
    values = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            raise ConfigError(
                f"--r must be a whole number of tokens per layer (or a comma-separated per-layer list), got {text!r}"
            ) from None
        if value < 0:
            raise ConfigError(f"--r must be >= 0 (tokens merged per layer), got {value}")
        values.append(value)
    return values[0] if len(values) == 1 and "," not in text else tuple(values)


PLACEMENTS = ("attention", "input")


def parse_window(text: str) -> int:
    """``16`` -> 16; rejects non-integers and values below 1."""
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"--window must be a whole number of tokens >= 1, got {text!r}") from None
    if value < 1:
        raise ConfigError(f"--window must be >= 1 (B tokens searched each side), got {value}")
    return value


@register_method("tome", "ToMe bipartite token merging (--r, --inflect)")
@dataclass(frozen=True)
class ToMeConfig:
    """ToMe settings.

    ``r``: tokens merged per layer: an int (constant, or linear with ``inflection``) or a per-layer tuple
    (padded with zeros). ``prop_attn``: proportional attention (log size added to the logits).
    ``protected``: leading tokens that never merge; None detects them from the graph.
    ``layers``: merge only at these layer indices (None: every layer the schedule gives an r).
    ``sort_unmerged``: keep the unmerged tokens in their original order even without a protected prefix (the
    published code sorts them only when there is a class token).
    ``window``: an option that departs from the published method, meant for long 1-D sequences (audio frames): each
    A token (A-index i) is matched only with the B tokens at B-index i - window .. i + window instead of all of
    them, so the similarity costs O(N * window) instead of O(N^2). On a 2-D patch grid the window follows the
    row-major order, not the image neighbourhood. None (default): the global search, unchanged. At a site whose
    tokens all lie within the window (window >= ceil(N/2) - 1) the global search is used: the same matches.
    ``placement``: ``attention`` (default, the published place: after the attention residual add, before the MLP)
    or ``input``, an option that departs from the published method: merge where the stream enters the block, so
    that block's attention already runs on the merged tokens. No keys exist there yet, so the metric is the
    incoming tokens themselves (as ToMe for Stable Diffusion matches its tokens); the matching, sizes and order are
    ToMe's. ToMe alone never merges before layer 0's attention, so that full-length attention is a floor no ``r``
    moves; an input merge at layer 0 removes it. Both placements may act on one layer (two stages: ``input``, then
    ``attention``). Matching on that block's keys instead (a copy of its norm and fused qkv projection on the
    incoming tokens) was tried: on mnist_vit held-out accuracy within 0.4 points of the tokens' from r=40 to 98,
    on minilm the same cosine to 1e-4, and the op cost 0.050 ms per token against 0.039 (mnist_vit, batch 64).
    """

    method: ClassVar[str] = "tome"
    point: ClassVar[Point] = "attention"
    needs_class_token: ClassVar[bool] = False

    r: int | tuple[int, ...] = setting(16, "tome: tokens merged per layer, or a per-layer list 8,8,4", parse_r)
    inflection: float | None = setting(None, "linear r schedule with this inflection (ToMe's (r, inflection))",
                                       float, flag="--inflect")
    prop_attn: bool = setting(True, "proportional attention: log(size) added to the attention logits")
    protected: int | None = setting(None, "leading tokens that never move (default: found in the graph)",
                                    parse_protected)
    protected_suffix: int | None = protected_suffix_setting()
    layers: tuple[int, ...] | None = setting(None, "layers to act on, e.g. 3,6,9 or 0-5 (zero-indexed)",
                                             parse_layers_flag)
    sort_unmerged: bool = setting(False, "tome: keep unmerged tokens in their order without a class token too")
    window: int | None = setting(None, "tome: match each token only within this many neighbours (long 1-D "
                                       "sequences; not the published global search)", parse_window, metavar="W")
    placement: str = setting("attention", "tome: merge after the attention (the published place) or at the block "
                                          "input, before it (input; not the published method)", metavar="WHERE")
    unit_metric: str = setting("mean", "merge units: match units on the mean of their tokens' keys (mean) or on "
                                       "the keys concatenated (concat)", metavar="HOW")

    def __post_init__(self) -> None:
        values = self.r if isinstance(self.r, tuple) else (self.r,)
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"r must be a whole number of tokens, got {value!r}")
            if value < 0:
                raise ConfigError(f"r must be >= 0 (tokens merged per layer), got {value}")
        if self.inflection is not None:
            if isinstance(self.r, tuple):
                raise ConfigError("inflection goes with a single r, not a per-layer list")
            if not -1.0 <= self.inflection <= 1.0:
                raise ConfigError(f"inflection must be in [-1, 1], got {self.inflection}")
        if self.window is not None and (isinstance(self.window, bool) or not isinstance(self.window, int)
                                        or self.window < 1):
            raise ConfigError(f"window must be a whole number >= 1 (B tokens searched each side), got {self.window!r}")
        if self.unit_metric not in UNIT_METRICS:
            raise ConfigError(f"tome: unit_metric must be mean or concat, got {self.unit_metric!r}")
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"tome: placement must be attention or input, got {self.placement!r}")
        validate_placement(self.method, self.layers, self.protected, self.protected_suffix)

    def insertion_point(self) -> Point:
        return "block_input" if self.placement == "input" else self.point

    def schedule(self, num_layers: int) -> list[int]:
        if isinstance(self.r, tuple):
            if len(self.r) > num_layers:
                raise ConfigError(f"the r list has {len(self.r)} entries but the model has {num_layers} layers")
            return list(self.r) + [0] * (num_layers - len(self.r))
        if self.inflection is not None:
            return linear_r_schedule(self.r, self.inflection, num_layers)
        return [self.r] * num_layers

    def default_layers(self, num_layers: int) -> list[int]:
        return list(range(num_layers))

    def check(self, site: Site) -> None:
        schedule = self.schedule(site.num_layers)
        layers = self.layers if self.layers is not None else range(site.num_layers)
        largest = max((schedule[layer] for layer in layers if layer < site.num_layers), default=0)
        limit = effective_r(site.tokens, 10**9, site.protected)
        if largest > limit:
            what = f"{site.unit}x{site.unit} merge units" if site.unit is not None else "tokens"
            raise ConfigError(
                f"r={largest} is too large: the first layer has {site.tokens} {what} "
                f"({site.protected} protected), so r can be at most {limit}"
            )

    def make_op(self, site: Site) -> ToMeMerge | None:
        assert site.layer is not None
        r = self.schedule(site.num_layers)[site.layer]
        if effective_r(site.tokens, r, site.protected) == 0:
            return None
        window = self.window
        if window is not None and window >= (site.tokens + 1) // 2 - 1:  # the band holds every B token
            window = None
        sort = True if self.sort_unmerged or site.unit is not None else None  # units: unmerged ones keep their order
        return ToMeMerge(r, site.protected, site.padded, sort_unmerged=sort,
                         window=window, metric_is_tokens=self.placement == "input")
