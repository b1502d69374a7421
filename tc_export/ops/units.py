"""A token op acting on whole merge units (docs/merge-units.md).

With a unit s the patch tokens run in unit-window order (``state.to_unit_order``): each unit's s^2 tokens are
consecutive. ``UnitOp`` shows its inner op the unit view (B, U, s^2 * C): the protected prefix cut off (and
rejoined in front afterwards, as the pass does with the suffix), each unit one row of its tokens' channels
concatenated slot by slot. Any op then acts on whole units with its own rule: ToMe averages unit into unit slot by
slot (token i of one unit with token i of the other, size-weighted), Top-K keeps whole units, adjacent merging
merges neighbouring units. The token state the op maps is already one row per unit. The signals are reduced to
units: keys (``metric``) by ``unit_metric`` (mean of the unit's keys, or their concatenation), scores
(``class_attention``, ``received_attention``) by ``unit_score`` (mean, sum or max of the unit's tokens' scores).
PruMerge scores every token from the full-width queries and keys (the class token among them), then ranks units
by their reduced scores and finds each kept unit's nearest units by the reduced keys.

``windows`` (attention windows of a fixed number of units, e.g. Qwen2.5-VL's 4x4 units): the units come window
after window and the inner op runs on each window as a sample of its own (``fold_windows``), so every window keeps
the same number of units (Top-K keeps K per window, ToMe merges r per window, only within the window) and the
windows keep a static shape (Qwen2.5-VL, docs/qwen-vl.md). PruMerge's scores still come from every token's full-width
queries and keys (a full-attention layer); its kept units, their nearest units and its extra unit are then found
within each window, as are Top-K's fused unit: nothing mixes windows, every window keeps K + 1 units.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .base import TokenOp

UnitMetric = Literal["mean", "concat"]
UnitScore = Literal["mean", "sum", "max"]
UNIT_METRICS: tuple[str, ...] = ("mean", "concat")
UNIT_SCORES: tuple[str, ...] = ("mean", "sum", "max")


def unit_rows(x: Tensor, prefix: int, unit: int) -> Tensor:
    """(B, prefix + U*s^2, ...) -> (B, U, s^2, ...): the unprotected rows grouped by unit."""
    body = x[:, prefix:]
    return body.reshape(body.shape[0], body.shape[1] // (unit * unit), unit * unit, *body.shape[2:])


def reduce_metric(metric: Tensor, prefix: int, unit: int, how: str) -> Tensor:
    """Per-token keys (B, N, d) -> per-unit metric (B, U, d) (mean) or (B, U, s^2 * d) (concat)."""
    rows = unit_rows(metric, prefix, unit)
    return rows.mean(2) if how == "mean" else rows.flatten(2)


def reduce_score(score: Tensor, prefix: int, unit: int, how: str) -> Tensor:
    """Per-token scores (B, N) -> per-unit scores (B, U): mean, sum or max over the unit's tokens."""
    rows = unit_rows(score, prefix, unit)
    if how == "max":
        return rows.amax(2)
    return rows.sum(2) if how == "sum" else rows.mean(2)


