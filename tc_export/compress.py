"""Compress any ``nn.Module``: trace it, run the method passes, report token counts per layer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from .models.base import LoadedModel
from .ops.base import TokenOp
from .passes import LayerTokens, run_passes, token_pass
from .passes.graph import tensor_meta_shape
from .passes.structure import find_attention_sites
from .passes.trace import propagate_shapes, trace


@dataclass
class CompressedModel:
    """The compressed graph module and its per-layer token counts."""

    module: fx.GraphModule
    layers: list[LayerTokens]

    def __call__(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        return self.module(*args, **kwargs)

    def token_counts(self) -> list[int]:
        """Tokens each attention layer sees, then the tokens leaving the last layer."""
        return [layer.tokens_in for layer in self.layers] + [self.layers[-1].tokens_out]


def compress(
    model: nn.Module | LoadedModel,
    methods: object | Sequence[object],
    example_inputs: Mapping[str, torch.Tensor] | None = None,
) -> CompressedModel:
    """Trace ``model`` and apply each method config (e.g. ``ToMeConfig(r=16)``) in order.

    ``example_inputs`` (forward-argument name -> tensor) fixes the shapes; a ``LoadedModel`` brings its own.
    """
    if isinstance(model, LoadedModel):
        example_inputs = example_inputs or model.example_inputs(batch=1)
        model = model.module
    if example_inputs is None:
        raise TypeError("example_inputs are needed to trace a plain nn.Module")
    configs = list(methods) if isinstance(methods, (list, tuple)) else [methods]
    gm = trace(model.eval(), example_inputs)
    gm = run_passes(gm, [token_pass(configs)] if configs else [], example_inputs)
    return CompressedModel(gm, layer_tokens(gm, example_inputs))


def layer_tokens(gm: fx.GraphModule, example_inputs: Mapping[str, torch.Tensor]) -> list[LayerTokens]:
    """Tokens in and out of each attention layer, read from a shape propagation of ``gm``."""
    propagate_shapes(gm, example_inputs)
    modules = dict(gm.named_modules())
    layers = []
    for site in find_attention_sites(gm):
        tokens_in = tensor_meta_shape(site.key)[-2 if site.kind == "sdpa" else -1]
        tokens_out, action = tokens_in, "-"
        for user in site.stream.users:
            module = modules.get(str(user.target)) if user.op == "call_module" else None
            if isinstance(module, TokenOp):
                meta = user.meta.get("tensor_meta")
                tokens_out = int(meta[0].shape[1])
                action = f"{type(module).__name__}({module.extra_repr()})"
        layers.append(LayerTokens(site.index, site.name, tokens_in, tokens_out, action))
    return layers
