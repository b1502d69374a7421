"""The marker base class of compressed ops."""

from __future__ import annotations

from torch import nn


class TokenOp(nn.Module):
    """A compressed op inserted by a pass: a leaf unit with a plain tensor interface, exportable on its own."""
