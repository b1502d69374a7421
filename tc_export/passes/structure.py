"""Finding transformer structure in a traced graph: attention sites, residual streams, prefix tokens.

A site is found from the graph alone: an attention op (``scaled_dot_product_attention``, or an explicit
``matmul -> softmax -> matmul``), the residual add that brings its output back into the stream, and the point
where that stream feeds the MLP branch (after a post-norm, if there is one). No class or attribute names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import fx

from ..errors import StructureNotFoundError
from ..ops.base import TokenOp
from .graph import (
    ancestors,
    data_inputs,
    descendants,
    is_add,
    is_biased_attention,
    is_matmul,
    is_sdpa,
    is_shape_query,
    is_softmax,
    node_kwarg,
    tensor_meta_shape,
)

_LOGIT_SCALING = {"mul", "div", "truediv", "add", "sub"}
_ATTENTION_HELP = (
    "looked for torch.nn.functional.scaled_dot_product_attention or an explicit matmul -> softmax -> matmul "
    "(nn.MultiheadAttention and fused custom kernels are opaque to tracing)"
)


@dataclass
class AttentionSite:
    """One attention block in the graph and the places a token pass hooks into."""

    index: int
    kind: Literal["sdpa", "explicit"]
    attention: fx.Node  # the SDPA call, or the (probs @ v) matmul
    query: fx.Node  # (B, H, Nq, d) (or (B, Nq, d))
    key: fx.Node  # sdpa: (B, H, Nk, d); explicit: the transposed key (B, H, d, Nk)
    softmax: fx.Node | None  # explicit only
    residual_add: fx.Node
    stream: fx.Node  # the residual stream after attention, as it feeds the MLP branch

    @property
    def name(self) -> str:
        return self.attention.name

    def key_layout(self) -> tuple[int, ...]:
        shape = tensor_meta_shape(self.key)
        if shape is None:
            raise StructureNotFoundError(f"no shape recorded for the key of attention {self.name}")
        return shape

    def num_tokens(self) -> int:
        shape = tensor_meta_shape(self.stream)
        if shape is None or len(shape) != 3:
            raise StructureNotFoundError(
                f"the residual stream at {self.stream.name} is not a (batch, tokens, channels) tensor: {shape}"
            )
        return shape[1]


def _logits_matmul(softmax: fx.Node) -> fx.Node | None:
    """Walk back from a softmax input through scaling/bias ops to the q @ k^T matmul."""
    node = softmax.args[0] if softmax.args else None
    for _ in range(6):
        if not isinstance(node, fx.Node):
            return None
        if is_matmul(node):
            return node
        op_name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        if node.op in ("call_function", "call_method") and op_name in _LOGIT_SCALING:
            tensors = [a for a in node.args if isinstance(a, fx.Node)]
            node = tensors[0] if tensors else None
        else:
            return None
    return None


def _probs_matmul(softmax: fx.Node, modules: dict) -> fx.Node | None:
    """Follow the softmax (through dropout-like single-input ops) to the probs @ v matmul."""
    frontier = [softmax]
    for _ in range(3):
        next_frontier = []
        for node in frontier:
            for user in node.users:
                if is_matmul(user) and user.args[0] is node:
                    return user
                if len(data_inputs(user)) == 1:
                    next_frontier.append(user)
        frontier = next_frontier
    return None


def _is_token_op(node: fx.Node, modules: dict) -> bool:
    return node.op == "call_module" and isinstance(modules.get(str(node.target)), TokenOp)


def _residual_add(attention: fx.Node, order: dict[fx.Node, int]) -> fx.Node | None:
    """The first add after ``attention`` that joins its output with a stream that fed the attention."""
    downstream = descendants(attention)
    upstream = ancestors(attention)
    for node in sorted(downstream, key=order.__getitem__):
        if not is_add(node):
            continue
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        if len(tensors) != 2:
            continue
        from_attention = [t for t in tensors if t in downstream]
        skip = [t for t in tensors if t not in downstream and t in upstream]
        if len(from_attention) == 1 and len(skip) == 1:
            return node
    return None


def _stream_after(residual_add: fx.Node, modules: dict) -> fx.Node | None:
    """From the residual add, follow a single-input chain (a post-norm) to where the stream branches.

    A stream already feeding a compressed op (a graph passes have run on) ends there.
    """
    node = residual_add
    for _ in range(4):
        consumers = [u for u in node.users if not is_shape_query(u)]
        if len(consumers) >= 2 or any(_is_token_op(u, modules) for u in consumers):
            return node
        if len(consumers) != 1 or len(data_inputs(consumers[0])) != 1:
            return None
        node = consumers[0]
    return None


def find_attention_sites(gm: fx.GraphModule) -> list[AttentionSite]:
    """All attention sites in graph order, each with its residual stream. Raises if none are found."""
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    order = {node: i for i, node in enumerate(nodes)}
    sites: list[AttentionSite] = []
    for node in nodes:
        if is_biased_attention(node):
            kind, attention, softmax = "sdpa", node, None
            query, key = node.args[0], node.args[1]
        elif is_sdpa(node):
            kind, attention, softmax = "sdpa", node, None
            query, key = node.args[0], node.args[1]
            if node_kwarg(node, "is_causal", 5):
                raise StructureNotFoundError(f"attention {node.name} is causal; token compression needs bidirectional attention")
        elif is_softmax(node, modules):
            logits = _logits_matmul(node)
            attention = _probs_matmul(node, modules)
            if logits is None or attention is None:
                continue
            kind, softmax = "explicit", node
            query, key = logits.args[0], logits.args[1]
        else:
            continue
        residual = _residual_add(attention, order)
        if residual is None:
            raise StructureNotFoundError(
                f"found attention {attention.name} but no residual add after it (x + attn(x)); "
                "token passes need a residual transformer block"
            )
        stream = _stream_after(residual, modules)
        if stream is None:
            raise StructureNotFoundError(
                f"found attention {attention.name} and its residual add {residual.name}, but not where the "
                "residual stream feeds the MLP branch"
            )
        sites.append(AttentionSite(len(sites), kind, attention, query, key, softmax, residual, stream))
    if not sites:
        raise StructureNotFoundError(f"no attention found in the traced graph: {_ATTENTION_HELP}")
    return sites


def detect_prefix_tokens(gm: fx.GraphModule, first_site: AttentionSite) -> int:
    """Count the learned tokens (class, distillation, registers) concatenated in front of the input tokens.

    A prefix token is a ``cat`` input along the token axis that does not depend on the model input's data
    (its batch size may come from the input's shape: ``cls.expand(x.shape[0], -1, -1)``).
    """
    placeholders = {n for n in gm.graph.nodes if n.op == "placeholder"}
    prefix = 0
    for node in ancestors(first_site.stream):
        if node.op != "call_function" or getattr(node.target, "__name__", "").split(".")[0] != "cat":
            continue
        parts = node.args[0]
        dim = node_kwarg(node, "dim", 1) or 0
        shape = tensor_meta_shape(node)
        if shape is None or len(shape) != 3 or dim not in (1, -2):
            continue
        count = 0
        for part in parts:
            if not isinstance(part, fx.Node) or placeholders & (ancestors(part, through_shape_queries=False) | {part}):
                break
            part_shape = tensor_meta_shape(part)
            count += part_shape[1] if part_shape else 0
        prefix = max(prefix, count)
    return prefix


def find_sites_and_prefix(gm: fx.GraphModule) -> tuple[list[AttentionSite], int]:
    """Attention sites and the number of prefix tokens (shapes must have been propagated)."""
    sites = find_attention_sites(gm)
    return sites, detect_prefix_tokens(gm, sites[0])
