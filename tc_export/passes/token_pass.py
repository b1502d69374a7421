"""The token pass: one walk over the attention sites that applies every configured method at its layers.

Methods (ToMe, Top-K, PruMerge, adjacent merging) differ only in the op they put at a site and the signals
it needs. What they share lives here: the token sizes threaded from op to op (and from a padding mask, when
the model has one), the attention bias those sizes imply at every later site, and the layer plan of a
multi-stage recipe (one method per layer).
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import ClassVar, Protocol

import torch
from torch import fx

from ..errors import ConfigError
from ..ops.attention import presence_bias, proportional_bias
from ..ops.base import TokenOp
from .base import PassResult
from .padding import find_initial_sizes, repoint_pooling
from .rewrite import add_attention_bias, insert_class_attention, insert_key_metric
from .structure import AttentionSite, find_sites_and_prefix


class TokenMethod(Protocol):
    """A method config: which layers it acts on and the op it puts there."""

    method: ClassVar[str]
    needs_class_token: ClassVar[bool]
    prop_attn: bool
    protected: int | None
    layers: tuple[int, ...] | None

    def default_layers(self, num_layers: int) -> list[int]: ...

    def check(self, first_tokens: int, protected: int, num_layers: int) -> None: ...

    def make_op(
        self, layer: int, num_tokens: int, protected: int, num_layers: int, padded: bool = False
    ) -> TokenOp | None: ...


def validate_placement(method: str, layers: tuple[int, ...] | None, protected: int | None) -> None:
    """Config-time checks every method shares: the layer list (whole numbers >= 0, no repeats), ``protected``."""
    if protected is not None and (isinstance(protected, bool) or not isinstance(protected, int) or protected < 0):
        raise ConfigError(f"{method}: protected must be a whole number >= 0, got {protected!r}")
    if layers is None:
        return
    if not layers:
        raise ConfigError(f"{method}: layers is empty; give at least one layer index")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ConfigError(f"{method}: layers must be whole numbers >= 0, got {layer!r}")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"{method}: layers {list(layers)} repeat an index")


def layer_plan(configs: Sequence[TokenMethod], num_layers: int) -> dict[int, TokenMethod]:
    """Layer index -> the method acting there; out-of-range or doubly claimed layers are errors."""
    plan: dict[int, TokenMethod] = {}
    for config in configs:
        layers = list(config.layers) if config.layers is not None else config.default_layers(num_layers)
        for layer in layers:
            if layer >= num_layers:
                raise ConfigError(
                    f"{config.method}: layer {layer} is out of range: the model has {num_layers} attention layers "
                    f"(0-{num_layers - 1})"
                )
            if layer in plan:
                raise ConfigError(
                    f"layer {layer} is claimed by both {plan[layer].method} and {config.method}: one method per layer"
                )
            plan[layer] = config
    return plan


class TokenPass:
    """Insert each method's op after the attention residual add of its layers; thread sizes and biases."""

    name = "tokens"

    def __init__(self, configs: Sequence[TokenMethod]) -> None:
        if not configs:
            raise ConfigError("no compression method given")
        self.configs = list(configs)
        self.name = "+".join(config.method for config in self.configs)

    def __call__(self, gm: fx.GraphModule, example_inputs: Mapping[str, torch.Tensor]) -> PassResult:
        sites, prefix = find_sites_and_prefix(gm)
        plan = layer_plan(self.configs, len(sites))
        first_tokens = sites[0].num_tokens()
        for config in self.configs:
            protected = prefix if config.protected is None else config.protected
            if config.needs_class_token and protected == 0:
                raise ConfigError(
                    f"{config.method} ranks tokens by class-token attention, and this model has no class token "
                    "(no learned token in front of the sequence); use tome or adjacent"
                )
            config.check(first_tokens, protected, len(sites))

        graph = gm.graph
        initial = size = find_initial_sizes(gm, sites, example_inputs)
        padded = initial is not None
        prop_attn = any(config.prop_attn for config in self.configs)
        tokens = first_tokens
        notes = []
        for site in sites:
            if size is not None and (prop_attn or padded):
                bias_fn = proportional_bias if prop_attn else presence_bias
                with graph.inserting_before(site.attention if site.softmax is None else site.softmax):
                    bias = graph.call_function(bias_fn, (size,))
                add_attention_bias(site, bias)
            config = plan.get(site.index)
            if config is None:
                continue
            protected = prefix if config.protected is None else config.protected
            op = config.make_op(site.index, tokens, protected, len(sites), padded=padded)
            if op is None:
                continue
            size = self._insert_op(gm, site, op, size)
            notes.append(f"layer {site.index}: {config.method} {tokens} -> {op.tokens_out(tokens)} tokens")
            tokens = op.tokens_out(tokens)
        if padded and size is not initial:
            repoint_pooling(gm, initial, size)
        return PassResult(gm, modified=bool(notes), notes=notes)

    @staticmethod
    def _insert_op(gm: fx.GraphModule, site: AttentionSite, op: TokenOp, size: fx.Node | None) -> fx.Node | None:
        """Call ``op`` on the site's stream; later users see its tokens. Returns the sizes after it."""
        graph = gm.graph
        signals = []
        for signal in op.signals:
            if signal == "metric":
                signals.append(insert_key_metric(graph, site))
            else:
                signals.append(insert_class_attention(graph, site))
        module_name = f"{type(op).__name__.lower()}_{site.index}"
        gm.add_submodule(module_name, op)
        stream = site.stream
        with graph.inserting_after(stream):
            call = graph.call_module(module_name, (stream, size, *signals))
        with graph.inserting_after(call):
            tokens = graph.call_function(operator.getitem, (call, 0))
        stream.replace_all_uses_with(tokens, delete_user_cb=lambda user: user is not call)
        if size is None and not op.creates_size:
            return None
        with graph.inserting_after(tokens):
            return graph.call_function(operator.getitem, (call, 1))
