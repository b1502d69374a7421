"""The site model: where a method acts and what it is told about the place.

Every method config names an insertion point and receives a ``Site`` there:
- ``attention``: after a block's attention residual add, before its MLP (merging and pruning: ToMe, Top-K,
  adjacent merging);
- ``block_input``: where the stream enters a block, with that block's attention queries and keys computed on the
  uncompressed stream available as signals (PruMerge: the published code prunes the second-to-last layer's
  tokens with the last layer's attention). With ``--features N``, the block input of layer N + 1 is the tower's
  output: the op scores with layer N + 1's norm and q/k projections (kept for that), its output is the model's
  output (``at_output``), and layer N + 1 itself never runs;
- ``block``: a block's output (after its MLP residual add);
- ``encoder``: the tower's output tokens (after the last block and its final norm, before pooling or a head); a
  method acting there replaces the model's output with its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Point = Literal["attention", "block_input", "block", "encoder"]
POINTS: tuple[Point, ...] = ("attention", "block_input", "block", "encoder")


@dataclass(frozen=True)
class Site:
    """What a method is told about the place it acts on.

    ``tokens``: tokens arriving there (static); ``protected``: the leading tokens no method may move (class,
    distillation, registers); ``channels``: the token width; ``heads``: attention heads of the layer (None at the
    encoder output); ``grid``: the spatial (H, W) or temporal (T,) grid behind the unprotected tokens while one
    still exists (merging and pruning destroy it); ``padded``: the model has a padding mask (size-0 tokens).
    ``layer`` is the attention layer index (None at the encoder output) of ``num_layers``. ``at_output``: the op's
    output is the tower's output (a ``block_input`` op scoring with the layer after the ``--features`` cut).
    ``unit``: merge units of s x s patches are on (docs/merge-units.md): the patch tokens run in unit-window order
    and ``patch_grid`` is the original patch grid. A token method never sees this: the pass shows it the unit view
    (one row of s^2 * C channels per unit, no prefix); projectors read it to act window by window.
    ``frames``: a video tower's frames per clip, each frame one batch row here (None: no clip, or the frames are
    already joined into one sequence per clip by an earlier op).
    """

    point: Point
    layer: int | None
    num_layers: int
    tokens: int
    protected: int
    channels: int
    heads: int | None = None
    grid: tuple[int, ...] | None = None
    padded: bool = False
    at_output: bool = False
    unit: int | None = None
    patch_grid: tuple[int, ...] | None = None
    frames: int | None = None

    def describe(self) -> str:
        where = "the encoder output" if self.layer is None else f"layer {self.layer} ({self.point})"
        if self.at_output:
            where = f"the tower output (scored by layer {self.layer})"
        return f"{where}: {self.tokens} tokens ({self.protected} protected), {self.channels} channels"
