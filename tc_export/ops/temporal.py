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
    column 1 (the frame coordinate, times the size) set for every row. Needs the state with positions."""

    joins_frames = True
    masks_frames = True  # later attention stays within each frame

    def __init__(self, frames: int, tokens: int, prefix: int, keep: int, budget: str = "frame") -> None:
        super().__init__()
        grid = tokens - prefix
        if frames < 2 or prefix < 0 or not 1 <= keep <= grid or budget not in BUDGETS:
            raise ValueError("temporal pruning needs frames >= 2, 1 <= keep <= grid tokens and a known budget")
        self.frames, self.tokens, self.prefix, self.keep = frames, tokens, prefix, keep
        self.clip_budget = budget == "clip"
        self.counted = self.clip_budget and choose_ranking("auto", (frames - 1) * grid) == "rank"  # TensorRT's TopK
        per_frame = torch.arange(frames).view(-1, 1) * tokens
        heads = (per_frame + torch.arange(prefix)).reshape(-1)  # every frame's protected rows
        first = torch.arange(prefix, tokens)  # frame 0's grid rows
        self.register_buffer("fixed_rows", torch.cat([heads, first]), persistent=False)
        frame_of = torch.cat([torch.arange(frames).repeat_interleave(prefix), torch.zeros(grid, dtype=torch.long)])
        self.register_buffer("fixed_frames", frame_of.float(), persistent=False)

    def forward(self, x: Tensor, size: Tensor | None) -> tuple[Tensor, Tensor | None]:
        frames, tokens, prefix, grid = self.frames, self.tokens, self.prefix, self.tokens - self.prefix
        clip = x.reshape(-1, frames, tokens, x.shape[-1])
        batch = clip.shape[0]
        scores = frame_dissimilarity(clip[:, :, prefix:])  # (B, T - 1, M)
        if self.clip_budget:
            later = ranked_first(scores.reshape(batch, -1), self.keep * (frames - 1),
                                 "rank" if self.counted else "sort")  # (t - 1) M + i
            frame = later // grid + 1
            rows = frame * tokens + prefix + later % grid
        else:
            chosen = ranked_first(scores.reshape(batch * (frames - 1), grid), self.keep, "sort")
            frame = torch.arange(1, frames, device=x.device).repeat(batch).unsqueeze(-1).expand_as(chosen)
            rows = (frame * tokens + prefix + chosen).reshape(batch, -1)
            frame = frame.reshape(batch, -1)
        kept = torch.cat([self.fixed_rows.unsqueeze(0).expand(batch, -1), rows], dim=-1)
        out = gather_rows(clip.reshape(batch, frames * tokens, -1), kept)
        if size is None:
            return out, None
        state = gather_rows(size.reshape(batch, frames * tokens, -1), kept)
        frame_of = torch.cat([self.fixed_frames.unsqueeze(0).expand(batch, -1), frame.to(state.dtype)], dim=-1)
        return out, torch.cat([state[..., :1], state[..., :1] * frame_of.unsqueeze(-1), state[..., 2:]], dim=-1)

    def kept_later(self) -> int:
        return self.keep * (self.frames - 1)

    def tokens_out(self, tokens_in: int) -> int:
        return self.frames * self.prefix + (self.tokens - self.prefix) + self.kept_later()

    def prefix_out(self) -> int:
        return 0  # the protected rows of frames 1.. move in front of frame 0's grid: no per-row prefix to check

    def extra_repr(self) -> str:
        return (f"frames={self.frames}, tokens={self.tokens}, prefix={self.prefix}, keep={self.keep}, "
                f"budget={'clip' if self.clip_budget else 'frame'}")


def frame_mask(positions: Tensor) -> Tensor:
    """An additive attention bias (B, 1, L, L): 0 between tokens of the same frame (the first carried coordinate),
    -inf across frames."""
    frame = positions[..., 0]
    same = frame.unsqueeze(-1) == frame.unsqueeze(-2)
    return torch.zeros_like(same, dtype=positions.dtype).masked_fill(~same, float("-inf")).unsqueeze(1)
