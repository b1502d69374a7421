"""Speed of uncompressed vs compressed ONNX in ONNX Runtime, measured side by side in one process.

Both sessions get the same thread count and ``session.intra_op.allow_spinning = 0`` (otherwise the idle
session's spinning threads steal the cores); runs are interleaved, alternating which model goes first, and the
median is reported, so machine noise hits both models alike.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError


@dataclass(frozen=True)
class BenchConfig:
    batches: tuple[int, ...] = (1, 8)
    runs: int = 30
    warmup: int = 5
    threads: int = 2

    def __post_init__(self) -> None:
        if not self.batches or min(self.batches) < 1:
            raise ConfigError(f"--batch values must be >= 1, got {self.batches}")
        if self.runs < 3 or self.warmup < 0 or self.threads < 1:
            raise ConfigError("--runs must be >= 3, --warmup >= 0 and --threads >= 1")


@dataclass(frozen=True)
class BenchRow:
    batch: int
    baseline_ms: float
    compressed_ms: float
    mac_ratio: float

    @property
    def speedup(self) -> float:
        return self.baseline_ms / self.compressed_ms


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


def time_side_by_side(sessions: Sequence, feeds: Sequence[dict[str, np.ndarray]], runs: int, warmup: int) -> list[float]:
    """Median milliseconds per session, runs interleaved with alternating order."""
    for _ in range(warmup):
        for session, feed in zip(sessions, feeds):
            session.run(None, feed)
    samples: list[list[float]] = [[] for _ in sessions]
    for i in range(runs):
        order = range(len(sessions)) if i % 2 == 0 else reversed(range(len(sessions)))
        for k in order:
            start = time.perf_counter()
            sessions[k].run(None, feeds[k])
            samples[k].append((time.perf_counter() - start) * 1e3)
    return [statistics.median(s) for s in samples]


def profile_op_types(path: Path, feed: dict[str, np.ndarray], threads: int, runs: int = 10) -> dict[str, float]:
    """Mean milliseconds per run spent in each ONNX op type (ONNX Runtime's profiler)."""
    session = make_session(path, threads, profile=True)
    for _ in range(runs):
        session.run(None, feed)
    trace = Path(session.end_profiling())
    totals: dict[str, float] = defaultdict(float)
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"] / 1e3 / runs
    trace.unlink(missing_ok=True)
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def run_bench(
    export_pair: Callable[[int, Path], tuple[Path, Path, dict[str, np.ndarray]]],
    mac_ratio: float,
    config: BenchConfig,
    say: Callable[[str], None] = print,
    profile: bool = False,
) -> list[BenchRow]:
    """``export_pair(batch, folder)`` writes the baseline and compressed ONNX and returns them with a feed."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="tc-export-bench-") as folder:
        for batch in config.batches:
            baseline, compressed, feed = export_pair(batch, Path(folder))
            sessions = [make_session(baseline, config.threads), make_session(compressed, config.threads)]
            base_ms, comp_ms = time_side_by_side(sessions, [feed, feed], config.runs, config.warmup)
            row = BenchRow(batch, base_ms, comp_ms, mac_ratio)
            rows.append(row)
            say(f"batch {batch:>3}: uncompressed {base_ms:8.1f} ms · compressed {comp_ms:8.1f} ms · "
                f"speed-up {row.speedup:.2f}x (MAC ratio {mac_ratio:.2f}x)")
            if profile:
                for label, path in (("uncompressed", baseline), ("compressed", compressed)):
                    top = list(profile_op_types(path, feed, config.threads).items())[:8]
                    say(f"  {label} time by op type: " + ", ".join(f"{op} {ms:.1f} ms" for op, ms in top))
    return rows


def format_table(model: str, method: str, rows: Sequence[BenchRow], threads: int) -> str:
    lines = [
        "| model | method | batch | uncompressed (ms) | compressed (ms) | speed-up | MAC ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {model} | {method} | {row.batch} | {row.baseline_ms:.1f} | {row.compressed_ms:.1f} | "
                     f"{row.speedup:.2f}x | {row.mac_ratio:.2f}x |")
    lines.append(f"\nONNX Runtime CPU, {threads} intra-op threads, spinning off, interleaved runs, median.")
    return "\n".join(lines)
