"""Padding masks: where token sizes start, the model's own masks, and size-aware pooling.

The token state is a size per token. A model with a padding mask (a text encoder's ``attention_mask``) starts
from sizes = mask: a pad has size 0, so log(size) = -inf keeps attention off it and every size-weighted merge
gives it no weight. The model's own mask (built once, for the original token count) is removed from each
attention; the token pass adds the size bias instead, at every layer. A learned bias built into that mask (T5's
relative positions) stays: the mask becomes the bias alone. A mask that does not depend on any input
(transformers builds an all-true one for vision models) is evaluated and dropped when it masks nothing.

A padding mask may also hide tokens by position. A sliding window (ModernBERT's local layers: key j is seen by
query i when ``|i - j| <= w``) is recognised by evaluating the mask with nothing padded: it must be exactly that
band, the same for every sample and head. The band stays, as a fixed bias (0 inside, ``WINDOW_OUTSIDE`` outside,
finite so that a pad query whose window holds only pads stays finite; its output has no weight anywhere), and the
site gets a ``SlidingWindow`` position table, which recomputes the band from the carried positions where the
site runs on compressed tokens. Any other positional part of a padding mask (causal attention) is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import fx

from ..errors import StructureNotFoundError
from ..ops.tokens import is_weighted_mean
from .graph import ancestors, is_add, is_input_free, is_sdpa, tensor_meta_shape
from .position_tables import PositionTable
from .structure import AttentionSite

WINDOW_OUTSIDE = -1e9  # the bias outside a sliding window: exp() of it is 0 in float32 next to any in-window logit
WINDOW_TOLERANCE = 1e-4  # merged positions are float means: a key at distance w + rounding is still inside


def _placeholders(nodes: set[fx.Node]) -> list[fx.Node]:
    return [n for n in nodes if n.op == "placeholder"]


def _mask_argument(node: fx.Node) -> tuple[int | str, fx.Node] | None:
    if len(node.args) > 3 and isinstance(node.args[3], fx.Node):
        return 3, node.args[3]
    mask = node.kwargs.get("attn_mask")
    return ("attn_mask", mask) if isinstance(mask, fx.Node) else None


_LOGIT_STEPS = 6  # scaling, casts and adds between q @ k^T and the softmax, as structure._logits_matmul follows


def _explicit_mask(site: AttentionSite) -> tuple[fx.Node, fx.Node] | None:
    """The additive mask of an explicit attention (eager ``scores + attention_mask`` before the softmax, as BERT's
    and RoFormer's eager attention write it): (the add, the mask operand, which does not read q @ k^T)."""
    if site.softmax is None or not site.softmax.args:
        return None
    logits = site.key.users and next((u for u in site.key.users if u.args and u.args[-1] is site.key), None)
    node = site.softmax.args[0]
    for _ in range(_LOGIT_STEPS):
        if not isinstance(node, fx.Node) or node is logits:
            return None
        if is_add(node) and len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args):
            first, second = node.args
            behind = [a for a in (first, second) if logits is not None and (a is logits or logits in ancestors(a))]
            if len(behind) == 1:
                return node, second if behind[0] is first else first
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        if not tensors:
            return None
        node = tensors[0]
    return None


def _clear_mask(node: fx.Node, where: int | str | fx.Node, keep: fx.Node | None = None) -> None:
    """Drop the mask argument, or replace it by ``keep`` (the learned bias the mask was built around). ``where``:
    the SDPA argument, or the mask itself for an explicit attention's ``scores + mask`` add (``node``)."""
    if isinstance(where, fx.Node):
        scores = node.args[1] if node.args[0] is where else node.args[0]
        if keep is None:
            node.replace_all_uses_with(scores)
        else:
            node.args = (scores, keep)
        return
    if isinstance(where, int):
        node.args = (*node.args[:3], keep, *node.args[4:])
    else:
        node.kwargs = {**node.kwargs, "attn_mask": keep}


def _masks_nothing(gm: fx.GraphModule, mask: fx.Node, example_inputs: Mapping[str, torch.Tensor]) -> bool:
    """Evaluate an input-independent mask (it may read the input's shape): does it let every query see every key?"""
    value = _evaluate(gm, mask, example_inputs)
    if value.dtype == torch.bool:
        return bool(value.all())
    return bool((value == 0).all())


