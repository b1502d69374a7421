"""ToMe's config: a bipartite merge after the attention residual add of every layer (or the chosen ones)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import ConfigError
from ..ops.tome import ToMeMerge, effective_r
from .token_pass import validate_placement


def linear_r_schedule(r: int, inflection: float, num_layers: int) -> list[int]:
    """ToMe's (r, inflection) schedule: linear from int(r*(1-inflection)) to 2r minus that, truncated to ints."""
    low = int(r * (1.0 - inflection))
    high = 2 * r - low
    if num_layers == 1:
        return [low]
    step = (high - low) / (num_layers - 1)
    return [int(low + step * i) for i in range(num_layers)]


@dataclass(frozen=True)
class ToMeConfig:
    """ToMe settings.

    ``r``: tokens merged per layer: an int (constant, or linear with ``inflection``) or a per-layer tuple
    (padded with zeros). ``prop_attn``: proportional attention (log size added to the logits).
    ``protected``: class/distillation tokens that never merge; None detects them from the graph.
    ``layers``: merge only at these layer indices (None: every layer the schedule gives an r).
    """

    method: ClassVar[str] = "tome"
    needs_class_token: ClassVar[bool] = False

    r: int | tuple[int, ...] = 16
    inflection: float | None = None
    prop_attn: bool = True
    protected: int | None = None
    layers: tuple[int, ...] | None = None

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
        validate_placement(self.method, self.layers, self.protected)

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

    def check(self, first_tokens: int, protected: int, num_layers: int) -> None:
        schedule = self.schedule(num_layers)
        layers = self.layers if self.layers is not None else range(num_layers)
        largest = max((schedule[layer] for layer in layers if layer < num_layers), default=0)
        limit = effective_r(first_tokens, 10**9, protected)
        if largest > limit:
            raise ConfigError(
                f"r={largest} is too large: the first layer has {first_tokens} tokens "
                f"({protected} protected), so r can be at most {limit}"
            )

    def make_op(self, layer: int, num_tokens: int, protected: int, num_layers: int, padded: bool = False) -> ToMeMerge | None:
        r = self.schedule(num_layers)[layer]
        return ToMeMerge(r, protected, padded) if effective_r(num_tokens, r, protected) > 0 else None
