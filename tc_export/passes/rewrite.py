"""Small graph edits shared by token passes: key metrics and attention biases."""

from __future__ import annotations

import torch
from torch import fx

from ..errors import StructureNotFoundError
from ..ops.attention import (
    biased_attention,
    class_attention,
    class_attention_from_probs,
    received_attention,
    received_attention_from_probs,
)
from .graph import is_biased_attention, is_sdpa, node_kwarg
from .structure import AttentionSite


def key_metric_from_heads(key: torch.Tensor) -> torch.Tensor:
    """Keys (B, H, N, d) averaged over heads -> (B, N, d).

    Written as a (1, H) @ (B, H, N*d) product: ONNX Runtime's ReduceMean over the head axis takes about twice
    as long at ViT-B size, and this runs once per merge.
    """
    batch, heads, tokens, dim = key.shape
    weights = key.new_full((1, heads), 1.0 / heads)
    return (weights @ key.reshape(batch, heads, tokens * dim)).reshape(batch, tokens, dim)


def key_metric_from_transposed_heads(key_t: torch.Tensor) -> torch.Tensor:
    """Transposed keys (B, H, d, N) averaged over heads -> (B, N, d)."""
    batch, heads, dim, tokens = key_t.shape
    weights = key_t.new_full((1, heads), 1.0 / heads)
    return (weights @ key_t.reshape(batch, heads, dim * tokens)).reshape(batch, dim, tokens).transpose(-1, -2)


def insert_key_metric(graph: fx.Graph, site: AttentionSite) -> fx.Node:
    """Insert the ToMe metric (keys averaged over heads, (B, N, d)) right after the site's key tensor."""
    layout = site.key_layout()
    if len(layout) == 4:
        fn = key_metric_from_heads if site.kind == "sdpa" else key_metric_from_transposed_heads
    elif len(layout) == 3 and site.kind == "sdpa":
        return site.key
    elif len(layout) == 3:
        fn = _transpose_last
    else:
        raise StructureNotFoundError(
            f"keys of attention {site.name} have shape {layout}; expected (batch, heads, tokens, dim)"
        )
    with graph.inserting_after(site.key):
        return graph.call_function(fn, (site.key,))


def full_width(heads: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """Per-head queries or keys (B, H, N, d) (``transposed``: (B, H, d, N)) as full-width rows (B, N, H*d)."""
    if transposed:
        heads = heads.transpose(-1, -2)
    if heads.dim() == 3:
        return heads
    batch, num_heads, tokens, dim = heads.shape
    return heads.transpose(1, 2).reshape(batch, tokens, num_heads * dim)


def _transpose_last(key_t: torch.Tensor) -> torch.Tensor:
    return key_t.transpose(-1, -2)


def add_attention_bias(site: AttentionSite, bias: fx.Node) -> None:
    """Add ``bias`` (broadcastable to the logits) to the site's attention logits before the softmax.

    An SDPA call is replaced by ``biased_attention``; ``site.attention`` then points at the replacement.
    """
    if is_biased_attention(site.attention):
        node = site.attention
        with node.graph.inserting_before(node):
            combined = node.graph.call_function(torch.add, (node.args[3], bias))
        node.args = (*node.args[:3], combined, *node.args[4:])
        return
    if site.kind == "sdpa":
        site.attention = _replace_sdpa_with_biased(site, bias)
        return
    softmax = site.softmax
    assert softmax is not None
    logits = softmax.args[0]
    with softmax.graph.inserting_before(softmax):
        fitted = softmax.graph.call_function(fit_bias, (bias, logits))
        biased = softmax.graph.call_function(torch.add, (logits, fitted))
    softmax.args = (biased, *softmax.args[1:])


def write_out_biased_sdpa(site: AttentionSite) -> None:
    """An SDPA whose mask is a float bias (relative positions) as ``biased_attention`` with that bias: the exporter
    cannot export the SDPA form (see ``ops.attention``), and a bias looked up per sample joins it there."""
    if is_sdpa(site.attention) and isinstance(node_kwarg(site.attention, "attn_mask", 3), fx.Node):
        site.attention = _replace_sdpa_with_biased(site, None)


def _replace_sdpa_with_biased(site: AttentionSite, bias: fx.Node | None) -> fx.Node:
    """Swap the site's SDPA call for ``biased_attention`` with the same scale (default 1/sqrt(d)); ``bias`` None:
    the mask alone is the bias."""
    node = site.attention
    mask = node_kwarg(node, "attn_mask", 3)
    if isinstance(mask, fx.Node) and bias is None:
        bias = mask
    elif isinstance(mask, fx.Node):  # the model's own bias (e.g. relative positions): both apply
        with node.graph.inserting_before(node):
            bias = node.graph.call_function(combine_bias, (mask, bias))
    dropout = node_kwarg(node, "dropout_p", 4)
    if isinstance(dropout, fx.Node) or (dropout or 0.0) != 0.0:
        raise StructureNotFoundError(f"attention {site.name} uses dropout; trace the model in eval mode")
    scale = node_kwarg(node, "scale", 6)
    if scale is None:
        scale = site.key_layout()[-1] ** -0.5
    query, key, value = node.args[:3]
    with node.graph.inserting_before(node):
        replacement = node.graph.call_function(biased_attention, (query, key, value, bias, float(scale)))
    replacement.meta = dict(node.meta)  # same output: later shape fixes read the recorded shape
    node.replace_all_uses_with(replacement)
    node.graph.erase_node(node)
    return replacement


def fit_bias(bias: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """A (B, 1, 1, N) key bias for logits (B, H, Nq, N), or for (B*H, Nq, N) logits with heads folded into the
    batch (``nn.MultiheadAttention``'s layout): repeated per head, batch-major."""
    if logits.dim() == 4:
        return bias
    batch = bias.shape[0]
    flat = bias.reshape(batch, 1, bias.shape[-1])
    return flat.repeat_interleave(logits.shape[0] // batch, dim=0)


def combine_bias(mask: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """An SDPA mask (bool: True = attend, or additive) plus an additive bias."""
    if mask.dtype == torch.bool:
        mask = torch.zeros_like(mask, dtype=bias.dtype).masked_fill(~mask, float("-inf"))
    return mask + bias


def insert_class_attention(graph: fx.Graph, site: AttentionSite, received: bool = False) -> fx.Node:
    """Insert the class token's head-averaged attention row, (B, N), for the site's attention (``received``: the
    attention each token receives, averaged over queries and heads, instead).

    Explicit attention: read row 0 of the softmax output (its mean over rows). SDPA: recompute that one row (all
    rows) from q, k (and the bias).
    """
    if site.softmax is not None:
        with graph.inserting_after(site.softmax):
            return graph.call_function(received_attention_from_probs if received else class_attention_from_probs,
                                       (site.softmax,))
    node = site.attention
    query, key = node.args[0], node.args[1]
    if is_biased_attention(node):
        bias, scale = node.args[3], node.args[4]
    else:
        bias, scale = node_kwarg(node, "attn_mask", 3), node_kwarg(node, "scale", 6)
        if scale is None:
            scale = site.key_layout()[-1] ** -0.5
    with graph.inserting_after(node):
        return graph.call_function(received_attention if received else class_attention,
                                   (query, key, bias, float(scale)))
