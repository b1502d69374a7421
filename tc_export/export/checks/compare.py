"""Element-wise comparison of a candidate output with its reference: the max errors and the elements breaking
both tolerances (as Polygraphy counts them). Shared by parity, pinned parity and verify."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def element_errors(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """Max absolute and max relative error (relative to |reference|, as Polygraphy computes it), over the
    elements both runtimes computed as finite numbers (non-finite values are counted apart)."""
    if reference.shape != candidate.shape:
        return float("inf"), float("inf")
    reference, candidate = reference.astype(np.float64), candidate.astype(np.float64)
    finite = np.isfinite(reference) & np.isfinite(candidate)
    reference, candidate = reference[finite], candidate[finite]
    diff = np.abs(reference - candidate)
    rel = diff / np.maximum(np.abs(reference), np.finfo(np.float32).tiny)
    return float(diff.max(initial=0.0)), float(rel.max(initial=0.0))


@dataclass(frozen=True)
class OutputCheck:
    name: str
    max_abs: float
    max_rel: float
    failed_elements: int
    passed: bool
    note: str = ""

    def describe(self, atol: float, rtol: float) -> str:
        verdict = "passed" if self.passed else f"FAILED ({self.failed_elements} elements)"
        note = f" ({self.note})" if self.note else ""
        return (f"{self.name}: max abs {self.max_abs:.3e}, max rel {self.max_rel:.3e} (atol {atol:g}, "
                f"rtol {rtol:g}): {verdict}{note}")


def compare_elementwise(reference: np.ndarray, candidate: np.ndarray, atol: float, rtol: float) -> OutputCheck:
    """Max errors and the number of elements breaking both tolerances (shape mismatch: all fail)."""
    if reference.shape != candidate.shape:
        return OutputCheck("", float("inf"), float("inf"), int(reference.size), False,
                           f"shape {list(candidate.shape)} vs reference {list(reference.shape)}")
    max_abs, max_rel = element_errors(reference, candidate)
    ref = reference.astype(np.float64)
    diff = np.abs(ref - candidate.astype(np.float64))
    rel = diff / np.maximum(np.abs(ref), np.finfo(np.float32).tiny)
    failed = int(np.count_nonzero((diff > atol) & (rel > rtol)) + np.count_nonzero(np.isnan(diff)))
    return OutputCheck("", max_abs, max_rel, failed, failed == 0)
