"""Finding transformer structure in a traced graph: attention sites, residual streams, prefix tokens.

A site is found from the graph alone: an attention op (``scaled_dot_product_attention``, or an explicit
``matmul -> softmax -> matmul``), the residual add that brings its output back into the stream, and the point
where that stream feeds the MLP branch (after a post-norm, if there is one). No class or attribute names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import math
import operator
from typing import Literal

import torch
from torch import fx, nn

from ..errors import StructureNotFoundError
from ..ops.base import TokenOp
from .graph import (
    ancestors,
    data_inputs,
    data_users,
    descendants,
    is_add,
    is_biased_attention,
    is_matmul,
    is_sdpa,
    is_softmax,
    node_kwarg,
    tensor_meta_shape,
)
from .opaque import refuse_opaque_attention

_LOGIT_SCALING = {"mul", "div", "truediv", "add", "sub"}
_ATTENTION_HELP = (
    "looked for torch.nn.functional.scaled_dot_product_attention or an explicit matmul -> softmax -> matmul "
    "(nn.MultiheadAttention and fused custom kernels are opaque to tracing)"
)


@dataclass
class AttentionSite:
    """One self-attention block in the graph and the places a token pass hooks into."""

    index: int
    kind: Literal["sdpa", "explicit"]
    attention: fx.Node  # the SDPA call, or the (probs @ v) matmul
    query: fx.Node  # (B, H, Nq, d) (or (B, Nq, d))
    key: fx.Node  # sdpa: (B, H, Nk, d); explicit: the transposed key (B, H, d, Nk)
    softmax: fx.Node | None  # explicit only
    residual_add: fx.Node
    stream: fx.Node  # the residual stream after attention, as it feeds the MLP branch
    block_input: fx.Node | None = None  # the stream entering the block (the residual add's skip input)
    windows: int = 1  # attention within this many equal windows of consecutive tokens, folded into the heads

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


@dataclass
class Structure:
    """What the passes know of a traced model: its self-attention sites and the facts around them."""

    sites: list[AttentionSite]
    prefix: int  # learned tokens (class, distillation, registers) in front of the input tokens
    skipped: list[str] = field(default_factory=list)  # attention left uncompressed (pooling heads, class attention)
    others: list[AttentionSite] = field(default_factory=list)  # those attentions (index -1), for their key bias
    grid: tuple[int, ...] | None = None  # the patch grid (H, W) or frames (T,) behind the unprotected tokens
    suffix: int = 0  # learned tokens after the input tokens (YOLOS's detection tokens)


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


def _mixed_logits(softmax: fx.Node, modules: dict) -> tuple[fx.Node | None, str]:
    """For a softmax whose input is not a scaled or biased q @ k^T: the nearest matmul behind it and what lies in
    between (the refusal names a linear layer there as talking-heads attention)."""
    frontier, seen, between = [softmax.args[0]], set(), []
    for _ in range(12):
        next_frontier = []
        for node in frontier:
            if not isinstance(node, fx.Node) or node in seen:
                continue
            seen.add(node)
            if is_matmul(node):
                return node, _mixing_reason(between, modules, node)
            between.append(node)
            next_frontier += [n for n in node.all_input_nodes if n.op not in ("get_attr", "placeholder")]
        frontier = next_frontier
    return None, _mixing_reason(between, modules)


def _is_table_lookup(node: fx.Node, logits: fx.Node | None) -> bool:
    """An embedding lookup (a learned table indexed by positions or buckets) feeds ``node``, other than the token
    embedding behind the logits ``q @ k^T``."""
    behind = ancestors(logits) if logits is not None else set()
    return any("embedding" in str(n.target) and n not in behind
               for n in [node, *ancestors(node)] if n.op in ("call_function", "call_module"))


def _mixing_reason(between: list[fx.Node], modules: dict, logits: fx.Node | None = None) -> str:
    """Talking heads when a small square linear layer (heads -> heads, as CaiT's) acts on the logits; a relative
    position bias when a learned table lookup (other than the tokens' own embedding) is added to them."""
    mixers = [modules.get(str(n.target)) for n in between if n.op == "call_module"]
    if any(isinstance(m, nn.Linear) and m.in_features == m.out_features <= 64 for m in mixers):
        return "talking-heads attention, as in CaiT, mixes heads with a linear layer"
    if any("masked_fill" in str(n.target) for n in between):
        return ("the padding mask is applied to the logits by masked_fill (as DeBERTa's XSoftmax does), not added: "
                "the padding pass rewires only additive masks")
    behind = ancestors(logits) if logits is not None else set()
    if any("gather" in str(other.target) for n in between for other in [n, *ancestors(n)]
           if other not in behind and other.op == "call_function"):
        return ("disentangled attention, as in DeBERTa: content-to-position and position-to-content terms, gathered "
                "by the relative distance between the original token positions, are added to the logits")
    if any(_is_table_lookup(other, logits) for n in between for other in n.all_input_nodes
           if other not in between and other is not logits):
        return ("a learned table looked up by token positions (a relative position bias, as MPNet's) is added to "
                "the logits in a form the relative-bias finder does not recognise")
    ops = sorted({getattr(n.target, "__name__", str(n.target)) for n in between})[:4]
    return f"it passes through {', '.join(ops)}"


def _probs_matmul(softmax: fx.Node, modules: dict) -> fx.Node | None:
    """Follow the softmax (through dropout-like single-input ops) to the probs @ v matmul."""
    frontier = [softmax]
    for _ in range(6):
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


def _residual_add(attention: fx.Node, order: dict[fx.Node, int]) -> tuple[fx.Node, fx.Node] | None:
    """The first add after ``attention`` that joins its output with a stream that fed the attention: (add, skip)."""
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
            return node, skip[0]
    return None


def _stream_after(residual_add: fx.Node, modules: dict) -> fx.Node | None:
    """From the residual add, follow a single-input chain (a post-norm) to where the stream branches.

    A stream already feeding a compressed op (a graph passes have run on) ends there. Assertions and shape
    queries are not consumers, so a norm's ``.to(float32)`` is followed like any single-input op.
    """
    node = residual_add
    for _ in range(4):
        consumers = data_users(node)
        if len(consumers) >= 2 or any(_is_token_op(u, modules) for u in consumers):
            return node
        if len(consumers) != 1 or len(data_inputs(consumers[0])) != 1:
            return None
        node = consumers[0]
    return None


Candidate = tuple[str, fx.Node, fx.Node, fx.Node, fx.Node | None, str | None]


def _attention_candidates(gm: fx.GraphModule) -> list[Candidate]:
    """Every attention op in graph order: (kind, attention node, query, key, softmax, why its logits cannot be
    followed or None). Mixed logits are refused after the shape checks, so windowed attention with a shift mask
    is named as windowed."""
    modules = dict(gm.named_modules())
    found = []
    for node in gm.graph.nodes:
        if is_biased_attention(node) or is_sdpa(node):
            if is_sdpa(node) and node_kwarg(node, "is_causal", 5):
                raise StructureNotFoundError(
                    f"attention {node.name} is causal; token compression needs bidirectional attention"
                )
            found.append(("sdpa", node, node.args[0], node.args[1], None, None))
        elif is_softmax(node, modules):
            attention = _probs_matmul(node, modules)
            if attention is None:
                _refuse_einsum_attention(node, modules)
                continue
            logits = _logits_matmul(node)
            mixed = None
            if logits is None and _unfolded(attention.args[1], modules):
                raise StructureNotFoundError(
                    f"attention {attention.name} is outlook attention (as in VOLO): its weights are a linear "
                    "projection of each token over its K x K neighbourhood, applied to values gathered by unfold "
                    "(no q @ k^T); it reads fixed grid neighbourhoods, which merged or pruned tokens do not have"
                )
            if logits is None:
                logits, how = _mixed_logits(node, modules)
                mixed = (f"attention {attention.name}: its softmax {node.name} does not take q @ k^T (scaled or "
                         f"biased) directly; something changes the logits in between ({how}), which the token "
                         "passes do not follow")
                if logits is None:
                    raise StructureNotFoundError(mixed)
            found.append(("explicit", attention, logits.args[0], logits.args[1], node, mixed))
    return found


def _is_einsum(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and "einsum" in str(node.target)


def _refuse_einsum_attention(softmax: fx.Node, modules: dict) -> None:
    """Refuse, by name, attention whose products are einsum contractions (Funnel Transformer's): the token passes
    read q, k and their layout from matmul / SDPA operands only. Names what else it has: terms added to the logits
    besides q k^T (relative positions), queries pooled to fewer tokens than the keys (pooled stages)."""
    frontier, probs = [softmax], None
    for _ in range(6):
        users = [u for n in frontier for u in n.users]
        probs = next((u for u in users if _is_einsum(u)), None)
        if probs is not None:
            break
        frontier = [u for u in users if len(data_inputs(u)) == 1]
    if probs is None:
        return
    frontier, contractions = [softmax.args[0]], set()
    for _ in range(12):
        nodes = [n for n in frontier if isinstance(n, fx.Node) and n.op == "call_function"]
        contractions |= {n for n in nodes if _is_einsum(n)}
        frontier = [a for n in nodes if not _is_einsum(n) for a in n.all_input_nodes]
    extras = []
    if len(contractions) > 1:
        extras.append(f"its logits add {len(contractions) - 1} more einsum term(s) to q k^T (relative positions, as "
                      "Funnel's)")
    pooled = [shape for n in softmax.graph.nodes if is_softmax(n, modules)
              and (shape := tensor_meta_shape(n)) is not None and len(shape) >= 2 and shape[-2] < shape[-1]]
    if pooled:
        extras.append(f"a later stage pools its queries ({pooled[0][-2]} queries over {pooled[0][-1]} keys: pooled "
                      "stages, as in Funnel Transformer), so the token count changes inside the blocks")
    besides = f"; besides, {' and '.join(extras)}" if extras else ""
    raise StructureNotFoundError(
        f"attention {probs.name} is written with einsum (probs and values contracted by einsum, as in Funnel "
        f"Transformer), whose operand layouts the token passes do not read{besides}"
    )


def _unfolded(values: object, modules: dict, depth: int = 6) -> bool:
    """Whether ``values`` (an attention's value operand) comes from an unfold (im2col) within ``depth`` steps."""
    frontier = [values]
    for _ in range(depth):
        nodes = [n for n in frontier if isinstance(n, fx.Node)]
        if any("unfold" in str(n.target) or isinstance(modules.get(str(n.target)), nn.Unfold) for n in nodes):
            return True
        frontier = [a for n in nodes for a in n.all_input_nodes]
    return False


def _attention_tokens(kind: str, query: fx.Node, key: fx.Node) -> tuple[int, int, int] | None:
    """(batch, query tokens, key tokens) of an attention, from the recorded shapes."""
    q, k = tensor_meta_shape(query), tensor_meta_shape(key)
    if q is None or k is None or len(q) < 3 or len(k) < 3:
        return None
    return q[0], q[-2], k[-2] if kind == "sdpa" else k[-1]


def _folded_windows(kind: str, query: fx.Node, key: fx.Node, skip: fx.Node | None) -> int:
    """W when the queries and keys are the stream's tokens (B, H, N, d) reshaped to (B, H x W, N / W, d): attention
    within W equal windows of consecutive tokens folded into the heads (Qwen2.5-VL's adapter); else 1."""
    stream = tensor_meta_shape(skip) if skip is not None else None
    if kind != "sdpa" or stream is None or len(stream) != 3:
        return 1
    found = set()
    for node in (query, key):
        source = node.args[0] if node.op == "call_method" and node.target in ("reshape", "view") and node.args else None
        before, after = tensor_meta_shape(source) if isinstance(source, fx.Node) else None, tensor_meta_shape(node)
        if before is None or after is None or len(before) != 4 or len(after) != 4 or before[2] != stream[1]:
            return 1
        windows = after[1] // before[1]
        if windows < 2 or after[1] != before[1] * windows or after[2] * windows != before[2] or after[0] != before[0]:
            return 1
        found.add(windows)
    return found.pop() if len(found) == 1 else 1


def _classify(name: str, tokens: tuple[int, int, int] | None, skip: fx.Node, key: fx.Node,
              mixed: str | None = None, query: fx.Node | None = None) -> str | None:
    """Why an attention with a residual is not a compressible self-attention block (None: it is one).

    Raises for structures that cannot be compressed correctly; returns a note for attention that is simply left
    alone (class attention, cross-attention: its queries are not the token stream, or its keys are not computed
    from it).
    """
    stream = tensor_meta_shape(skip)
    if tokens is None or stream is None:
        raise StructureNotFoundError(f"attention {name}: no shapes recorded for its queries, keys or stream")
    batch, queries, keys = tokens
    if skip not in ancestors(key, through_shape_queries=False):
        # Perceiver's latents reading the input, whatever the two counts: not PVT's pooled keys nor a self-attention
        return (f"{name} ({queries} queries over {keys} keys computed from another sequence than its residual "
                "stream: cross-attention, left uncompressed)")
    if len(stream) != 3:
        raise StructureNotFoundError(
            f"attention {name} is windowed attention (as in Swin): it attends within windows of {keys} tokens "
            f"while its residual stream is a {len(stream)}-D grid {list(stream)}; merging or pruning tokens would "
            "break the windows, so windowed attention is not supported"
        )
    if batch != stream[0] and queries == keys == stream[1] and batch % stream[0] == 0:
        raise StructureNotFoundError(
            f"attention {name} runs on {batch} = {stream[0]} x {batch // stream[0]} (batch x heads) maps of {keys} "
            "tokens: the heads are folded into the batch dimension (a (batch * heads, tokens, tokens) bmm, as in "
            "DeBERTa), a layout the token passes do not read keys from" + (f"; besides, {mixed}" if mixed else "")
        )
    if batch != stream[0] and queries == keys:
        raise StructureNotFoundError(
            f"attention {name} is windowed attention: it runs on {batch} windows of {keys} tokens, not on the "
            f"stream's {stream[0]} x {stream[1]} tokens; merging or pruning tokens would break the windows"
        )
    if queries == stream[1] and keys < queries:
        raise StructureNotFoundError(
            f"attention {name} is spatial-reduction attention (as in PVT): its {queries} queries attend to {keys} "
            "keys pooled from the token grid; merged or pruned tokens have no grid to pool, so it is not supported"
        )
    units = tensor_meta_shape(query) if query is not None else None
    if units is not None and len(units) >= 5 and units[-3] > 1 and units[-3] * keys == stream[1]:
        raise StructureNotFoundError(
            f"attention {name} is windowed mask-unit attention (as in Hiera): it attends within {units[-3]} mask "
            f"units of {keys} tokens each, and later stages pool the queries (fewer tokens per unit); merged or "
            "pruned tokens would break the mask units and the pooling, so it is not supported"
        )
    if queries == keys and queries != stream[1]:
        raise StructureNotFoundError(
            f"attention {name} attends over {keys} positions while its residual stream has {stream[1]} tokens: "
            "cross-covariance attention (as in XCiT) attends over channels, not tokens, so token passes cannot "
            "act on it"
        )
    if queries != stream[1] or keys != queries:
        return f"{name} ({queries} queries over {keys} keys: class or cross attention, left uncompressed)"
    return None


def find_structure(gm: fx.GraphModule) -> Structure:
    """Self-attention sites in graph order with their residual streams, the prefix tokens and the patch grid.

    Attention without a residual add (an attention-pooling head such as SigLIP's) and attention whose queries
    are not the token stream (CaiT's class attention) is left uncompressed and listed in ``skipped``. Windowed,
    spatial-reduction and cross-covariance attention, parallel attention branches and mixed logits are refused.
    """
    modules = dict(gm.named_modules())
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    sites: list[AttentionSite] = []
    skipped: list[str] = []
    others: list[AttentionSite] = []
    residuals: dict[fx.Node, fx.Node] = {}
    for kind, attention, query, key, softmax, mixed in _attention_candidates(gm):
        found = _residual_add(attention, order)
        tokens = _attention_tokens(kind, query, key)
        windows = _folded_windows(kind, query, key, found[1] if found is not None else None)
        if tokens is not None and windows > 1:
            tokens = (tokens[0], tokens[1] * windows, tokens[2] * windows)
        # raises for windowed, spatial-reduction and cross-covariance attention, before mixed logits are refused
        note = _classify(attention.name, tokens, found[1], key, mixed, query) if found is not None else None
        if mixed is not None:
            raise StructureNotFoundError(mixed)
        if found is None:
            queries = f"{tokens[1]} queries over {tokens[2]} keys" if tokens else "no residual"
            what = ("self-attention whose output rejoins the stream only after a reshape (e.g. divided space-time "
                    "attention over frames, then over patches)" if tokens and tokens[1] == tokens[2]
                    else "an attention-pooling head")
            skipped.append(f"{attention.name} ({queries}, no residual add: {what}, left uncompressed)")
            others.append(AttentionSite(-1, kind, attention, query, key, softmax, attention, attention))  # type: ignore[arg-type]
            continue
        residual, skip = found
        if note is not None:
            skipped.append(note)
            others.append(AttentionSite(-1, kind, attention, query, key, softmax, residual, attention))  # type: ignore[arg-type]
            continue
        if residual in residuals:
            first = residuals[residual]
            if _shared_projection(first, attention, skip, modules):
                raise StructureNotFoundError(
                    f"attentions {first.name} and {attention.name} take q and k from one projection and join in "
                    f"one residual add ({residual.name}): differential attention (two softmax maps subtracted, as in "
                    "DiffAttention) is not supported"
                )
            raise StructureNotFoundError(
                f"attentions {first.name} and {attention.name} share one residual add "
                f"({residual.name}): parallel attention branches (as in parallel-block ViTs) are not supported"
            )
        residuals[residual] = attention
        _refuse_bottleneck(attention, residual, skip, order)
        stream = _stream_after(residual, modules)
        if stream is None:
            if _parallel_branch(attention, residual, skip, modules):
                raise StructureNotFoundError(
                    f"attention {attention.name} and an MLP read one input and join in one residual add "
                    f"({residual.name}): a parallel block (as in ViT-22B); there is no stream between attention and "
                    "MLP to compress, so parallel attention branches are not supported"
                )
            raise StructureNotFoundError(
                f"found attention {attention.name} and its residual add {residual.name}, but not where the "
                "residual stream feeds the MLP branch"
            )
        sites.append(AttentionSite(len(sites), kind, attention, query, key, softmax, residual, stream, skip,  # type: ignore[arg-type]
                                   windows))
    if not sites:
        if skipped:
            raise StructureNotFoundError(
                f"no self-attention block with a residual add found (only: {'; '.join(skipped)}); token passes "
                "need residual transformer blocks"
            )
        refuse_opaque_attention(gm)
        raise StructureNotFoundError(f"no attention found in the traced graph: {_ATTENTION_HELP}")
    _refuse_second_stream(sites)
    prefix = detect_prefix_tokens(gm, sites[0])
    suffix = detect_prefix_tokens(gm, sites[0], trailing=True)
    return Structure(sites, prefix, skipped, others, find_patch_grid(gm, sites[0], prefix + suffix), suffix)


def _refuse_bottleneck(attention: fx.Node, residual: fx.Node, skip: fx.Node, order: dict[fx.Node, int]) -> None:
    """Refuse a block whose attention branch holds residual adds of its own before it rejoins the block's input:
    a bottleneck (MobileBERT) runs attention and a feed-forward stack on a narrower projection of the stream, so
    there is no stream between attention and MLP at the block's width to compress."""
    tokens = tensor_meta_shape(residual)
    if tokens is None or len(tokens) != 3:
        return
    below = descendants(attention)
    between = below & ancestors(residual)
    # x + f(x) inside the branch (both sides computed from the attention): not a parallel MLP joining it (ViT-22B)
    inner = sorted((n for n in between if is_add(n) and _joins_token_streams(n, tokens[1], below)), key=order.__getitem__)
    if not inner:
        return
    width = tensor_meta_shape(inner[0])
    inside = f"{width[-1]} channels inside a {tokens[-1]}-channel block" if width and width[-1] != tokens[-1] else (
        "inside the block")
    raise StructureNotFoundError(
        f"attention {attention.name} sits in a bottleneck block (as in MobileBERT): it and a feed-forward stack run "
        f"at {inside}, with residual adds of their own ({inner[0].name}), and the block's input ({skip.name}) rejoins "
        f"only at {residual.name}; there is no stream between attention and MLP at the block's width to compress, "
        "so bottleneck blocks are not supported"
    )


def _joins_token_streams(node: fx.Node, tokens: int, within: set[fx.Node]) -> bool:
    """An add of two (batch, tokens, channels) tensors both in ``within``: a residual add inside a branch, not a
    bias, a position table or a parallel branch joining it."""
    parts = [a for a in node.args if isinstance(a, fx.Node)]
    shapes = [tensor_meta_shape(a) for a in parts]
    return len(parts) == 2 and all(a in within for a in parts) and all(
        s is not None and len(s) == 3 and s[1] == tokens for s in shapes)


def _parallel_branch(attention: fx.Node, residual: fx.Node, skip: fx.Node, modules: dict) -> bool:
    """Whether a linear layer off the attention path also reads the block's input and feeds its residual add."""
    on_path = ancestors(attention) | descendants(attention) | {attention}
    return any(_is_linear(node, modules) for node in (ancestors(residual) & descendants(skip)) - on_path)


def _is_linear(node: fx.Node, modules: dict) -> bool:
    return (node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.Linear)) \
        or getattr(node.target, "__name__", "") == "linear"


def _shared_projection(first: fx.Node, second: fx.Node, skip: fx.Node, modules: dict) -> bool:
    """Whether two attentions of one block read one linear projection of the block's input (differential
    attention) rather than each its own (parallel branches)."""
    def projections(attention: fx.Node) -> set[fx.Node]:
        return {n for n in ancestors(attention) - ancestors(skip) if _is_linear(n, modules)}

    return bool(projections(first) & projections(second))


def _refuse_second_stream(sites: list[AttentionSite]) -> None:
    """Self-attention sites whose streams differ in batch belong to two token streams (TNT's inner transformer
    runs over the pixels of every patch, batch x patches wide); a token op on one would misalign the other."""
    first = tensor_meta_shape(sites[0].stream)
    for site in sites[1:]:
        shape = tensor_meta_shape(site.stream)
        if first is not None and shape is not None and shape[0] != first[0]:
            raise StructureNotFoundError(
                f"attentions {sites[0].name} and {site.name} run on two token streams (batch {first[0]} x "
                f"{first[1]} tokens and batch {shape[0]} x {shape[1]} tokens), as in a transformer-in-transformer "
                "(TNT) whose inner stream attends within each patch; compressing one stream would misalign the "
                "other, so two-stream models are not supported"
            )


def find_attention_sites(gm: fx.GraphModule) -> list[AttentionSite]:
    """All self-attention sites in graph order, each with its residual stream. Raises if none are found."""
    return find_structure(gm).sites


def find_patch_grid(gm: fx.GraphModule, first_site: AttentionSite, prefix: int) -> tuple[int, ...] | None:
    """The grid behind the unprotected tokens: the last convolution's output (H, W) or (T,) before the blocks.
    ``prefix``: the protected tokens (leading and trailing).

    Only a grid whose size equals the unprotected token count is returned (a hybrid stem's features qualify).
    """
    tokens = first_site.num_tokens() - prefix
    grid = None
    for node in ancestors(first_site.block_input or first_site.stream):
        if not _is_convolution(node, gm):
            continue
        shape = tensor_meta_shape(node)
        if shape is not None and len(shape) == 5 and shape[2] == 1:
            shape = (*shape[:2], *shape[3:])  # a 3-D patch embedding over one frame (Qwen2-VL's): its (H, W)
        if shape is not None and len(shape) in (3, 4) and math.prod(shape[2:]) == tokens:
            grid = tuple(shape[2:])
    return grid


def _is_convolution(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return name.split(".")[0] in ("conv1d", "conv2d", "conv3d", "convolution")
    return False


def detect_prefix_tokens(gm: fx.GraphModule, first_site: AttentionSite, trailing: bool = False) -> int:
    """Count the learned tokens (class, distillation, registers) in front of the input tokens at the first block;
    ``trailing``: those after them instead (YOLOS's detection tokens, concatenated after the patches).

    Followed back from the first block's input: a ``cat`` along the token axis adds its leading parts that do not
    depend on the model input's data (their batch size may come from its shape: ``cls.expand(B, -1, -1)``), and
    a leading slice ``x[:, :k]`` of a tensor whose first ``k`` tokens are already prefix tokens (registers put
    after the class token, as transformers' DINOv2 does); per-token ops (adding positions, norms) keep the count.
    """
    placeholders = {n for n in gm.graph.nodes if n.op == "placeholder"}

    def input_free(node: fx.Node) -> bool:
        return not placeholders & (ancestors(node, through_shape_queries=False) | {node})

    def tokens(node: fx.Node) -> int | None:
        shape = tensor_meta_shape(node)
        return shape[1] if shape is not None and len(shape) == 3 else None

    memo: dict[fx.Node, int] = {}

    def prefix_of(node: fx.Node, depth: int = 0) -> int:
        if node in memo or depth > 64:
            return memo.get(node, 0)
        count = 0
        name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        if node.op == "call_function" and name == "cat" and (node_kwarg(node, "dim", 1) or 0) in (1, -2):
            for part in reversed(node.args[0]) if trailing else node.args[0]:
                if not isinstance(part, fx.Node) or tokens(part) is None:
                    break
                if input_free(part):
                    count += tokens(part) or 0
                    continue
                leading = None if trailing else _leading_slice(part)
                if leading is not None and prefix_of(leading[0], depth + 1) >= leading[1]:
                    count += leading[1]
                    continue
                break
        else:
            data = [n for n in data_inputs(node) if not input_free(n) and tokens(n) == tokens(node)]
            if len(data) == 1 and tokens(node) is not None:
                count = prefix_of(data[0], depth + 1)
        memo[node] = count
        return count

    return prefix_of(first_site.block_input or first_site.stream)


def _leading_slice(node: fx.Node) -> tuple[fx.Node, int] | None:
    """``x[:, :k]`` (or ``aten.slice(x, 1, 0, k)``) -> (x, k)."""
    args = node.args
    if node.op != "call_function" or not args or not isinstance(args[0], fx.Node):
        return None
    if node.target is operator.getitem and isinstance(args[1], tuple) and len(args[1]) >= 2:
        first, second = args[1][0], args[1][1]
        if first == slice(None) and isinstance(second, slice) and second.start in (None, 0) and second.step in (None, 1):
            return (args[0], second.stop) if isinstance(second.stop, int) else None
    if node.target is torch.ops.aten.slice.Tensor and len(args) >= 4 and args[1] in (1, -2) and args[2] in (0, None):
        return (args[0], args[3]) if isinstance(args[3], int) else None
    return None


def reads_first_token(gm: fx.GraphModule, structure: Structure) -> bool:
    """Does the model read token 0 of its final token stream (a class token's job)? Registers are not read."""
    from .pooling import token_access

    tokens = structure.sites[-1].num_tokens()
    for node in descendants(structure.sites[-1].stream):
        access = token_access(node)
        shape = tensor_meta_shape(node.args[0]) if access else None
        if access is None or shape is None or shape[1] != tokens:
            continue
        if access[0] == "index" and access[1] == 0:
            return True
        if access[0] == "slice" and access[1] in (None, 0) and access[2] == 1:
            return True
    return False


def find_sites_and_prefix(gm: fx.GraphModule) -> tuple[list[AttentionSite], int]:
    """Attention sites and the number of prefix tokens (shapes must have been propagated)."""
    structure = find_structure(gm)
    return structure.sites, structure.prefix
