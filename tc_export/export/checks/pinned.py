"""Decision-pinned parity: a half-precision file checked apart from the near-ties its rounding flips.

In fp16 the two runtimes round at different places, a near-tie in merge or selection scores flips, and from there
on the outputs differ by more than any tolerance though neither is wrong. So, where the decisions differ, the
reference is replayed with the candidate's decisions pinned: each token op's decisions (``ops.pinning``) are
read from the candidate runtime's run (the indices of the TopKs in its function, ``site_outputs``; else recorded by
the PyTorch op replayed on the inputs the candidate gave it), then imposed on the reference's run of the same op. The check passes when

(a) the outputs (and each site's output tokens) match with the candidate's decisions pinned, within the dtype's
    tolerances, and
(b) every decision that flipped (one that changes the op's output) was a near-tie: its score gap, under the
    reference's own scores and relative to their largest, is within the dtype's margin (``FLIP_MARGINS``).

The output difference the flips caused (the unpinned comparison) is reported: that is fidelity, not parity.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ...ops.base import TokenOp
from ...ops.pinning import PinningError, Tape, active, pinned_ops, record
from .decisions import SiteCall

# The score gap a rounding difference can flip, relative to the decision's largest score, per dtype: half
# precision carries ~eps relative error per op (fp16 eps 2^-10, bf16 2^-7), and a score sits behind a few blocks
# of ops, each adding its share. Measured flips (docs/half-precision.md: random ViT-B and ViT-Ti, ToMe, Top-K,
# PruMerge, adjacent) were all below 1 eps; 8 eps leaves room for engines that accumulate in fp16, and stays
# well below a decision made on different data (the spread of the scores themselves).
FLIP_EPS_MULTIPLE = 8
FLIP_MARGINS = {"fp32": FLIP_EPS_MULTIPLE * 2.0**-23, "fp16": FLIP_EPS_MULTIPLE * 2.0**-10,
                "bf16": FLIP_EPS_MULTIPLE * 2.0**-7}
FLIP_MARGINS["int8"] = FLIP_MARGINS["bf16"]  # an int8 engine's scores are no closer than bf16's


@dataclass(frozen=True)
class SitePin:
    """One token-op site in the pinned replay: did the candidate's decisions change its output (``flipped``),
    the largest relative score gap among them, and how far the pinned site's tokens (in and out) are from the
    candidate's (max abs, over the largest |value|)."""

    index: int
    name: str
    flipped: bool
    gap: float
    input_error: float
    output_error: float


@dataclass
class PinnedReport:
    """The pinned replay of one input: per-site results, and per output (max abs, max rel) pinned and not."""

    margin: float
    atol: float
    rtol: float
    sites: list[SitePin] = field(default_factory=list)
    pinned: dict[str, tuple[float, float, bool]] = field(default_factory=dict)  # name -> max abs, max rel, passed
    unpinned: dict[str, float] = field(default_factory=dict)  # name -> max abs: what the flips moved
    seed: int | None = None  # the parity input's seed (PyTorch vs ONNX Runtime)
    sample: int | None = None  # or the bundle input's index (verify)
    needed: bool = True  # the input failed unpinned: its verdict is this one's
    same_as_recorded: bool | None = None  # verify: the candidate took the reference run's decisions everywhere
    error: str = ""  # the replay could not run (why)

    @property
    def flipped(self) -> list[SitePin]:
        return [s for s in self.sites if s.flipped]

    @property
    def largest_gap(self) -> float:
        return max((s.gap for s in self.flipped), default=0.0)

    def too_wide(self) -> SitePin | None:
        return next((s for s in self.flipped if not s.gap <= self.margin), None)

    def differing_site(self) -> SitePin | None:
        """The first site whose pinned output tokens differ from the candidate's beyond the tolerances."""
        return next((s for s in self.sites if s.output_error > max(self.atol, self.rtol)), None)

    @property
    def passed(self) -> bool:
        return (not self.error and all(ok for _, _, ok in self.pinned.values()) and self.differing_site() is None
                and self.too_wide() is None)

    def summary(self) -> str:
        """Flips, margin and pinned errors in one clause (no verdict)."""
        pinned = "; ".join(f"{name} max abs {a:.2e}, max rel {r:.2e}" for name, (a, r, _) in self.pinned.items())
        moved = ", ".join(f"{name} by max abs {a:.2e}" for name, a in self.unpinned.items())
        on = self.where()
        on = f" {on}" if on else ""
        if self.error:
            return f"decisions not pinned{on}: {self.error}"
        worst = max((s.output_error for s in self.sites), default=0.0)
        pinned += f"; sites' tokens within {worst:.1e} of their scale"
        if not self.flipped:
            return f"no decision flipped at the {len(self.sites)} token-op sites{on}: {pinned}"
        return (f"{len(self.flipped)} of {len(self.sites)} token-op sites flipped{on} (largest score margin "
                f"{self.largest_gap:.1e} of the scores' scale, allowed {self.margin:.1e}); with the decisions pinned: "
                f"{pinned}; the flips moved {moved} (fidelity, not parity)")

    def where(self) -> str:
        if self.seed is not None:
            return f"on the input of seed {self.seed}"
        return f"on bundle input {self.sample}" if self.sample is not None else ""

    def failure(self) -> str:
        """Why the pinned check failed, naming the site."""
        if self.error:
            return f"the decisions could not be pinned: {self.error}"
        site = self.differing_site()
        if site is not None:
            where = ("the tokens entering it already differ (a numeric difference before it)"
                     if site.input_error > max(self.atol, self.rtol) else "a numeric bug in the op or its decisions")
            return (f"site {site.index} ({site.name}) differs with the decisions pinned: its output tokens by "
                    f"{site.output_error:.2e} of their scale ({where})")
        wide = self.too_wide()
        if wide is not None:
            return (f"site {wide.index} ({wide.name}) flipped a decision with score margin {wide.gap:.1e} of the "
                    f"scores' scale, above the {self.margin:.1e} a rounding difference can flip: not a near-tie")
        name = next((n for n, (_, _, ok) in self.pinned.items() if not ok), "?")
        a, r, _ = self.pinned.get(name, (float("nan"),) * 3)
        return (f"output {name!r} differs with the decisions pinned by max abs {a:.3e}, max rel {r:.3e} "
                f"(atol {self.atol:g}, rtol {self.rtol:g}), after the last token op")


