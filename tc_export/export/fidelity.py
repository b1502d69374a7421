"""What compression costs: compressed vs uncompressed outputs on the same inputs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Fidelity:
    cosine: float  # mean cosine similarity of the output vectors
    min_cosine: float
    top1_agreement: float  # fraction of samples whose argmax agrees
    samples: int

    def describe(self) -> str:
        return (
            f"cosine {self.cosine:.4f} (min {self.min_cosine:.4f}), "
            f"top-1 agreement {self.top1_agreement:.0%} over {self.samples} inputs"
        )


def measure_fidelity(
    original: torch.nn.Module, compressed: torch.nn.Module, inputs: Mapping[str, torch.Tensor]
) -> Fidelity:
    """Cosine and top-1 agreement of the first output, per sample of the batch in ``inputs``."""
    with torch.no_grad():
        reference = _first(original(**inputs)).flatten(1).double()
        candidate = _first(compressed(**inputs)).flatten(1).double()
    cosine = torch.nn.functional.cosine_similarity(reference, candidate, dim=1)
    agree = (reference.argmax(dim=1) == candidate.argmax(dim=1)).double()
    return Fidelity(float(cosine.mean()), float(cosine.min()), float(agree.mean()), reference.shape[0])


def _first(output: object) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return _first(output[0])
    if isinstance(output, dict):
        return _first(next(iter(output.values())))
    return _first(getattr(output, "last_hidden_state"))
