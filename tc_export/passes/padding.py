"""Padding: initial token sizes from a model's padding mask, and size-aware pooling (stub until filled in)."""

from __future__ import annotations

from torch import fx

from .structure import AttentionSite


def find_initial_sizes(gm: fx.GraphModule, sites: list[AttentionSite]) -> fx.Node | None:
    """The node holding the initial per-token sizes (B, N, 1), or None when the model has no padding mask."""
    return None


def repoint_pooling(gm: fx.GraphModule, initial: fx.Node, final: fx.Node) -> None:
    """Make size-aware pooling read the final sizes instead of the initial ones."""
