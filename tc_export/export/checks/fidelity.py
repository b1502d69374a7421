"""What compression costs: compressed vs uncompressed outputs on the same inputs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

# Why a model that outputs tokens (a projector, or --features) gets no fidelity, in the job and in bench.
NOT_COMPARABLE = ("the compressed model outputs tokens (a projector or --features), not the uncompressed model's "
                  "output: the two are not comparable")


@dataclass(frozen=True)
class Fidelity:
    cosine: float  # mean cosine similarity of the output vectors
    min_cosine: float
    top1_agreement: float | None  # fraction of samples whose argmax agrees (classifier outputs only)
    samples: int
    pooled: bool = False  # sequence outputs of different lengths: compared after averaging over tokens

    def describe(self) -> str:
        what = "cosine of token-averaged outputs" if self.pooled else "cosine"
        top1 = "" if self.top1_agreement is None else f", top-1 agreement {self.top1_agreement:.0%}"
        return f"{what} {self.cosine:.4f} (min {self.min_cosine:.4f}){top1} over {self.samples} inputs"


def measure_fidelity(
    original: torch.nn.Module, compressed: torch.nn.Module, inputs: Mapping[str, torch.Tensor], classes: bool = True
) -> Fidelity:
    """Cosine (and, for ``classes`` outputs, top-1 agreement) of the first output, per sample of ``inputs``.

    A compressed sequence output (B, N', C) has fewer tokens than the original (B, N, C): both are averaged over
    their tokens first, and the report says so.
    """
    with torch.no_grad():
        reference = first_output(original(**inputs)).double()
        candidate = first_output(compressed(**inputs)).double()
    pooled = reference.dim() == 3 and reference.shape != candidate.shape
    if pooled:
        reference, candidate = reference.mean(dim=1), candidate.mean(dim=1)
    reference, candidate = reference.flatten(1), candidate.flatten(1)
    cosine = torch.nn.functional.cosine_similarity(reference, candidate, dim=1)
    agree = float((reference.argmax(dim=1) == candidate.argmax(dim=1)).double().mean()) if classes else None
    return Fidelity(float(cosine.mean()), float(cosine.min()), agree, reference.shape[0], pooled)


def first_output(output: object) -> torch.Tensor:
    """The first tensor of a model's output (a tensor, a tuple/list, a dict or a transformers ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return first_output(output[0])
    if isinstance(output, dict):
        return first_output(next(iter(output.values())))
    return first_output(output.last_hidden_state)
