"""Library layers that mix tokens but stay opaque to the passes: refused where they read compressed tokens.

torch.fx keeps ``torch.nn`` modules whole, so an ``nn.MultiheadAttention`` (or a ``nn.Transformer*`` layer, an
RNN) is one node whose attention the structure finder never sees. Before the compressed ops that is harmless (the
model has no site there); after them it attends to merged tokens as if each were one (no size bias) and to padding
as if it were real, and parity cannot see the difference. So such a layer reading compressed tokens is refused.
"""

from __future__ import annotations

from torch import fx, nn

from ..errors import StructureNotFoundError

TOKEN_MIXERS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder,
                nn.TransformerDecoder, nn.Transformer, nn.RNNBase)


def check_opaque_token_mixers(gm: fx.GraphModule, below: set[fx.Node]) -> None:
    """``below``: every node computed from the token ops."""
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op != "call_module" or node not in below:
            continue
        module = modules.get(str(node.target))
        if isinstance(module, TOKEN_MIXERS):
            raise StructureNotFoundError(
                f"{node.target} ({type(module).__name__}) reads the compressed tokens as one opaque layer: its "
                "attention cannot be given the merged tokens' sizes or the padding, so it would treat each merged "
                "token as one; compress only layers after it, or write that attention out (q @ k^T, softmax, @ v) "
                "or with scaled_dot_product_attention"
            )
