"""transformers YOLOS one sample at a time, from its weights: learned detection tokens after the patches.

A method acts on the tokens in front of the detection tokens only; those stay last, unchanged and in order, as
the detection head reads the last ``num_detection_tokens`` outputs. Nothing here imports tc_export.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import reference_merge
from .reference_encoders import Encoder, Hooks, _pre_norm, run


def hf_yolos_tokens(model: torch.nn.Module) -> Encoder:
    """transformers YolosModel (last hidden state: every token after the final norm)."""
    heads = model.config.num_attention_heads

    def layer(block):
        a = block.attention
        return _pre_norm(heads, a.attention, "query", "key", "value", a.output.dense,
                         lambda t: block.output.dense(block.intermediate.intermediate_act_fn(block.intermediate.dense(t))),
                         block.layernorm_before, block.layernorm_after)

    def embed(sample):
        x = model.embeddings(sample["pixel_values"])[0]
        return x, torch.ones(x.shape[0], 1)

    return Encoder(embed, [layer(b) for b in model.encoder.layer], lambda x, s, p: model.layernorm(x))


def before_suffix(step, suffix: int):
    """A per-sample step (``reference_encoders.Hooks``) applied to the tokens in front of the ``suffix`` last ones
    (with their keys, attention rows or projections cut the same way); the suffix rejoins after, unchanged."""

    def cut(t: Tensor, tokens: int, body: int) -> Tensor:
        """Token rows (dim -2) of keys, projections or attention; also the key columns of an attention matrix."""
        t = t[..., :body, :]
        return t[..., :body] if t.shape[-1] == tokens else t

    def wrapped(layer: int, x: Tensor, size: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        tokens = x.shape[0]
        body = tokens - suffix
        out, sizes = step(layer, x[:body], size[:body], cut(a, tokens, body), cut(b, tokens, body))
        return torch.cat([out, x[body:]]), torch.cat([sizes, size[body:]])

    return wrapped


def tome_before_suffix(r: int, prefix: int, suffix: int):
    """ToMe as an ``after_attention`` step on the tokens in front of the suffix."""
    return before_suffix(lambda i, x, size, keys, probs: reference_merge(x, keys.mean(0), size, r, prefix), suffix)


def reference_yolos_tome(model: torch.nn.Module, pixel_values: Tensor, r: int) -> tuple[Tensor, list[int]]:
    suffix = model.config.num_detection_tokens
    return run(hf_yolos_tokens(model), {"pixel_values": pixel_values},
               Hooks(after_attention=tome_before_suffix(r, 1, suffix), prop_attn=True))
