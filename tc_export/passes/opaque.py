"""Library layers that mix tokens but stay opaque to the passes: refused where they read compressed tokens.

torch.fx keeps ``torch.nn`` modules whole, so an ``nn.MultiheadAttention`` (or a ``nn.Transformer*`` layer, an
RNN) is one node whose attention the structure finder never sees. Before the compressed ops that is harmless (the
model has no site there); after them it attends to merged tokens as if each were one (no size bias) and to padding
as if it were real, and parity cannot see the difference. So such a layer reading compressed tokens is refused.
"""

from __future__ import annotations

from torch import fx, nn
from torch.nn import functional as F

from ..errors import ConfigError, StructureNotFoundError

TOKEN_MIXERS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder,
                nn.TransformerDecoder, nn.Transformer, nn.RNNBase)
# The functional form: one call holding the whole attention (WavLM's attention calls it directly).
OPAQUE_FUNCTIONS = (F.multi_head_attention_forward,)


def opaque_mixer(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """How ``node`` names itself when it is a whole attention (or other token mixer) in one opaque call, else None."""
    if node.op == "call_module":
        module = dict(gm.named_modules()).get(str(node.target))
        return f"{node.target} ({type(module).__name__})" if isinstance(module, TOKEN_MIXERS) else None
    if node.op == "call_function" and node.target in OPAQUE_FUNCTIONS:
        return f"{node.name} (a torch.nn.functional.{node.target.__name__} call)"
    return None


def refuse_opaque_attention(gm: fx.GraphModule) -> None:
    """Where no attention was found: name the opaque attention calls that hide it, if there are any."""
    found = [name for node in gm.graph.nodes if (name := opaque_mixer(gm, node)) is not None]
    if found:
        more = f" and {len(found) - 1} more" if len(found) > 1 else ""
        raise StructureNotFoundError(
            f"the attention is opaque: {found[0]}{more} {'compute' if more else 'computes'} the whole attention in one "
            "call, whose q, k and "
            "softmax the token passes cannot reach; write that attention out (q @ k^T, softmax, @ v) or with "
            "scaled_dot_product_attention"
        )


def check_opaque_token_mixers(gm: fx.GraphModule, below: set[fx.Node]) -> None:
    """``below``: every node computed from the token ops."""
    for node in gm.graph.nodes:
        if node not in below:
            continue
        name = opaque_mixer(gm, node)
        if name is not None:
            raise StructureNotFoundError(
                f"{name} reads the compressed tokens as one opaque layer: its "
                "attention cannot be given the merged tokens' sizes or the padding, so it would treat each merged "
                "token as one; compress only layers after it, or write that attention out (q @ k^T, softmax, @ v) "
                "or with scaled_dot_product_attention"
            )


REFUSAL_ATTRIBUTE = "tc_export_refuses_compression"  # on a module: why it cannot read merged or pruned tokens
# On a module whose output is the model's own output tokens on a grid (a tower's own projector, e.g. Qwen2-VL's
# PatchMerger): that grid (H', W'), raster order. A method that reads the model output (EVS) acts there.
TOKEN_GRID_ATTRIBUTE = "tc_export_token_grid"


def marked_grid(gm: fx.GraphModule, node: fx.Node) -> tuple[int, int] | None:
    """The grid an adapter marked (``TOKEN_GRID_ATTRIBUTE``) on the module computing ``node`` (a call of it, or an
    op reading its weights), if any."""
    targets = [node] + [arg for arg in node.args if isinstance(arg, fx.Node) and arg.op == "get_attr"]
    for target in targets:
        if target.op not in ("call_module", "get_attr"):
            continue
        parts = str(target.target).split(".")
        for depth in range(len(parts), 0, -1):
            try:
                module = gm.get_submodule(".".join(parts[:depth]))
            except AttributeError:
                continue
            grid = getattr(module, TOKEN_GRID_ATTRIBUTE, None)
            if grid is not None:
                return tuple(grid)  # type: ignore[return-value]
    return None


def marked_reader(gm: fx.GraphModule, nodes: set[fx.Node]) -> tuple[str, str] | None:
    """(module name, cause) of the first module among ``nodes`` (or holding one of them) that a model adapter marked
    with ``REFUSAL_ATTRIBUTE``: a layer that reads fixed groups of consecutive tokens (Qwen2-VL's PatchMerger)."""
    for node in gm.graph.nodes:
        if node not in nodes or node.op not in ("call_module", "get_attr"):
            continue
        parts = str(node.target).split(".")
        if node.op == "get_attr":  # a parameter marked itself (tracing may rebuild the modules holding it)
            cause = getattr(_attribute(gm, parts), REFUSAL_ATTRIBUTE, None)
            if isinstance(cause, str):
                return ".".join(parts[:-1]), cause
        for depth in range(1, len(parts) + 1):
            name = ".".join(parts[:depth])
            try:
                module = gm.get_submodule(name)
            except AttributeError:
                break
            cause = getattr(module, REFUSAL_ATTRIBUTE, None)
            if isinstance(cause, str):
                return name, cause
    return None


def _attribute(gm: fx.GraphModule, parts: list[str]) -> object:
    value: object = gm
    for part in parts:
        value = getattr(value, part, None)
    return value


def check_marked_readers(gm: fx.GraphModule, outputs: set[fx.Node], compressed: bool) -> None:
    """Refuse a marked module on the way to the outputs (``outputs``: every node they are computed from) when tokens
    are compressed (it would read merged or pruned tokens) or their positions emitted (its output tokens are not the
    ones whose positions are carried)."""
    found = marked_reader(gm, outputs)
    if found is None:
        return
    name, cause = found
    if compressed:
        raise StructureNotFoundError(f"{name} cannot read compressed tokens: {cause}; export the last block's tokens "
                                     "instead (--pooling tokens)")
    raise ConfigError(f"--emit-positions: the output comes from {name}, which turns fixed windows of the last block's "
                      "tokens into new tokens, so the carried positions are not its output's; export the last block's "
                      "tokens (--pooling tokens)")
