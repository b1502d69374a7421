"""Speed of uncompressed vs compressed ONNX in ONNX Runtime, measured side by side in one process.

Both sessions get the same thread count and ``session.intra_op.allow_spinning = 0`` (otherwise the idle
session's spinning threads steal the cores); runs are interleaved, alternating which model goes first, and the
median is reported, so machine noise hits both models alike.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np



def make_session(path: Path, threads: int, profile: bool = False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = str(path.with_suffix(""))
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class Timing:
    """Milliseconds per run of one model over interleaved runs."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def p90(self) -> float:
        ordered = sorted(self.samples)
        return float(np.percentile(ordered, 90, method="linear"))


def time_interleaved(calls: Sequence[Callable[[], object]], runs: int, warmup: int) -> list[Timing]:
    """Time each call ``runs`` times in one loop, alternating the order every run, so noise hits all alike."""
    for _ in range(warmup):
        for call in calls:
            call()
    samples: list[list[float]] = [[] for _ in calls]
    for i in range(runs):
        order = range(len(calls)) if i % 2 == 0 else reversed(range(len(calls)))
        for k in order:
            start = time.perf_counter()
            calls[k]()
            samples[k].append((time.perf_counter() - start) * 1e3)
    return [Timing(tuple(s)) for s in samples]


def time_side_by_side(sessions: Sequence, feeds: Sequence[dict[str, np.ndarray]], runs: int, warmup: int) -> list[float]:
    """Median milliseconds per session, runs interleaved with alternating order."""
    calls = [lambda s=session, f=feed: s.run(None, f) for session, feed in zip(sessions, feeds)]
    return [timing.median for timing in time_interleaved(calls, runs, warmup)]


def profile_op_types(path: Path, feed: dict[str, np.ndarray], threads: int, runs: int = 10) -> dict[str, float]:
    """Mean milliseconds per run spent in each ONNX op type (ONNX Runtime's profiler)."""
    totals: dict[str, float] = defaultdict(float)
    for (_, op_type), ms in profile_nodes(path, feed, threads, runs).items():
        totals[op_type] += ms
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def profile_nodes(path: Path, feed: dict[str, np.ndarray], threads: int, runs: int = 10) -> dict[tuple[str, str], float]:
    """Mean milliseconds per run spent in each node, keyed by (node name, op type) (ONNX Runtime's profiler)."""
    session = make_session(path, threads, profile=True)
    for _ in range(runs):
        session.run(None, feed)
    trace = Path(session.end_profiling())
    totals: dict[tuple[str, str], float] = defaultdict(float)
    for event in json.loads(trace.read_text()):
        name = event.get("name", "")
        if event.get("cat") == "Node" and name.endswith("_kernel_time"):
            totals[(name[: -len("_kernel_time")], event["args"]["op_name"])] += event["dur"] / 1e3 / runs
    trace.unlink(missing_ok=True)
    return dict(totals)