def scaled_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """max |reference - candidate| over max |reference| (inf for another shape, 0 for two empty tensors)."""
    if reference.shape != candidate.shape:
        return float("inf")
    reference, candidate = reference.double(), candidate.double()
    if not reference.numel():
        return 0.0
    scale = max(float(reference.abs().max()), 1.0)
    return float((reference - candidate).abs().max()) / scale


def candidate_tapes(calls: Sequence[SiteCall]) -> list[Tape | None]:
    """The candidate's decisions at each site: those its decision TopKs took (``SiteCall.decisions``, read from
    the run), else the PyTorch op's replayed on the inputs the candidate gave it, which is the same only where both
    compute the scores alike (None where its inputs are not the op's arguments)."""
    tapes: list[Tape | None] = []
    for call in calls:
        if call.inputs[0] is None:
            tapes.append(None)
            continue
        tape, _ = record(call.op, *call.inputs)
        read = call.decisions
        if read is not None and [t.shape for t in read] == [t.shape for t in tape.indices]:
            tape = Tape([t.clone() for t in read])
        tapes.append(tape)
    return tapes


def site_pin(index: int, call: SiteCall, op: TokenOp, args: tuple, output: object, tape: Tape | None) -> SitePin:
    """One site of a pinned replay: ``op`` ran on ``args`` under ``tape`` (replayed) and gave ``output``; ``call``
    holds the candidate's inputs and output tokens there. A site counts as flipped when the pinned decisions change
    its output (the op run unpinned on the same ``args`` gives another)."""
    out = output[0] if isinstance(output, tuple) else output
    flipped = False
    if tape is not None:  # an exact tie PyTorch's topk breaks otherwise than the graph is a flip of margin 0
        with torch.no_grad():
            own = op.forward(*args)  # forward, not __call__: no hooks, its own decisions as it runs unpinned
        own = own[0] if isinstance(own, tuple) else own
        flipped = own.shape != out.shape or not torch.equal(own, out)
    return SitePin(
        index, call.name, flipped, tape.largest_gap if tape is not None and flipped else 0.0,
        scaled_error(args[0], call.inputs[0]) if call.inputs and call.inputs[0] is not None else 0.0,
        scaled_error(out, call.output) if call.output is not None else 0.0,
    )


def pinned_run(module: torch.nn.Module, inputs: Mapping[str, torch.Tensor], tapes: Sequence[Tape | None],
               candidate: Sequence[SiteCall], margin: float) -> tuple[object, list[SitePin]]:
    """Run ``module`` with each site's decisions pinned to ``tapes``; each site's flips and errors."""
    sites: list[SitePin] = []

    def tape_for(index: int, op: TokenOp) -> Tape | None:
        tape = tapes[index] if index < len(tapes) else None
        return None if tape is None else tape.replay()

    def seen(index: int, op: TokenOp, args: tuple, output: object, tape: Tape | None) -> None:
        if index < len(candidate) and candidate[index].sizes.size:  # a flat site (no node) is not compared
            sites.append(site_pin(index, candidate[index], op, args, output, tape))

    with pinned_ops(module, tape_for, seen), torch.no_grad():
        result = module(**inputs)
    return result, sites


def pinned_parity(
    module: torch.nn.Module, onnx_path, inputs: Mapping[str, torch.Tensor], feed: Mapping[str, np.ndarray],
    output_names: Sequence[str], atol: float, rtol: float, margin: float,
    compare: Callable[[np.ndarray, np.ndarray], tuple[float, float, bool]],
) -> PinnedReport:
    """Replay ``module`` with ONNX Runtime's decisions on ``onnx_path`` pinned, and compare (see the module doc).
    ``compare(reference, candidate)`` gives max abs, max rel and the verdict of one output."""
    from .decisions import onnx_site_run, torch_site_calls

    report = PinnedReport(margin, atol, rtol)
    reference = torch_site_calls(module, inputs)
    calls, onnx_outputs = onnx_site_run(onnx_path, feed, reference, tokens_out=True)
    if not calls:
        report.error = "the ONNX has no tc_export function nodes (a flat export): export without --no-functions"
        return report
    try:
        tapes = candidate_tapes(calls)
        result, report.sites = pinned_run(module, inputs, tapes, calls, margin)
    except PinningError as error:
        report.error = str(error)
        return report
    with torch.no_grad():
        unpinned = module(**inputs)
    for results, into in ((result, "pinned"), (unpinned, "unpinned")):
        values = result_arrays(results)
        for name, value in zip(output_names, values):
            a, r, ok = compare(value, np.asarray(onnx_outputs[name]))
            if into == "pinned":
                report.pinned[name] = (a, r, ok)
            else:
                report.unpinned[name] = a
    return report


def result_arrays(result: object) -> list[np.ndarray]:
    outputs = result if isinstance(result, (tuple, list)) else (result,)
    return [o.detach().float().numpy() for o in outputs]
