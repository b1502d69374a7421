"""Pinned decisions: every token op takes its decisions (the indices its score TopKs choose) through ``choose``,
so one run's decisions can be recorded and imposed on another run of the same op.

A decision is a TopK over scores (ToMe's best match and rank, Top-K's kept tokens, PruMerge's kept tokens and
neighbours, adjacent merging's pairs); index sorts of int64 (``rows.sort_indices``) are not decisions (nothing
can flip them). Outside ``pinned_ops`` (export, every normal run) ``choose`` is ``rows.top_k``, nothing else.

``Tape``: one op call's decisions. Recording fills it; replaying returns its indices instead of the op's own,
with the op's own scores gathered at them, and measures each flipped decision: the score gap, under the
replaying run's scores, between what it would have chosen and what it was made to choose, relative to the largest
finite score of that decision (so cosine similarities and softmax probabilities share one scale).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .base import TokenOp
from .rows import top_k


@dataclass
class Tape:
    """The decisions of one op call, in the order the op takes them. ``recording``: fill ``indices``; else replay
    them (``position`` counts those used) and record in ``gaps`` each decision's largest relative score gap."""

    indices: list[Tensor] = field(default_factory=list)
    recording: bool = True
    position: int = 0
    gaps: list[float] = field(default_factory=list)
    changed: bool = False  # some replayed index differs from the op's own

    def replay(self) -> Tape:
        """The same decisions, ready to be imposed (``position`` 0, no gaps yet)."""
        return Tape(self.indices, recording=False)

    @property
    def largest_gap(self) -> float:
        return max(self.gaps, default=0.0)


_ACTIVE: list[Tape | None] = [None]


class PinningError(RuntimeError):
    """A tape does not fit the op replaying it (another number of decisions, or another shape)."""


def choose(scores: Tensor, k: int, largest: bool = True) -> tuple[Tensor, Tensor]:
    """``rows.top_k(scores, k, largest)`` (exact ties lower index first, as ONNX's TopK): a decision, recorded or
    pinned when a tape is active (half-precision scores tie often: a recorded decision must be the graph's)."""
    tape = _ACTIVE[0]
    values, indices = top_k(scores, k, largest)
    if tape is None:
        return values, indices
    if tape.recording:
        tape.indices.append(indices.detach().clone())
        return values, indices
    if tape.position >= len(tape.indices):
        raise PinningError(f"the op takes more decisions than the {len(tape.indices)} recorded")
    pinned = tape.indices[tape.position].to(indices.device)
    tape.position += 1
    if pinned.shape != indices.shape:
        raise PinningError(f"recorded decision of shape {list(pinned.shape)}, the op takes {list(indices.shape)}")
    pinned_values = scores.gather(-1, pinned)
    tape.changed = tape.changed or bool((indices != pinned).any())
    tape.gaps.append(relative_gap(scores, values, pinned_values, indices != pinned))
    return pinned_values, pinned


def relative_gap(scores: Tensor, own: Tensor, pinned: Tensor, flipped: Tensor) -> float:
    """The largest |own - pinned| score over the flipped positions, over the largest finite |score| (0: none
    flipped; equal scores, -inf included, are no gap; a finite score traded for -inf is an infinite one)."""
    if not bool(flipped.any()):
        return 0.0
    own, pinned = own.double(), pinned.double()
    gap = torch.where(own == pinned, torch.zeros_like(own), (own - pinned).abs())
    gap = torch.where(flipped, gap, torch.zeros_like(gap)).max()
    finite = scores.double()[torch.isfinite(scores)]
    scale = float(finite.abs().max()) if finite.numel() else 1.0
    return float(gap) / max(scale, torch.finfo(torch.float32).tiny)


@contextlib.contextmanager
def active(tape: Tape | None) -> Iterator[Tape | None]:
    """Within this block ``choose`` records into (or replays) ``tape``."""
    previous, _ACTIVE[0] = _ACTIVE[0], tape
    try:
        yield tape
    finally:
        _ACTIVE[0] = previous


def record(op: TokenOp, *args: Tensor | None) -> tuple[Tape, tuple]:
    """Run ``op`` on ``args`` and return its decisions with its output."""
    with active(Tape()) as tape, torch.no_grad():
        out = op(*args)
    return tape, out


@contextlib.contextmanager
def pinned_ops(module: nn.Module, tape_for: Callable[[int, TokenOp], Tape | None],
               seen: Callable[[int, TokenOp, tuple, object, Tape | None], None] | None = None) -> Iterator[None]:
    """Within this block each token op call of ``module`` (call ``i``, in execution order) runs under the tape
    ``tape_for(i, op)`` (None: its own decisions); ``seen(i, op, args, output, tape)`` is told of each call."""
    calls = [0]
    tapes: list[Tape | None] = [None]

    def before(op: nn.Module, args: tuple) -> None:
        tapes[0] = tape_for(calls[0], op)
        if tapes[0] is not None:
            tapes[0].position = 0
        _ACTIVE[0] = tapes[0]

    def after(op: nn.Module, args: tuple, output: object) -> None:
        _ACTIVE[0] = None
        if seen is not None:
            seen(calls[0], op, args, output, tapes[0])
        calls[0] += 1

    ops: Sequence[nn.Module] = [m for m in module.modules() if isinstance(m, TokenOp)]
    handles = [h for op in ops for h in (op.register_forward_pre_hook(before), op.register_forward_hook(after))]
    try:
        yield
    finally:
        _ACTIVE[0] = None
        for handle in handles:
            handle.remove()
