"""Position tables inside attention that must follow the tokens: rotary embeddings and relative position biases.

A finder looks at the traced graph and returns the tables it recognises, each tied to one attention site. The
token pass calls every registered finder once, before it inserts any op. At each site that runs on compressed
tokens it hands each of that site's tables the carried positions of the current tokens, and the table rewires its
site to compute from them (rotary: cos/sin recomputed from the coordinates; relative bias: the table gathered by
the coordinates). A table that meets compressed tokens and is not found by any finder stays refused by
``positions.check_foreign_token_tensors``.

The carried positions (``positions`` below) are one fx node of shape (B, N, P), float32, for the N tokens the site
sees: P = 2 (row, column in patch units of the original grid) for images, 3 (frame, row, column) for video, 1 (the
index) for 1-D sequences. A pruned token keeps its exact original coordinates; a merged token carries the
size-weighted mean of its members' coordinates (so it may be fractional). The ``prefix`` leading rows and the
``suffix`` trailing rows are protected tokens (class, register, distillation, detection tokens): they are never
merged or moved, their rows hold -1 in every coordinate, and a table treats them by index exactly as the model
does (for example BEiT's class-token bias entries, or EVA's rotary that skips prefix tokens).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from torch import fx

from .structure import Structure


@dataclass(eq=False)
class PositionTable(ABC):
    """A fixed position table used by one attention site."""

    site: int  # the attention site index (``AttentionSite.index``)
    kind: str  # "rotary position embedding", "relative position bias", ...
    nodes: frozenset[fx.Node]  # the graph nodes holding the fixed table now: no longer a refusal once rewired
    exact_positions_only: ClassVar[bool] = False  # read at integer positions only: pruned tokens, not merged ones
    why_exact: ClassVar[str] = ""  # why (for the refusal under merging)

    @abstractmethod
    def rewire(self, gm: fx.GraphModule, positions: fx.Node, prefix: int, suffix: int) -> None:
        """Make the site compute its table from ``positions`` (B, N, P) instead of the fixed one."""


Finder = Callable[[fx.GraphModule, Structure], list[PositionTable]]
_FINDERS: list[Finder] = []


def register_finder(finder: Finder) -> Finder:
    """Decorator: add a finder of position tables (one per model family pattern)."""
    _FINDERS.append(finder)
    return finder


def find_position_tables(gm: fx.GraphModule, structure: Structure) -> list[PositionTable]:
    """Every position table the registered finders recognise in ``gm``, in site order."""
    tables = [table for finder in _FINDERS for table in finder(gm, structure)]
    return sorted(tables, key=lambda table: table.site)