def fold_windows(t: Tensor | None, windows: int) -> Tensor | None:
    """(B, U, ...) units in window order (U/windows consecutive units per window) -> (B * windows, U/windows, ...):
    each window a sample of its own, so a token op keeps the same number of units in every window."""
    if t is None:
        return None
    if t.shape[1] % windows:
        raise ValueError(f"{t.shape[1]} units do not split into {windows} equal windows")
    return t.reshape(t.shape[0] * windows, t.shape[1] // windows, *t.shape[2:])


def unfold_windows(t: Tensor | None, batch: int) -> Tensor | None:
    """The inverse of ``fold_windows``: (B * windows, n, ...) -> (B, windows * n, ...), window after window."""
    return None if t is None else t.reshape(batch, -1, *t.shape[2:])


class UnitOp(TokenOp):
    """``inner`` applied to whole units: ``(x, state, *signals) -> (x, state)`` with ``x`` (B, prefix + U*s^2, C)
    in unit-window order and ``state`` one row per protected token and per unit (``ops.state``)."""

    def __init__(self, inner: TokenOp, prefix: int, unit: int, unit_metric: str = "mean",
                 unit_score: str = "mean", drop_prefix: bool = False, windows: int = 1) -> None:
        super().__init__()
        if unit < 1 or prefix < 0 or windows < 1:
            raise ValueError("unit must be >= 1, prefix >= 0 and windows >= 1")
        if unit_metric not in UNIT_METRICS or unit_score not in UNIT_SCORES:
            raise ValueError(f"unit_metric in {UNIT_METRICS}, unit_score in {UNIT_SCORES}")
        self.inner, self.prefix, self.unit = inner, prefix, unit
        self.protected = prefix
        self.drop_prefix = drop_prefix  # at the tower output: the protected tokens left out (PruMerge, Top-K)
        self.unit_metric, self.unit_score = unit_metric, unit_score
        self.windows = windows  # the units come window after window, the same count in each (``fold_windows``)
        self.signals = inner.signals  # type: ignore[misc]
        self.creates_size = inner.creates_size

    def forward(self, x: Tensor, size: Tensor | None, *signals: Tensor) -> tuple[Tensor, Tensor | None]:
        batch, _, channels = x.shape
        prefix, unit = self.prefix, self.unit
        view = unit_rows(x, prefix, unit).flatten(2)  # (B, U, s^2 * C)
        if size is not None and size.shape[1] != prefix + view.shape[1]:
            size = None  # per-token ones that an export wrapper passes for "no sizes yet" (``export_ops``)
        inner_size = None if size is None else size[:, prefix:]
        if hasattr(self.inner, "token_scores"):  # scores from the full-width q, k of every token, class token too
            query, key = signals
            scores = self.inner.token_scores(query, key, prefix)  # (B, U * s^2)
            reduced = [reduce_score(scores, 0, unit, self.unit_score), reduce_metric(key, prefix, unit,
                                                                                    self.unit_metric)]
            run = self.inner.forward_scored
        else:
            reduced = [self._signal(name, signal, x) for name, signal in zip(self.signals, signals)]
            run = self.inner
        if self.windows > 1:  # each window one sample of the inner op: it keeps (or merges) as many in each, and an
            folded = [fold_windows(t, self.windows) for t in (view, *reduced)]  # extra unit is the window's own
            out, out_size = run(folded[0], fold_windows(inner_size, self.windows), *folded[1:])
            out, out_size = unfold_windows(out, batch), unfold_windows(out_size, batch)
        else:
            out, out_size = run(view, inner_size, *reduced)
        kept = self.prefix_out()
        tokens = torch.cat([x[:, :kept], out.reshape(batch, -1, channels)], dim=1)
        if out_size is None:
            return tokens, None
        head = size[:, :kept] if size is not None else out_size.new_ones(batch, kept, out_size.shape[-1])
        return tokens, torch.cat([head, out_size], dim=1)

    def prefix_out(self) -> int:
        """Protected tokens left in front of the output (what the invariant checks hold unchanged)."""
        return 0 if self.drop_prefix else self.prefix

    def _signal(self, name: str, signal: Tensor, x: Tensor) -> Tensor:
        if signal.dim() == 2:  # scores (B, N)
            return reduce_score(signal, self.prefix, self.unit, self.unit_score)
        return reduce_metric(signal, self.prefix, self.unit, self.unit_metric)  # keys or tokens (B, N, d)

    def tokens_out(self, tokens_in: int) -> int:
        units = (tokens_in - self.prefix) // (self.unit * self.unit)
        per_window = self.inner.tokens_out(units // self.windows) * self.windows
        return self.prefix_out() + per_window * self.unit * self.unit

    def state_rows(self, tokens: int) -> int:
        """Rows of the state that goes with ``tokens`` output tokens: one per protected token and one per unit."""
        return self.prefix_out() + (tokens - self.prefix_out()) // (self.unit * self.unit)

    def extra_repr(self) -> str:
        return (f"prefix={self.prefix}, unit={self.unit}, unit_metric={self.unit_metric}, "
                f"unit_score={self.unit_score}" + (", drop_prefix" if self.drop_prefix else "") +
                (f", windows={self.windows}" if self.windows > 1 else ""))
