"""The ToMe pass: a bipartite merge after every attention residual add, proportional attention before each."""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import fx

from ..errors import ConfigError
from ..ops.tome import ToMeMerge, effective_r, proportional_bias
from .base import PassResult
from .rewrite import add_attention_bias, insert_key_metric
from .structure import find_sites_and_prefix


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
    """

    r: int | tuple[int, ...] = 16
    inflection: float | None = None
    prop_attn: bool = True
    protected: int | None = None

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
        if self.protected is not None and self.protected < 0:
            raise ConfigError(f"protected must be >= 0, got {self.protected}")

    def schedule(self, num_layers: int) -> list[int]:
        if isinstance(self.r, tuple):
            if len(self.r) > num_layers:
                raise ConfigError(f"the r list has {len(self.r)} entries but the model has {num_layers} layers")
            return list(self.r) + [0] * (num_layers - len(self.r))
        if self.inflection is not None:
            return linear_r_schedule(self.r, self.inflection, num_layers)
        return [self.r] * num_layers


class ToMePass:
    """Insert ``ToMeMerge`` after each attention block; thread token sizes into the following attentions."""

    name = "tome"

    def __init__(self, config: ToMeConfig, layers: Sequence[int] | None = None) -> None:
        self.config = config
        self.layers = None if layers is None else set(layers)

    def __call__(self, gm: fx.GraphModule, example_inputs: Mapping[str, torch.Tensor]) -> PassResult:
        sites, prefix = find_sites_and_prefix(gm)
        protected = prefix if self.config.protected is None else self.config.protected
        schedule = self.config.schedule(len(sites))
        first_tokens = sites[0].num_tokens()
        limit = effective_r(first_tokens, 10**9, protected)
        if max(schedule) > limit:
            raise ConfigError(
                f"r={max(schedule)} is too large: the first layer has {first_tokens} tokens "
                f"({protected} protected), so r can be at most {limit}"
            )
        size: fx.Node | None = None
        graph = gm.graph
        for site, r in zip(sites, schedule):
            if self.layers is not None and site.index not in self.layers:
                r = 0
            if size is not None and self.config.prop_attn:
                with graph.inserting_before(site.attention if site.softmax is None else site.softmax):
                    bias = graph.call_function(proportional_bias, (size,))
                add_attention_bias(site, bias)
            if r == 0:
                continue
            metric = insert_key_metric(graph, site)
            module_name = f"tome_merge_{site.index}"
            gm.add_submodule(module_name, ToMeMerge(r, protected))
            stream = site.stream
            with graph.inserting_after(stream):
                merge = graph.call_module(module_name, (stream, metric, size))
            with graph.inserting_after(merge):
                merged = graph.call_function(operator.getitem, (merge, 0))
            with graph.inserting_after(merged):
                size = graph.call_function(operator.getitem, (merge, 1))
            stream.replace_all_uses_with(merged, delete_user_cb=lambda user: user is not merge)
        return PassResult(gm, modified=True, notes=[f"tome: protected={protected}, r schedule={schedule}"])
