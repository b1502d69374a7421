"""Tensors laid out by the original token positions that meet compressed tokens: refused, with their cause.

Rotary embeddings (EVA-02, RoPE ViTs) and relative position biases (BEiT, relpos ViTs) are tables indexed by
the original token positions; they meet the tokens through elementwise ops (a product with q and k, a sum with
the logits) or an attention mask. Matrix products are not checked: a fixed query (an attention-pooling probe)
legitimately meets the compressed keys there. After merging or pruning, row ``i`` of the stream is no longer token ``i``, so
such a table must be gathered with the tokens or the model computes something else: with static shapes the
mismatch may even broadcast silently. Until the tables follow the tokens, a model where one meets compressed
tokens is refused, naming the table.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import fx

from ..errors import StructureNotFoundError
from .graph import ancestors, is_shape_query, is_sdpa, tensor_meta_shape
from .structure import Structure

_PRODUCTS = {"bmm", "matmul", "mm", "baddbmm", "__matmul__", "einsum"}
_WEIGHTED = {"linear", "addmm", "mm", "conv1d", "conv2d", "convolution", "layer_norm", "native_layer_norm",
             "embedding", "group_norm", "rms_norm", "batch_norm"}


def _is_input_free(node: fx.Node) -> bool:
    """Computed from parameters, buffers and constants only (shape reads of the input allowed)."""
    return not any(n.op == "placeholder" for n in ancestors(node, through_shape_queries=False) | {node})


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    name = getattr(node.target, "__name__", str(node.target))
    return name.split(".")[0]


def _sources(gm: fx.GraphModule, node: fx.Node) -> list[str]:
    names = []
    for n in [node, *ancestors(node, through_shape_queries=False)]:
        if n.op == "get_attr":
            names.append(str(n.target))
        elif n.op == "call_module":
            names.append(str(n.target))
    return sorted(set(names))[:3]


def check_foreign_token_tensors(gm: fx.GraphModule, below: set[fx.Node], structure: Structure, tokens: int,
                                allowed: Collection[fx.Node] = frozenset()) -> None:
    """Refuse when a fixed token-sized tensor (position table) meets a tensor computed from compressed tokens
    (``below``: every node computed from the token ops). ``allowed``: the nodes of position tables that a finder
    recognised and rewired to the carried positions (``position_tables``)."""
    sizes = {tokens, tokens - structure.prefix, tokens - structure.prefix - structure.suffix}
    for node in gm.graph.nodes:
        if node not in below or node.op not in ("call_function", "call_method") or is_shape_query(node):
            continue
        if _op_name(node) in _PRODUCTS:
            continue  # a fixed query (an attention-pooling head's probe) meets the keys here, legitimately
        weighted = _op_name(node) in _WEIGHTED
        for other in node.all_input_nodes:
            if weighted and other.op == "get_attr":
                continue  # a layer's own weight
            if other in below or other in allowed or is_shape_query(other) or other.op == "placeholder":
                continue
            shape = tensor_meta_shape(other)
            if shape is None or not sizes & set(shape) or not _is_input_free(other):
                continue
            if torch.Size(shape).numel() <= max(sizes):
                continue  # a vector no larger than one row of tokens: a per-channel scale, not a table
            kind = _kind(node, other)
            layer = _layer_of(node, structure)
            raise StructureNotFoundError(
                f"{kind} at {node.name}{layer}: a fixed tensor of shape {list(shape)} (from "
                f"{', '.join(_sources(gm, other)) or 'constants'}) is laid out by the original token positions and "
                "meets the compressed tokens there; position tables that do not follow merged or pruned tokens would "
                "export a different model, so this is not supported (compress only layers after the last one that "
                "uses it, or use a model without it)"
            )


def _kind(node: fx.Node, table: fx.Node) -> str:
    near = {node, *node.users, *(u for user in node.users for u in user.users)}
    if any(is_sdpa(n) or _op_name(n) in ("softmax", "biased_attention", "combine_bias") for n in near):
        return "relative position bias"
    if _op_name(node) in ("mul", "addcmul"):
        return "rotary position embedding"
    return "position table"


def _layer_of(node: fx.Node, structure: Structure) -> str:
    for site in structure.sites:
        if node in ancestors(site.attention) or node is site.attention:
            return f" (attention layer {site.index})"
    return ""
