"""Compress any ``nn.Module``: trace it, run the method passes, report token counts per layer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..errors import ConfigError, InternalError
from ..models.base import LoadedModel
from ..models.seeding import DEFAULT_WEIGHTS_SEED, seeded_weights
from ..ops.base import TokenOp
from ..ops.state import leading_tokens
from ..passes import LayerTokens, run_passes, token_pass
from ..passes.graph import tensor_meta_shape
from ..passes.structure import find_structure
from ..passes.token_pass import PassReport, seeded_input
from ..passes.trace import propagate_shapes, trace


@dataclass
class CompressedModel:
    """The compressed graph module, its per-layer token counts and what the passes found."""

    module: fx.GraphModule
    layers: list[LayerTokens]
    report: PassReport = field(default_factory=PassReport)
    output_tokens: int | None = None  # tokens of the output, when the output is tokens (features, projectors)

    def __call__(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        return self.module(*args, **kwargs)

    def token_counts(self) -> list[int]:
        """Tokens each attention layer sees, then the tokens leaving the last layer (or the model, when it
        outputs tokens)."""
        last = self.output_tokens if self.output_tokens is not None else self.layers[-1].tokens_out
        return [layer.tokens_in for layer in self.layers] + [last]

    @property
    def protected(self) -> int:
        return self.report.protected

    def extra_inputs(self, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """Example values of the inputs the methods added (e.g. LLaMA-VID's text queries)."""
        return {name: seeded_input(batch, shape, seed) for name, shape in self.report.extra_inputs.items()}


def compress(
    model: nn.Module | LoadedModel,
    methods: object | Sequence[object],
    example_inputs: Mapping[str, torch.Tensor] | None = None,
    features: int | None = None,
    frames: int | None = None,
    emit_positions: bool = False,
    unit: int | None = None,
) -> CompressedModel:
    """Trace ``model`` and apply each method config (e.g. ``ToMeConfig(r=16)``) in order.

    ``example_inputs`` (forward-argument name -> tensor) fixes the shapes; a ``LoadedModel`` brings its own.
    ``features``: end the model at that block's output tokens (``-2``: the second-to-last, as LLaVA takes them).
    ``frames``: the model is a per-frame tower of a video wrapper; token outputs are joined frame after frame.
    ``emit_positions``: add outputs with each output token's position and size (``TokenPass``).
    ``unit``: merge units of unit x unit patches (docs/merge-units.md); a recipe whose window projector follows a
    token method sets it by itself.
    Ops with weights the methods add (projectors) draw them from the ``LoadedModel``'s ``weights_seed`` (else 0).
    """
    configs = list(methods) if isinstance(methods, (list, tuple)) else [methods]
    seed = DEFAULT_WEIGHTS_SEED
    if isinstance(model, LoadedModel):
        wanted = configs or features is not None or emit_positions or unit is not None
        own = model.own_projector is not None and features is None  # compression_refusal: of the rest
        if model.compression_refusal is not None and wanted and not own:
            raise ConfigError(f"{model.name}: {model.compression_refusal}")
        example_inputs = example_inputs or model.example_inputs(batch=1)
        frames = frames or model.frames
        seed = model.weights_seed
        after_own = any(getattr(config, "reads_model_output", False) for config in configs)  # EVS: after the merger
        if model.own_projector is not None and features is None and (configs or emit_positions or unit is not None) \
                and not after_own:
            module, stage = model.own_projector  # the tower without its merger, the merger as the last stage
            model, configs = module, [*configs, stage]
        else:
            model = model.module
    if example_inputs is None:
        raise TypeError("example_inputs are needed to trace a plain nn.Module")
    gm = trace(model.eval(), example_inputs)
    try:
        propagate_shapes(gm, example_inputs)
    except Exception as error:  # noqa: BLE001 - the model itself does not run on these inputs
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in example_inputs.items())
        cause = str(getattr(error, "__cause__", None) or error).strip().splitlines()[0]
        raise ConfigError(f"the model does not run on its example inputs ({shapes}): {cause}") from None
    sites_before = len(find_structure(gm).sites)
    wanted = configs or features is not None or emit_positions or unit is not None
    passes = [token_pass(configs, features, frames, emit_positions, unit)] if wanted else []
    with seeded_weights(seed):  # the weights of the ops the passes add (projectors) come from the model's seed
        gm = run_passes(gm, passes, example_inputs)
    report = passes[0].report if passes else PassReport()
    inputs = dict(example_inputs) | {name: seeded_input(next(iter(example_inputs.values())).shape[0], shape)
                                     for name, shape in report.extra_inputs.items()}
    layers = layer_tokens(gm, inputs)
    if features is None and len(layers) != sites_before:
        raise InternalError(f"the model had {sites_before} self-attention layers and has {len(layers)} after the passes")
    output = None
    if report.output_is_tokens:
        propagate_shapes(gm, inputs)
        out_node = next(n for n in gm.graph.nodes if n.op == "output")
        value = out_node.args[0][0] if isinstance(out_node.args[0], (tuple, list)) else out_node.args[0]
        shape = tensor_meta_shape(value)
        output = shape[1] if shape is not None and len(shape) == 3 else None
    return CompressedModel(gm, layers, report, output)


def layer_tokens(gm: fx.GraphModule, example_inputs: Mapping[str, torch.Tensor]) -> list[LayerTokens]:
    """Tokens in and out of each attention layer, read from a shape propagation of ``gm``."""
    propagate_shapes(gm, example_inputs)
    modules = dict(gm.named_modules())
    layers = []
    for site in find_structure(gm).sites:
        tokens_in = tensor_meta_shape(site.key)[-2 if site.kind == "sdpa" else -1] * site.windows
        tokens_out, action = tokens_in, "-"
        for user, suffix in _readers(site.stream):
            module = modules.get(str(user.target)) if user.op == "call_module" else None
            if isinstance(module, TokenOp):
                meta = user.meta.get("tensor_meta")
                tokens_out = int(meta[0].shape[1]) + suffix
                action = f"{type(module).__name__}({module.extra_repr()})"
        layers.append(LayerTokens(site.index, site.name, tokens_in, tokens_out, action))
    return layers


def _readers(stream: fx.Node) -> list[tuple[fx.Node, int]]:
    """The users of ``stream``, and those of the part of it a token op sees (in front of a protected suffix),
    each with the number of protected trailing tokens it does not see."""
    users = list(stream.users)
    return [(user, 0) for user in users] + [(u, user.args[1]) for user in users if user.target is leading_tokens
                                            for u in user.users]
