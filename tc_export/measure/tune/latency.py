"""The latency model: a table of the model timed at each token count, and a schedule's latency predicted from it.

``U(n)`` is the whole model, exported and timed on the backend, with its tokens truncated to ``n`` after the
first layer's attention (``TruncateAt``): every later layer runs at ``n``. With a layer costing ``c(n)``, of
which the attention part is a share ``w`` (the MLP runs after the token op), ``U(n) = A + w c(N) + (L - w) c(n)``
and a schedule whose layer l sees ``in_l`` tokens in its attention and ``out_l`` in its MLP costs
``A + sum_l [w c(in_l) + (1 - w) c(out_l)]``; so, with ``D(n) = U(n) - U(N)``,

    predicted = U(N) + sum_l [w D(in_l) + (1 - w) D(out_l)] / (L - w) + sum_m k_m * tokens entering m's ops.

``w`` comes from the MAC counts of two truncated models (exact arithmetic, no timing); ``k_m`` (the token ops'
own cost per token) from one real schedule per op timed in the same loop as the table (``op_key``: ToMe at a block
input is priced apart from ToMe after the attention). Between measured
counts ``D`` is interpolated linearly. The table is measured once per run: every model in one interleaved loop
(``bench.time_interleaved``), the same ORT settings as ``tc-export bench`` (spinning off).
"""

from __future__ import annotations

import bisect
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...errors import ConfigError
from .schedule import Schedule, Shape, layer_counts, op_key, op_tokens


@dataclass(frozen=True)
class LatencyTable:
    """Measured ``U(n)`` (ms) by token count, the attention share ``w`` and each method's op cost per token."""

    shape: Shape
    batch: int
    measured: Mapping[int, float]  # n -> ms; must include shape.tokens (the uncompressed model)
    attention_share: float = 1.0 / 3.0
    op_ms_per_token: Mapping[str, float] = field(default_factory=dict)
    backend: str = "ort"

    def __post_init__(self) -> None:
        if self.shape.tokens not in self.measured:
            raise ConfigError(f"latency table: the uncompressed count {self.shape.tokens} is not measured")
        if not 0.0 <= self.attention_share < 1.0:
            raise ConfigError(f"latency table: attention share must be in [0, 1), got {self.attention_share}")

    @property
    def baseline_ms(self) -> float:
        return float(self.measured[self.shape.tokens])

    def at(self, tokens: int) -> float:
        """``U(tokens)``: measured, or linear between the nearest measured counts (the end slope outside)."""
        if tokens in self.measured:
            return float(self.measured[tokens])
        counts = sorted(self.measured)
        if len(counts) == 1:
            return float(self.measured[counts[0]])
        i = min(max(bisect.bisect_left(counts, tokens), 1), len(counts) - 1)
        lo, hi = counts[i - 1], counts[i]
        slope = (self.measured[hi] - self.measured[lo]) / (hi - lo)
        return float(self.measured[lo] + slope * (tokens - lo))

    def predict(self, stages: Sequence[object]) -> float:
        """Predicted ms of a schedule (its stages) at this table's batch."""
        base, w, layers = self.baseline_ms, self.attention_share, self.shape.layers
        delta = 0.0
        for tokens_in, tokens_out in layer_counts(stages, self.shape):
            delta += w * (self.at(tokens_in) - base) + (1.0 - w) * (self.at(tokens_out) - base)
        ops = sum(self.op_ms_per_token.get(method, 0.0) * tokens for method, tokens in
                  op_tokens(stages, self.shape).items())
        return base + delta / (layers - w) + ops

    def as_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "backend": self.backend, "tokens": self.shape.tokens,
                "protected": self.shape.protected, "layers": self.shape.layers,
                "attention_share": round(self.attention_share, 4),
                "measured_ms": {str(k): round(v, 4) for k, v in sorted(self.measured.items())},
                "op_ms_per_token": {k: round(v, 6) for k, v in self.op_ms_per_token.items()}}


