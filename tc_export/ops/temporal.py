"""Temporal pruning where the tower starts: later frames keep only the tokens that changed from the previous frame.

A clip arrives frame by frame in the batch, (B*T, P + M, D) (``--frames``: P protected tokens, M grid tokens per
frame). Each grid token of frames 1.. is scored as EVS scores merged tokens, 1 - cosine to the token at the same
place in the previous frame (``ops.evs.frame_dissimilarity``, fp32); frame 0 runs whole. Two static budgets:

* ``frame``: every later frame keeps its ``keep`` highest (ties to the lower index);
* ``clip``: the later frames together keep ``keep * (T - 1)`` tokens, the highest over the clip, so a frame that
  moves more keeps more.

Either way the kept tokens leave as one sequence per clip, (B, T P + M + kept, D): every frame's protected tokens,
then frame 0's grid, then the kept later tokens in (t, index) order. Frames that keep different counts cannot stay
one batch row each with a static shape, hence the single sequence; attention stays within each frame through a mask
built from the frame coordinate the token state carries (``frame_mask``), which this op writes for every row (the
protected tokens included: (t, -1, -1)). The later blocks then run on fewer tokens; their attention is computed
over the whole sequence and masked, so its cost grows with the clip (see docs/video.md for the measured trade).

Merge units (``unit`` s > 1, docs/merge-units.md): the grid tokens arrive in unit-window order, each unit's s^2
tokens consecutive; later frames drop whole units. A unit's change score is the **mean** of its tokens' scores
(as Top-K ranks units), each token against the same token of the same unit in the previous frame; ``keep`` then
counts units, and each kept unit's s^2 rows stay consecutive and in order, so the window projector after the tower
finds every kept unit whole. The state is one row per protected token and per unit (``ops.state.expand_units``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import TokenOp
from .evs import choose_ranking, frame_dissimilarity, ranked_first
from .rows import gather_rows

BUDGETS = ("frame", "clip")


class TemporalPrune(TokenOp):
    """(B*T, P + M, D) frames -> (B, L, D) one sequence per clip with the later frames pruned; state (B, L, S) with
    column 1 (the frame coordinate, times the size) set for every row. Needs the state with positions.

    ``unit`` s > 1: M = U s^2 tokens in unit-window order, ``keep`` counts units; the state is one row per protected
    token and per unit, (B*T, P + U, S) -> (B, T P + U + kept units, S)."""

    joins_frames = True
    masks_frames = True  # later attention stays within each frame

    def __init__(self, frames: int, tokens: int, prefix: int, keep: int, budget: str = "frame",
                 unit: int = 1) -> None:
        super().__init__()
        grid = tokens - prefix
        width = unit * unit
        if frames < 2 or prefix < 0 or unit < 1 or grid % width or not 1 <= keep <= grid // width \
                or budget not in BUDGETS:
            raise ValueError("temporal pruning needs frames >= 2, whole units, 1 <= keep <= grid units and a known "
                             "budget")
        self.frames, self.tokens, self.prefix, self.keep, self.unit = frames, tokens, prefix, keep, unit
        self.units = grid // width  # rows of a frame's grid in the state (one per unit; tokens when unit is 1)
        self.clip_budget = budget == "clip"
        self.counted = self.clip_budget and choose_ranking("auto", (frames - 1) * self.units) == "rank"  # TensorRT
        heads = (torch.arange(frames).view(-1, 1) * tokens + torch.arange(prefix)).reshape(-1)  # protected rows
        self.register_buffer("fixed_rows", torch.cat([heads, torch.arange(prefix, tokens)]), persistent=False)
        state_heads = (torch.arange(frames).view(-1, 1) * (prefix + self.units) + torch.arange(prefix)).reshape(-1)
        self.register_buffer("fixed_state_rows", torch.cat([state_heads, torch.arange(prefix, prefix + self.units)]),
                             persistent=False)
        frame_of = torch.cat([torch.arange(frames).repeat_interleave(prefix),
                              torch.zeros(self.units, dtype=torch.long)])
        self.register_buffer("fixed_frames", frame_of.float(), persistent=False)
        self.register_buffer("slots", torch.arange(width), persistent=False)  # a unit's rows, in window order

    def forward(self, x: Tensor, size: Tensor | None) -> tuple[Tensor, Tensor | None]:
        frames, tokens, prefix, units, width = self.frames, self.tokens, self.prefix, self.units, self.unit ** 2
        clip = x.reshape(-1, frames, tokens, x.shape[-1])
        batch = clip.shape[0]
        scores = frame_dissimilarity(clip[:, :, prefix:])  # (B, T - 1, M)
        if width > 1:  # a unit's score: the mean of its tokens' (each against the same slot one frame back)
            scores = scores.reshape(batch, frames - 1, units, width).mean(-1)
        if self.clip_budget:
            later = ranked_first(scores.reshape(batch, -1), self.keep * (frames - 1),
                                 "rank" if self.counted else "sort")  # (t - 1) U + u
            frame, chosen = later // units + 1, later % units
        else:
            chosen = ranked_first(scores.reshape(batch * (frames - 1), units), self.keep, "sort")
            frame = torch.arange(1, frames, device=x.device).repeat(batch).unsqueeze(-1).expand_as(chosen)
            frame, chosen = frame.reshape(batch, -1), chosen.reshape(batch, -1)
        rows = frame * tokens + prefix + chosen * width  # each kept unit's first row
        if width > 1:  # ... and its s^2 rows, consecutive in window order
            rows = (rows.unsqueeze(-1) + self.slots).flatten(1)
        kept = torch.cat([self.fixed_rows.unsqueeze(0).expand(batch, -1), rows], dim=-1)
        out = gather_rows(clip.reshape(batch, frames * tokens, -1), kept)
        if size is None:
            return out, None
        kept_state = torch.cat([self.fixed_state_rows.unsqueeze(0).expand(batch, -1),
                                frame * (prefix + units) + prefix + chosen], dim=-1)
        state = gather_rows(size.reshape(batch, frames * (prefix + units), -1), kept_state)
        frame_of = torch.cat([self.fixed_frames.unsqueeze(0).expand(batch, -1), frame.to(state.dtype)], dim=-1)
        return out, torch.cat([state[..., :1], state[..., :1] * frame_of.unsqueeze(-1), state[..., 2:]], dim=-1)

    def kept_later(self) -> int:
        """Tokens the later frames keep together (kept units times s^2)."""
        return self.keep * (self.frames - 1) * self.unit ** 2

    def tokens_out(self, tokens_in: int) -> int:
        return self.frames * self.prefix + (self.tokens - self.prefix) + self.kept_later()

    def state_rows(self, tokens: int) -> int:
        """One state row per protected token and per unit (per token when the unit is 1)."""
        joined = self.frames * self.prefix
        return joined + (tokens - joined) // self.unit ** 2

    def joined_prefix(self) -> int:
        """The protected rows in front of the joined sequence: every frame's."""
        return self.frames * self.prefix

    def prefix_out(self) -> int:
        return 0  # the protected rows of frames 1.. move in front of frame 0's grid: no per-row prefix to check

    def extra_repr(self) -> str:
        return (f"frames={self.frames}, tokens={self.tokens}, prefix={self.prefix}, keep={self.keep}, "
                f"budget={'clip' if self.clip_budget else 'frame'}" + (f", unit={self.unit}" if self.unit > 1 else ""))


def frame_mask(positions: Tensor) -> Tensor:
    """An additive attention bias (B, 1, L, L): 0 between tokens of the same frame (the first carried coordinate),
    -inf across frames."""
    frame = positions[..., 0]
    same = frame.unsqueeze(-1) == frame.unsqueeze(-2)
    return torch.zeros_like(same, dtype=positions.dtype).masked_fill(~same, float("-inf")).unsqueeze(1)