def _evaluate(gm: fx.GraphModule, mask: fx.Node, example_inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The value of ``mask`` on ``example_inputs`` (the graph run up to it)."""
    captured: list[torch.Tensor] = []

    class Capture(fx.Interpreter):
        def run_node(self, node: fx.Node) -> object:
            value = super().run_node(node)
            if node is mask:
                captured.append(value)
                raise _Captured
            return value

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    try:
        with torch.no_grad():
            Capture(gm).run(*[example_inputs.get(str(n.target)) for n in placeholders])
    except _Captured:
        pass
    return captured[0]


def _window_of(gm: fx.GraphModule, mask: fx.Node, padding: fx.Node,
               example_inputs: Mapping[str, torch.Tensor]) -> int | None | str:
    """What a mask built from the padding input hides besides the pads: None (nothing: a padding mask), the
    half-width ``w`` of a sliding window ``|i - j| <= w``, "causal" (query i sees keys j <= i) or "other"."""
    name = str(padding.target)
    if name not in example_inputs:
        return None  # not an input given by name: taken as a plain padding mask, as before
    unpadded = {**example_inputs, name: torch.ones_like(example_inputs[name])}
    value = _evaluate(gm, mask, unpadded)
    allowed = value if value.dtype == torch.bool else value == 0
    if bool(allowed.all()):
        return None  # a plain padding mask, whatever its broadcast shape ((B, 1, 1, N) or (B, 1, N, N))
    if allowed.dim() < 2 or allowed.shape[-1] != allowed.shape[-2]:
        return "other"
    allowed = allowed.reshape(-1, *allowed.shape[-2:])
    if not bool((allowed == allowed[:1]).all()):
        return "other"
    n = allowed.shape[-1]
    index = torch.arange(n)
    if bool((allowed[0] == (index[None, :] <= index[:, None])).all()):
        return "causal"
    width = int(allowed[0, 0].sum()) - 1
    band = (index[:, None] - index[None, :]).abs() <= width
    return width if width >= 0 and bool((allowed[0] == band).all()) else "other"


def window_bias_fixed(tokens: int, width: int) -> torch.Tensor:
    """The band ``|i - j| <= width`` over the original token indices as a (1, 1, N, N) additive bias."""
    index = torch.arange(tokens, dtype=torch.float32)
    return window_bias_at(index[None, :, None], width)


def window_bias_at(positions: torch.Tensor, width: int) -> torch.Tensor:
    """The band ``|p_i - p_j| <= width`` at carried 1-D positions (B, N, 1), as a (B, 1, N, N) additive bias."""
    p = positions[..., 0]
    distance = (p[:, :, None] - p[:, None, :]).abs()
    inside = distance <= width + WINDOW_TOLERANCE
    return torch.where(inside, 0.0, WINDOW_OUTSIDE).to(positions.dtype)[:, None]


@dataclass(eq=False)
class SlidingWindow(PositionTable):
    """A sliding-window band kept from a padding mask: recomputed from the carried 1-D positions."""

    band: fx.Node = field(default=None)  # type: ignore[assignment]  (the fixed band it takes as its mask now)
    width: int = 0
    dims: int = 1  # coordinates per carried position (the token pass sets it)

    def rewire(self, gm: fx.GraphModule, positions: fx.Node, prefix: int, suffix: int) -> None:
        if prefix or suffix:
            raise StructureNotFoundError(
                f"sliding-window attention at layer {self.site} next to {prefix + suffix} protected tokens: the "
                "window is counted in token indices, which protected tokens do not carry; not supported")
        if self.dims != 1:
            raise StructureNotFoundError(
                f"sliding-window attention at layer {self.site} over a {self.dims}-D grid: the window is counted "
                "in 1-D token indices; not supported")
        with gm.graph.inserting_after(positions):
            recomputed = gm.graph.call_function(window_bias_at, (positions, self.width))
        for user in list(self.band.users):
            user.replace_input_with(self.band, recomputed)


class _Captured(Exception):
    """Stops a graph run once the wanted value is computed."""


def find_initial_sizes(
    gm: fx.GraphModule, sites: list[AttentionSite], example_inputs: Mapping[str, torch.Tensor],
    windows: list[PositionTable] | None = None,
) -> fx.Node | None:
    """Clear the model's own attention masks; return the initial sizes (B, N, 1) when they come from an input.
    A sliding window inside a padding mask stays as a fixed band, and its ``SlidingWindow`` goes into ``windows``
    (refused when ``windows`` is None)."""
    padding: fx.Node | None = None
    window_of: dict[fx.Node, int | None | str] = {}  # layers share their mask node: evaluate each once
    for site in sites:
        node = site.attention
        if is_sdpa(node):
            found = _mask_argument(node)
        else:  # an eager attention adds its mask to the scores itself
            explicit = _explicit_mask(site)
            found = None
            if explicit is not None:
                node, mask = explicit
                found = (mask, mask)
        if found is None:
            continue
        where, mask = found
        inputs = _placeholders(ancestors(mask, through_shape_queries=False))
        if isinstance(where, fx.Node) and not inputs:
            continue  # an input-free term added to eager scores (a bias table): not a padding mask; left as it was
        if not inputs and is_learned(gm, mask):
            continue  # a learned bias (relative positions): stays; a position table or the position check takes it
        keep = learned_part(gm, mask, (tensor_meta_shape(site.query) or (0, 0))[-2]) if inputs else None
        if inputs and keep is None and is_learned(gm, mask):
            raise StructureNotFoundError(
                f"attention {node.name} takes a learned relative position bias folded into the padding mask built "
                f"from {', '.join(n.name for n in inputs)} in a way that cannot be told apart from the mask; the "
                "token passes replace that mask and would drop the bias with it, so this is not supported"
            )
        if not inputs:
            if not _masks_nothing(gm, mask, example_inputs):
                raise StructureNotFoundError(
                    f"attention {node.name} has a fixed mask that hides tokens (causal or local attention?); "
                    "token compression needs full bidirectional attention"
                )
        elif len(inputs) == 1 and (padding is None or padding is inputs[0]):
            padding = inputs[0]
            if keep is None:
                if mask not in window_of:
                    window_of[mask] = _window_of(gm, mask, padding, example_inputs)
                keep = _keep_window(gm, site, mask, padding, window_of[mask], windows)
        else:
            raise StructureNotFoundError(
                f"attention {node.name} has a mask built from {', '.join(n.name for n in inputs)}; "
                "expected one padding-mask input"
            )
        _clear_mask(node, where, keep)
    if padding is None:
        return None
    with gm.graph.inserting_after(padding):
        return gm.graph.call_function(padding_sizes, (padding,))


def _keep_window(gm: fx.GraphModule, site: AttentionSite, mask: fx.Node, padding: fx.Node, found: int | None | str,
                 windows: list[PositionTable] | None) -> fx.Node | None:
    """The fixed band to keep in place of a padding mask that also holds a sliding window (``found``: what
    ``_window_of`` says the mask hides; None: a plain padding mask); refused when it hides tokens by position in
    any other way."""
    if found is None:
        return None
    node = site.attention
    if found == "causal":
        raise StructureNotFoundError(
            f"attention {node.name} has a mask built from {padding.name} that also hides later tokens (causal "
            "attention); token compression needs bidirectional attention")
    if found == "other" or windows is None:
        raise StructureNotFoundError(
            f"attention {node.name} has a mask built from {padding.name} that also hides tokens by position, and "
            "not as a sliding window |i - j| <= w; token compression needs bidirectional attention")
    assert isinstance(found, int)
    tokens = (tensor_meta_shape(mask) or (0,))[-1]
    name = f"sliding_window_{site.index}"
    gm.register_buffer(name, window_bias_fixed(tokens, found))
    with gm.graph.inserting_before(node):
        band = gm.graph.get_attr(name)
    windows.append(SlidingWindow(site=site.index, kind="sliding-window attention", nodes=frozenset({band}),
                                 band=band, width=found))
    return band


def learned_part(gm: fx.GraphModule, node: fx.Node, tokens: int) -> fx.Node | None:
    """``node`` itself when it is a learned (…, N, N) bias computed from parameters alone; else the one such bias
    it is built from together with the inputs (T5 puts its relative bias into the mask made from
    ``attention_mask``). A padding mask is replaced by the size bias; the learned bias stays."""
    if _is_bias(gm, node, tokens):
        return node
    inside = [n for n in ancestors(node) if _is_bias(gm, n, tokens)
              and any(not is_input_free(user) for user in n.users)]
    return inside[0] if len(inside) == 1 else None


def _is_bias(gm: fx.GraphModule, node: fx.Node, tokens: int) -> bool:
    shape = tensor_meta_shape(node)
    if shape is None or len(shape) < 2 or shape[-2:] != (tokens, tokens) or any(d != 1 for d in shape[:-3]):
        return False
    return is_input_free(node) and is_learned(gm, node)


def is_learned(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Computed from a trainable parameter (a learned bias table), not only from buffers and constants."""
    for n in ancestors(node) | {node}:
        if n.op == "get_attr":
            try:
                gm.get_parameter(str(n.target))
                return True
            except AttributeError:
                pass
        if n.op == "call_module" and any(True for _ in gm.get_submodule(str(n.target)).parameters()):
            return True
    return False


def padding_sizes(mask: torch.Tensor) -> torch.Tensor:
    """A (B, N) padding mask (1 = token, 0 = pad) as token sizes (B, N, 1)."""
    return mask.to(torch.float32).unsqueeze(-1)


def repoint_pooling(gm: fx.GraphModule, initial: fx.Node, final: fx.Node) -> None:
    """Size-aware pooling weighted by the padding mask now uses the sizes after the last compression."""
    mask = initial.args[0]
    for node in gm.graph.nodes:
        if is_weighted_mean(node) and node.args[1] in (mask, initial):
            node.args = (node.args[0], final)
