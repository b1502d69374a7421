"""Efficient Video Sampling (EVS, vLLM ``multimodal/evs.py``) as a static-shape token op on a clip's merged tokens.

The published rule, on the merged tokens of one clip (T, H', W', D): each token's dissimilarity is
1 - cosine(token, the token at the same (h, w) in the previous frame) over D; frame 0 is always kept (the
published code scores it 255); the max(H'W', int(T H'W' (1 - q))) highest-scoring tokens are kept, ties to the
earlier (t, h, w) index (a stable descending sort), and they stay in (t, h, w) order. Their language-model
positions are (int(t * tokens_per_second * seconds_per_grid), h, w) on the merged grid, as
``compute_mrope_for_media`` gives them (video t scaled; h, w unscaled).

Here the tokens arrive frame by frame in the batch, (B*T, prefix + H'W', D) (a ``--frames`` tower), and leave as
one sequence per clip (B, K, D): the op joins the frames (``joins_frames``). Its token state out has four columns:
the size, then size times (t, h, w) in the language model's coordinates above. Scores are fp32 whatever the model's
dtype (the published code scores in the embeddings' dtype, bf16 in serving: there, near-equal dissimilarities
collapse into ties that the stable sort then decides by index, so a bf16 run keeps more early-frame tokens among
near-equal ones; in fp32 they are told apart).

Ranking forms (the kept set and order are the same; only the graph differs):
* ``sort``: one stable descending sort of the (T - 1) H'W' scores of frames 1.. (ONNX TopK, which keeps the lower
  index first among equal values), the first K - H'W' taken, then sorted back into index order (TopK again);
* ``rank``: each score's rank counted by comparisons (greater, or equal at a lower index), kept where rank < K,
  and the kept indices found in order by counting a running sum: O(N^2) comparisons, no TopK, for clips longer
  than TensorRT's TopK allows (K < 3,840), chunked so no intermediate exceeds ``RANK_CHUNK`` rows.
``auto`` takes ``sort`` below TensorRT's limit and ``rank`` from it on.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import TokenOp
from .rows import gather_rows, sort_indices, top_k

TOPK_LIMIT = 3840  # TensorRT's TopK takes K < 3,840
RANK_CHUNK = 1024  # query rows per comparison block in the rank form
RANKINGS = ("auto", "sort", "rank")
FIRST_FRAME_SCORE = 255.0  # the published code's score of frame 0 (above any 1 - cosine)


def evs_keep_count(tokens_per_frame: int, frames: int, q: float) -> int:
    """Tokens kept of a clip: max(H'W', int(T H'W' (1 - q))) (vLLM's ``compute_retained_tokens_count``)."""
    return max(tokens_per_frame, int(tokens_per_frame * frames * (1 - q)))


def evs_time_index(frames: int, tokens_per_second: float, seconds_per_grid: float) -> Tensor:
    """t of each frame in the language model's coordinates: (arange(T) * (tps * spg)) truncated to an integer, the
    published expression evaluated the same way (int64 times a Python float, then ``long``)."""
    return torch.arange(frames).mul(tokens_per_second * seconds_per_grid).long()


def frame_dissimilarity(clip: Tensor) -> Tensor:
    """1 - cosine to the same place in the previous frame, (B, T - 1, M) for a clip (B, T, M, D), in fp32.

    The cosine as ``F.cosine_similarity`` computes it (each vector divided by its norm floored at 1e-8, then the
    products summed), written out so that the graph holds plain reductions: in eager PyTorch it is bitwise the
    same value, so near-ties (a frozen clip's exact repeats) fall the same way as in the reference.
    """
    clip = clip.float()
    unit = clip / torch.linalg.vector_norm(clip, dim=-1, keepdim=True).clamp_min(1e-8)
    return 1.0 - (unit[:, 1:] * unit[:, :-1]).sum(-1)


def ranked_first(scores: Tensor, keep: int, ranking: str) -> Tensor:
    """Indices (B, keep) of the ``keep`` highest of ``scores`` (B, N), ties to the lower index, ascending."""
    if ranking == "sort":
        order = top_k(scores, keep)[1]  # ties to the lower index, eagerly and in the graph (ops.rows.top_k)
        return sort_indices(order)
    return _ranked_by_counting(scores, keep)


def _ranked_by_counting(scores: Tensor, keep: int) -> Tensor:
    """``ranked_first`` without TopK: rank_i = #{j: s_j > s_i} + #{j < i: s_j == s_i}; kept where rank < keep;
    the m-th kept index = #{i: running count of kept up to i <= m}."""
    count = scores.shape[-1]
    index = torch.arange(count, device=scores.device)
    kept = []
    for start in range(0, count, RANK_CHUNK):
        rows = scores[:, start:start + RANK_CHUNK].unsqueeze(-1)  # (B, c, 1): the scores ranked
        earlier = index.unsqueeze(0) < index[start:start + RANK_CHUNK].unsqueeze(-1)  # (c, N): j < i
        beaten = (scores.unsqueeze(1) > rows) | ((scores.unsqueeze(1) == rows) & earlier)
        kept.append(beaten.to(torch.int32).sum(-1) < keep)
    running = torch.cat(kept, dim=-1).to(torch.int32).cumsum(-1)  # (B, N): kept tokens up to and including i
    slots = torch.arange(keep, device=scores.device, dtype=torch.int32)
    found = []
    for start in range(0, keep, RANK_CHUNK):
        wanted = slots[start:start + RANK_CHUNK].view(1, -1, 1)
        found.append((running.unsqueeze(1) <= wanted).to(torch.int32).sum(-1))
    return torch.cat(found, dim=-1).to(torch.int64)


def choose_ranking(ranking: str, scored: int) -> str:
    """``auto``: ``sort`` while a TopK over the ``scored`` tokens is below TensorRT's limit, else ``rank``."""
    if ranking != "auto":
        return ranking
    return "sort" if scored < TOPK_LIMIT else "rank"


class EVSPrune(TokenOp):
    """EVS on a clip: (B*T, prefix + H'W', D) per-frame tokens -> (B, K, D) kept tokens in (t, h, w) order.

    The ``prefix`` tokens of each frame (class/register tokens at a tower output) are dropped, as a projector
    drops them: EVS scores the grid tokens. The state out: (B, K, 4), size and size times (t, h, w).
    """

    joins_frames = True
    emits_positions = True  # its state: (t, h, w) in the language model's coordinates

    def __init__(self, frames: int, grid: tuple[int, int], q: float, prefix: int = 0, tokens_per_second: float = 1.0,
                 seconds_per_grid: float = 1.0, ranking: str = "auto") -> None:
        super().__init__()
        if frames < 1 or len(grid) != 2 or min(grid) < 1 or not 0.0 <= q < 1.0 or prefix < 0:
            raise ValueError("EVS needs frames >= 1, a 2-D grid, 0 <= q < 1 and prefix >= 0")
        self.frames, self.rows, self.cols, self.q, self.prefix = frames, grid[0], grid[1], float(q), prefix
        if ranking not in RANKINGS:
            raise ValueError(f"ranking must be one of {', '.join(RANKINGS)}")
        self.keep = evs_keep_count(grid[0] * grid[1], frames, q)
        self.ranking = choose_ranking(ranking, (frames - 1) * grid[0] * grid[1])
        self.counted = self.ranking == "rank"  # a node attribute (the body differs), where the text is not one
        time = evs_time_index(frames, tokens_per_second, seconds_per_grid).float()
        rows, cols = torch.meshgrid(torch.arange(self.rows), torch.arange(self.cols), indexing="ij")
        table = torch.stack([time.view(-1, 1).expand(-1, self.rows * self.cols),
                             rows.reshape(1, -1).expand(frames, -1).float(),
                             cols.reshape(1, -1).expand(frames, -1).float()], dim=-1)
        self.register_buffer("positions", table.reshape(-1, 3), persistent=False)  # (T H'W', 3)
        self.tokens_per_second, self.seconds_per_grid = float(tokens_per_second), float(seconds_per_grid)

    def forward(self, x: Tensor, size: Tensor | None) -> tuple[Tensor, Tensor]:
        per_frame = self.rows * self.cols
        tokens = x[:, self.prefix:]
        clip = tokens.reshape(-1, self.frames, per_frame, tokens.shape[-1])
        batch = clip.shape[0]
        kept = torch.arange(per_frame, device=x.device).unsqueeze(0).expand(batch, -1)  # frame 0, whole
        if self.keep > per_frame:
            later = ranked_first(frame_dissimilarity(clip).reshape(batch, -1), self.keep - per_frame, self.ranking)
            kept = torch.cat([kept, later + per_frame], dim=-1)  # (B, K), ascending (t, h, w) indices
        out = gather_rows(clip.reshape(batch, -1, clip.shape[-1]), kept)
        sizes = x.new_ones(batch, self.frames * per_frame, 1) if size is None else \
            size[:, self.prefix:, :1].reshape(batch, -1, 1)
        state = torch.cat([sizes, sizes * self.positions.to(sizes.dtype)], dim=-1)
        return out, gather_rows(state, kept)

    def tokens_out(self, tokens_in: int) -> int:
        return self.keep

    def output_grid(self) -> None:
        return None

    def prefix_out(self) -> int:
        return 0

    def extra_repr(self) -> str:
        return (f"frames={self.frames}, grid=({self.rows}, {self.cols}), q={self.q}, keep={self.keep}, "
                f"prefix={self.prefix}, ranking={self.ranking}")


