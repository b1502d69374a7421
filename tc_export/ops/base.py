"""The base class of compressed ops and the inputs a pass wires into them."""

from __future__ import annotations

from typing import ClassVar, Literal

from torch import nn

# What an op can ask its pass for, besides the token stream and the sizes:
#   "metric": the attention keys averaged over heads, (B, N, d);
#   "class_attention": the class token's attention over all tokens, averaged over heads, (B, N);
#   "received_attention": the attention each token receives, averaged over queries and heads, (B, N).
Signal = Literal["metric", "class_attention", "received_attention"]


class TokenOp(nn.Module):
    """A compressed op inserted by a pass: a leaf unit with a plain tensor interface, exportable on its own.

    ``forward(x, size, *signals) -> (x, size)``: ``x`` (B, N, C) tokens, ``size`` the token state (``ops.state``):
    (B, N, 1) the number of original tokens each one stands for, or (B, N, 1 + P) with each token's position
    times its size after it (None: all size 1, no positions), then one tensor per entry of ``signals``. An op maps
    every column of the state as it maps the size and reads the size itself with ``state.size_column``. The output
    token count is static: ``tokens_out(N)``. The returned size is None only when the input size was None and
    ``creates_size`` is False. Protected trailing tokens are never shown to an op (the pass cuts them off and
    rejoins them).
    """

    signals: ClassVar[tuple[Signal, ...]] = ()
    creates_size: bool = True  # an instance may override it

    def tokens_out(self, tokens_in: int) -> int:
        raise NotImplementedError

    def state_rows(self, tokens: int) -> int:
        """Rows of the token state that goes with ``tokens`` tokens: one per token (an op on merge units: one per
        unit, ``ops.units``)."""
        return tokens


class CountedMergeOp(TokenOp):
    """An op merging ``r`` tokens (or pairs) per site, never touching the first ``protected`` tokens.

    ``padded``: the model has a padding mask; size-0 tokens are pads, kept apart from real tokens.
    """

    def __init__(self, r: int, protected: int, padded: bool = False) -> None:
        super().__init__()
        if r < 0 or protected < 0:
            raise ValueError("r and protected must be >= 0")
        self.r, self.protected, self.padded = r, protected, padded

    def extra_repr(self) -> str:
        return f"r={self.r}, protected={self.protected}" + (", padded" if self.padded else "")
