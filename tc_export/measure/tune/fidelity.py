"""How close a schedule stays to the uncompressed model on the calibration inputs: accuracy, cosine or KL."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ...errors import ConfigError
from .calib import CalibData

METRICS = ("accuracy", "cosine", "kl")
EVAL_BATCH = 50  # the batch the fidelity graphs are traced at (token counts do not depend on it)


class Scorer:
    """Scores stages on ``calib``: higher is better (KL is negated). The uncompressed outputs are computed once."""

    def __init__(self, loaded: Any, calib: CalibData, metric: str, evaluator: Any = None) -> None:
        if metric not in METRICS:
            raise ConfigError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
        if metric == "accuracy" and evaluator is None and calib.labels is None:
            raise ConfigError(f"--metric accuracy needs labels: {loaded.name} has no evaluator and {calib.source} "
                              "has none (image subfolders named by class index, or 'labels' in a tensor file); "
                              "use --metric cosine or kl")
        if metric == "kl" and loaded.output_names[0] != "logits":
            raise ConfigError(f"--metric kl compares class probabilities; {loaded.name} outputs "
                              f"{loaded.output_names[0]}: use --metric cosine")
        self.loaded, self.calib, self.metric = loaded, calib, metric
        self.evaluator = evaluator if metric == "accuracy" and calib.seeded else None
        self.batch = min(EVAL_BATCH, len(calib))
        self.reference = self._outputs(loaded.module) if self.evaluator is None else None
        self.baseline = self.score(())

    @property
    def describe(self) -> str:
        where = "held-out accuracy (the model's evaluator)" if self.evaluator is not None else self.calib.source
        return f"{self.metric} on {where}"

    def _outputs(self, module: torch.nn.Module) -> np.ndarray:
        from ...export.checks.fidelity import first_output

        outputs, total = [], len(self.calib)
        with torch.inference_mode():
            for start in range(0, total, self.batch):
                chunk = {k: v[start:start + self.batch] for k, v in self.calib.inputs.items()}
                real = next(iter(chunk.values())).shape[0]
                if real < self.batch:  # static-batch graphs: pad with repeats, drop them after
                    chunk = {k: torch.cat([v, v[-1:].expand(self.batch - real, *v.shape[1:])]) for k, v in chunk.items()}
                outputs.append(first_output(module(**chunk)).float().numpy()[:real])
        return np.concatenate(outputs)

    def module(self, stages: Sequence[object]) -> torch.nn.Module:
        from ...job.compress import compress

        if not stages:
            return self.loaded.module
        example = {k: v[: self.batch] for k, v in self.calib.inputs.items()}
        return compress(self.loaded, list(stages), example).module

    def score(self, stages: Sequence[object]) -> float:
        module = self.module(stages)
        if self.evaluator is not None:
            return float(self.evaluator(module, batch=self.batch))
        out = self._outputs(module)
        if self.metric == "accuracy":
            return float((out.argmax(axis=1) == self.calib.labels.numpy()).mean())  # type: ignore[union-attr]
        from ..bench_job import compare_outputs

        result = compare_outputs([self.reference], [out], self.metric == "kl", len(out))
        return float(result["cosine"]) if self.metric == "cosine" else -float(result["kl"])

    def show(self, value: float) -> str:
        if self.metric == "accuracy":
            return f"{value:.2%}"
        return f"{value:.4f}" if self.metric == "cosine" else f"KL {-value:.2e}"
