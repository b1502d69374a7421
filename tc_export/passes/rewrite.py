"""Small graph edits shared by token passes: key metrics and attention biases."""

from __future__ import annotations

import torch
from torch import fx

from ..errors import StructureNotFoundError
from ..ops.attention import biased_attention
from .graph import is_biased_attention, node_kwarg
from .structure import AttentionSite


def key_metric_from_heads(key: torch.Tensor) -> torch.Tensor:
    """Keys (B, H, N, d) averaged over heads -> (B, N, d)."""
    return key.mean(dim=1)


def key_metric_from_transposed_heads(key_t: torch.Tensor) -> torch.Tensor:
    """Transposed keys (B, H, d, N) averaged over heads -> (B, N, d)."""
    return key_t.mean(dim=1).transpose(-1, -2)


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


def _transpose_last(key_t: torch.Tensor) -> torch.Tensor:
    return key_t.transpose(-1, -2)


def add_attention_bias(site: AttentionSite, bias: fx.Node) -> None:
    """Add ``bias`` (broadcastable to the logits) to the site's attention logits before the softmax."""
    if is_biased_attention(site.attention):
        node = site.attention
        with node.graph.inserting_before(node):
            combined = node.graph.call_function(torch.add, (node.args[3], bias))
        node.args = (*node.args[:3], combined, *node.args[4:])
        return
    if site.kind == "sdpa":
        _replace_sdpa_with_biased(site, bias)
        return
    softmax = site.softmax
    assert softmax is not None
    logits = softmax.args[0]
    with softmax.graph.inserting_before(softmax):
        biased = softmax.graph.call_function(torch.add, (logits, bias))
    softmax.args = (biased, *softmax.args[1:])


def _replace_sdpa_with_biased(site: AttentionSite, bias: fx.Node) -> None:
    """Swap the site's SDPA call for ``biased_attention`` with the same scale (default 1/sqrt(d))."""
    node = site.attention
    if node_kwarg(node, "attn_mask", 3) is not None:
        raise StructureNotFoundError(
            f"attention {site.name} already has a mask; a token pass cannot add its bias to it yet"
        )
    dropout = node_kwarg(node, "dropout_p", 4)
    if isinstance(dropout, fx.Node) or (dropout or 0.0) != 0.0:
        raise StructureNotFoundError(f"attention {site.name} uses dropout; trace the model in eval mode")
    scale = node_kwarg(node, "scale", 6)
    if scale is None:
        scale = site.key_layout()[-1] ** -0.5
    query, key, value = node.args[:3]
    with node.graph.inserting_before(node):
        replacement = node.graph.call_function(biased_attention, (query, key, value, bias, float(scale)))
    node.replace_all_uses_with(replacement)
    node.graph.erase_node(node)
    site.attention = replacement
