"""EVS's config (vLLM's Efficient Video Sampling): prune a clip's merged tokens by change from the previous frame.

It acts on the tower's output tokens of a ``--frames`` model, after the recipe's projector when there is one, or
after the tower's own projector when the model ends with one that its adapter marked with its grid (Qwen2-VL's
PatchMerger), as serving runs it after Qwen2.5-VL's merger or Nemotron's pixel shuffle; it outputs one sequence
per clip. See
``ops.evs`` for the rule, the positions and the ranking forms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ..errors import ConfigError
from ..ops.evs import RANKINGS, EVSPrune
from .methods import register_method, setting
from .site import Point, Site


def _positive(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(text)
    return value


@register_method("evs", "EVS, vLLM's Efficient Video Sampling after the tower/projector (--q, --frames T)")
@dataclass(frozen=True)
class EVSConfig:
    """``q``: the pruning rate; max(H'W', int(T H'W' (1 - q))) tokens of a clip are kept. ``tokens_per_second``
    and ``seconds_per_grid``: the factors of the emitted t (Qwen2.5-VL's; 1 and 1 give the frame index, Qwen2-VL's
    t). ``ranking``: auto | sort | rank (``ops.evs``: the same tokens; rank avoids TensorRT's TopK limit)."""

    method: ClassVar[str] = "evs"
    needs_class_token: ClassVar[bool] = False
    prop_attn: ClassVar[bool] = False
    protected: ClassVar[None] = None
    protected_suffix: ClassVar[None] = None
    layers: ClassVar[None] = None
    reads_model_output: ClassVar[bool] = True  # after a tower's own projector (Qwen2-VL's merger) when it has one

    q: float = setting(0.75, "evs: pruning rate q in [0, 1): a clip keeps max(H'W', int(T H'W' (1 - q))) tokens")
    tokens_per_second: float = setting(1.0, "evs: t of the emitted positions is int(frame x tokens_per_second x "
                                       "seconds_per_grid)", _positive)
    seconds_per_grid: float = setting(1.0, "evs: seconds per temporal grid step (see --tokens-per-second)",
                                      _positive)
    ranking: str = setting("auto", "evs: auto | sort (TopK) | rank (comparison counts: no TopK, long clips)")

    def __post_init__(self) -> None:
        if isinstance(self.q, bool) or not isinstance(self.q, (int, float)) or not 0.0 <= self.q < 1.0:
            raise ConfigError(f"evs: q must be in [0, 1), got {self.q!r}")
        for name in ("tokens_per_second", "seconds_per_grid"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"evs: {name} must be a number > 0, got {value!r}")
        if self.ranking not in RANKINGS:
            raise ConfigError(f"evs: ranking must be one of {', '.join(RANKINGS)}, got {self.ranking!r}")

    def insertion_point(self) -> Point:
        return "encoder"

    def default_layers(self, num_layers: int) -> list[int]:
        return []

    def check(self, site: Site) -> None:
        if site.frames is None:
            raise ConfigError("evs compares each frame with the one before: give a clip with --frames T")

    def make_op(self, site: Site) -> EVSPrune:
        self.check(site)
        grid = site.grid
        if grid is None or len(grid) != 2 or math.prod(grid) != site.tokens - site.protected:
            raise ConfigError(
                f"evs compares tokens at the same (h, w) of consecutive frames, and at {site.describe()} there is no "
                "(H, W) grid of the tokens (an earlier merge or pruning reorders them): put evs last, on the tower "
                "or projector output"
            )
        assert site.frames is not None
        return EVSPrune(site.frames, (grid[0], grid[1]), self.q, site.protected, self.tokens_per_second,
                        self.seconds_per_grid, self.ranking)