def grid(shape: Shape, points: int, multiple: int | None = None, floor: int | None = None) -> list[int]:
    """Token counts to measure: ``points`` spread from ``floor`` (default: a sixteenth) to ``shape.tokens``,
    snapped to ``multiple`` when given; always ends at the uncompressed count."""
    low = max(shape.protected + 1, floor if floor is not None else shape.protected + (shape.tokens - shape.protected) // 16)
    counts = {shape.tokens}
    for i in range(points - 1):
        n = round(low + (shape.tokens - low) * i / max(points - 1, 1))
        if multiple:
            n = max(multiple, round(n / multiple) * multiple)
        counts.add(min(max(n, shape.protected + 1), shape.tokens))
    return sorted(counts)


def attention_share(loaded: Any, inputs: Mapping[str, torch.Tensor], shape: Shape) -> float:
    """``w`` from MAC counts: truncating after layer 0's vs layer 1's attention differ by ``c(N) - c(n)``,
    uncompressed vs layer 0 by ``(L - w)(c(N) - c(n))``. One-layer models: a third (the usual ViT share)."""
    from ...job.compress import compress
    from ...export.macs import count_macs
    from .truncate import TruncateAt

    if shape.layers < 2:
        return 1.0 / 3.0
    n = shape.protected + max(1, (shape.tokens - shape.protected) // 2)
    full = count_macs(loaded.module, inputs)
    first = count_macs(compress(loaded, [TruncateAt(keep=n, layer=0)], dict(inputs)).module, inputs)
    second = count_macs(compress(loaded, [TruncateAt(keep=n, layer=1)], dict(inputs)).module, inputs)
    if second <= first:
        return 1.0 / 3.0
    share = shape.layers - (full - first) / (second - first)
    return min(max(share, 0.0), 0.9)


def export_session(loaded: Any, module: torch.nn.Module, inputs: Mapping[str, torch.Tensor], path: Path,
                   batch: int, threads: int) -> Any:
    """``module`` exported to ONNX at a static batch and opened as an ORT session (spinning off)."""
    from ..bench import make_session
    from ...export.onnx_export import ExportConfig, write_onnx

    names = {spec.name: spec.export_name for spec in loaded.inputs}
    write_onnx(module, dict(inputs), path, ExportConfig(batch=batch), input_names=[names[k] for k in inputs],
               output_names=loaded.output_names)
    return make_session(path, threads)


def feed_of(loaded: Any, inputs: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    names = {spec.name: spec.export_name for spec in loaded.inputs}
    return {names[k]: v.numpy() for k, v in inputs.items()}


def time_models(loaded: Any, modules: Sequence[torch.nn.Module], batch: int, threads: int, runs: int,
                warmup: int = 3, progress: Callable[[str], None] = lambda _: None) -> list[float]:
    """Median ms of each module, exported to ONNX and timed in ONE interleaved loop (ORT CPU)."""
    from ..bench import time_interleaved

    inputs = loaded.example_inputs(batch=batch)
    feed = feed_of(loaded, inputs)
    with tempfile.TemporaryDirectory(prefix="tc-export-tune-") as folder:
        sessions = []
        for i, module in enumerate(modules):
            progress(f"export {i + 1}/{len(modules)}")
            sessions.append(export_session(loaded, module, inputs, Path(folder) / f"m{i}.onnx", batch, threads))
        progress("timing")
        timings = time_interleaved([lambda s=s: s.run(None, feed) for s in sessions], runs, warmup)
    return [t.median for t in timings]


def measure_table(loaded: Any, shape: Shape, batch: int, counts: Sequence[int], probes: Sequence[Schedule],
                  threads: int = 2, runs: int = 20, progress: Callable[[str], None] = lambda _: None) -> LatencyTable:
    """Time the truncated models at ``counts`` and one probe schedule per method in one loop; fit the op costs."""
    from ...job.compress import compress
    from .truncate import TruncateAt

    inputs = loaded.example_inputs(batch=batch)
    counts = sorted(set(counts) | {shape.tokens})
    modules = [loaded.module if n == shape.tokens else compress(loaded, [TruncateAt(keep=n)], inputs).module
               for n in counts]
    modules += [compress(loaded, list(probe.stages), inputs).module for probe in probes]
    progress("attention share (MACs)")
    w = attention_share(loaded, loaded.example_inputs(batch=1), shape)
    times = time_models(loaded, modules, batch, threads, runs, progress=progress)
    table = LatencyTable(shape, batch, dict(zip(counts, times[: len(counts)])), w)
    costs: dict[str, float] = {}
    for probe, ms in zip(probes, times[len(counts):]):  # a probe's other ops are priced by the earlier probes
        tokens = op_tokens(probe.stages, shape)
        key = op_key(probe.stages[0])
        if tokens.get(key):
            known = LatencyTable(shape, batch, table.measured, w, costs).predict(probe.stages)
            costs[key] = max(0.0, (ms - known) / tokens[key])
    return LatencyTable(shape, batch, table.measured, w, costs)
