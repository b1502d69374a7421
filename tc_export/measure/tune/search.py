"""``tc-export tune``: find the schedule with the best fidelity whose predicted latency meets the target.

1. Measure the latency table (``latency.py``) once: the model truncated to a grid of token counts, plus one
   probe per method for its op cost, in one interleaved loop.
2. From every family (``families.py``) take the weakest member the table predicts meets the target; score it on
   the calibration inputs.
3. Refine the best ToMe schedule per layer until the time budget runs out: shift merges from one layer to
   another, re-fit the receiving layer's r to the target, keep the move when the score improves.
4. Time the winner and the comparison rows for real, side by side with the uncompressed model (``measure``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ...errors import ConfigError, TCExportError
from .families import METHOD_NAMES, defaults, families, tome_vector, vector_of
from .fidelity import Scorer
from .latency import LatencyTable, grid, measure_table
from .schedule import Schedule, Shape, op_key, token_list


@dataclass(frozen=True)
class TuneConfig:
    """The target (a speed-up or a latency), the batch, the methods searched and how long to search."""

    speedup: float | None = None
    latency_ms: float | None = None
    batch: int = 1
    methods: tuple[str, ...] = METHOD_NAMES
    budget_s: float = 1200.0
    multiple: int | None = None
    threads: int = 2
    runs: int = 20  # timed runs per model, table and final measurement
    table_points: int = 10
    measure: int = 8  # schedules timed for real at the end (beside the uncompressed model)
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.speedup is None) == (self.latency_ms is None):
            raise ConfigError("tune needs exactly one target: --speedup X or --latency-ms MS")
        if self.speedup is not None and self.speedup <= 1.0:
            raise ConfigError(f"--speedup must be above 1, got {self.speedup}")
        if self.latency_ms is not None and self.latency_ms <= 0:
            raise ConfigError(f"--latency-ms must be positive, got {self.latency_ms}")
        if self.batch < 1 or self.threads < 1 or self.runs < 3 or self.table_points < 2:
            raise ConfigError("--batch and --threads must be >= 1, --runs >= 3")
        unknown = sorted(set(self.methods) - set(METHOD_NAMES))
        if unknown or not self.methods:
            raise ConfigError(f"--methods: unknown {unknown[0]!r}; choose from {', '.join(METHOD_NAMES)}"
                              if unknown else "--methods is empty")
        if self.budget_s <= 0:
            raise ConfigError(f"--time-budget must be positive, got {self.budget_s:g} s")
        if self.multiple is not None and self.multiple < 2:
            raise ConfigError(f"--multiple must be >= 2, got {self.multiple}")

    def target(self, baseline_ms: float) -> float:
        return self.latency_ms if self.latency_ms is not None else baseline_ms / self.speedup  # type: ignore[operator]

    def met_by(self, ms: float, baseline_ms: float) -> bool:
        """A schedule timed at ``ms`` beside the uncompressed model at ``baseline_ms`` meets the target."""
        if self.latency_ms is not None:
            return ms <= self.latency_ms
        return baseline_ms / ms >= self.speedup  # type: ignore[operator]


@dataclass
class Scored:
    schedule: Schedule
    predicted_ms: float
    score: float | None = None  # None: the passes refused it (error in ``note``)
    note: str = ""


@dataclass
class TuneResult:
    table: LatencyTable
    target_ms: float
    best: Scored | None
    family_best: dict[str, Scored]
    unreachable: dict[str, float]  # family -> its strongest member's predicted ms, when it cannot meet the target
    defaults: list[Scored]
    evaluations: int
    search_seconds: float
    baseline_score: float
    history: list[Scored] = field(default_factory=list)


def model_shape(loaded: Any) -> Shape:
    """Tokens, protected prefix and layers of ``loaded``, from one no-op pass over its graph."""
    from ...job.compress import compress
    from .truncate import TruncateAt

    probe = compress(loaded, [TruncateAt(keep=10**9)], loaded.example_inputs(batch=1))
    counts = probe.token_counts()
    return Shape(counts[0], probe.protected, len(counts) - 1)


def latency_table(loaded: Any, shape: Shape, config: TuneConfig, progress: Callable[[str], None] = lambda _: None,
                  pool: dict[str, list[Schedule]] | None = None) -> LatencyTable:
    """The latency table of ``config``'s grid, with one probe per method (the middle member of its family)."""
    pool = pool if pool is not None else families(shape, config.methods, config.multiple)
    probes: dict[str, Schedule] = {}  # one per method (the first family of each; every method gets its op cost)
    for name, members in pool.items():
        if name in ("tome constant r", "topk EViT layers", "adjacent constant r") or name.startswith("prumerge at") \
                or "input" in name:
            probes.setdefault(op_key(members[0].stages[0]), members[len(members) // 2])
    counts = grid(shape, config.table_points, config.multiple)
    return measure_table(loaded, shape, config.batch, counts, list(probes.values()), config.threads, config.runs,
                         progress=progress)


def tune(loaded: Any, scorer: Scorer, config: TuneConfig, shape: Shape | None = None,
         progress: Callable[[float, str], None] = lambda seconds, label: None,
         table: LatencyTable | None = None) -> TuneResult:
    """Search (see the module docstring). ``progress(elapsed_seconds, label)`` is called as it goes."""
    started = time.monotonic()
    elapsed = lambda: time.monotonic() - started  # noqa: E731
    shape = shape or model_shape(loaded)
    pool = families(shape, config.methods, config.multiple)
    if not pool:
        raise ConfigError(f"--methods {','.join(config.methods)}: none applies to {loaded.name} (Top-K and PruMerge "
                          "need a class token)")
    if table is None:
        table = latency_table(loaded, shape, config, lambda label: progress(elapsed(), f"latency table: {label}"),
                              pool)
    target = config.target(table.baseline_ms)
    evaluations = 0
    cache: dict[str, Scored] = {}

    def evaluate(schedule: Schedule) -> Scored:
        nonlocal evaluations
        key = repr(schedule.stages)
        if key not in cache:
            scored = Scored(schedule, table.predict(schedule.stages))
            try:
                scored.score = scorer.score(schedule.stages)
            except TCExportError as error:
                scored.note = str(error)
            evaluations += 1
            cache[key] = scored
            progress(elapsed(), f"{schedule.label[:40]}: {scorer.show(scored.score) if scored.score is not None else 'refused'}")
        return cache[key]

    family_best: dict[str, Scored] = {}
    unreachable: dict[str, float] = {}
    for name, members in pool.items():
        meeting = next((m for m in members if table.predict(m.stages) <= target), None)
        if meeting is None:
            unreachable[name] = table.predict(members[-1].stages)
            continue
        if elapsed() > config.budget_s and family_best:  # out of time: the families scored so far
            continue
        family_best[name] = evaluate(meeting)
    scored = [s for s in family_best.values() if s.score is not None]
    rank = lambda s: (s.score, -s.predicted_ms)  # noqa: E731 - equal scores: the faster one
    best = max(scored, key=rank) if scored else None
    tome_start = max((s for s in scored if vector_of(s.schedule, shape) is not None), key=rank, default=None)
    if tome_start is not None:
        best_tome = _refine(tome_start, shape, table, target, evaluate, config, lambda: elapsed() < config.budget_s)
        if best is None or (best_tome.score is not None and best_tome.score > best.score):  # type: ignore[operator]
            best = best_tome
    default_rows = [evaluate(s) for s in defaults(shape, config.methods)]
    return TuneResult(table, target, best, family_best, unreachable, default_rows, evaluations, elapsed(),
                      scorer.baseline, list(cache.values()))


def _refine(start: Scored, shape: Shape, table: LatencyTable, target: float, evaluate: Callable[[Schedule], Scored],
            config: TuneConfig, time_left: Callable[[], bool]) -> Scored:
    """Hill-climb the per-layer r: move merges from layer i to layer j, re-fit r_j to the target."""
    rng = random.Random(config.seed)
    best = start
    vector = vector_of(start.schedule, shape) or []
    L = shape.layers
    step = max(1, (shape.tokens - shape.protected) // 32)
    while time_left() and step >= 1:
        improved = False
        moves = [(i, j) for i in range(L) for j in range(L) if i != j]
        rng.shuffle(moves)
        for i, j in moves:
            if not time_left():
                break
            if vector[i] < step:
                continue
            trial = list(vector)
            trial[i] -= step
            fitted = _fit(trial, j, shape, table, target, config.multiple)
            if fitted is None:
                continue
            result = evaluate(fitted)
            if result.score is not None and result.score > best.score:  # type: ignore[operator]
                best, vector, improved = result, vector_of(fitted, shape) or vector, True
        if not improved:
            step //= 2
    return best


def _fit(vector: list[int], layer: int, shape: Shape, table: LatencyTable, target: float,
         multiple: int | None) -> Schedule | None:
    """The smallest r at ``layer`` that brings the predicted latency to the target (None: none does)."""
    limit = (shape.tokens - shape.protected) // 2
    for r in range(0, limit + 1):
        trial = list(vector)
        trial[layer] = r
        schedule = tome_vector(trial, shape, multiple)
        if schedule is not None and table.predict(schedule.stages) <= target:
            return schedule
    return None


def comparison_rows(result: TuneResult, limit: int) -> list[Scored]:
    """What to time for real: the winner, each family's member at the target (best first), the defaults."""
    rows: list[Scored] = []
    seen: set[str] = set()
    ordered = sorted((s for s in result.family_best.values() if s.score is not None),
                     key=lambda s: -s.score)  # type: ignore[operator]
    must = [s for s in ordered if s.schedule.family in ("tome constant r",) or "linear" in s.schedule.family]
    for scored in [result.best, *must, *ordered, *result.defaults]:
        if scored is None or scored.score is None or scored.schedule.label in seen:
            continue
        seen.add(scored.schedule.label)
        rows.append(scored)
    return rows[:limit]


def refit_member(missed: Scored, over: float, shape: Shape, table: LatencyTable, target_ms: float,
                 config: TuneConfig) -> Schedule | None:
    """The member of ``missed``'s family that the latency table, corrected by ``missed``'s own measured error
    ``over`` (> 1: the table predicted it that many times too fast), predicts to meet the target: the weakest member
    predicted at ``target / over``. None when the family is not a swept one (a searched per-layer r) or no stronger
    member exists."""
    members = families(shape, config.methods, config.multiple).get(missed.schedule.family, [])
    corrected = target_ms / max(over, 1.0)
    predicted = ((m, table.predict(m.stages)) for m in members if m.label != missed.schedule.label)
    return next((m for m, ms in predicted if ms <= corrected and ms < missed.predicted_ms), None)


def tokens_of(scored: Scored, shape: Shape) -> list[int]:
    return token_list(scored.schedule.stages, shape)


def measure(loaded: Any, rows: Sequence[Scored], config: TuneConfig,
            progress: Callable[[str], None] = lambda _: None) -> tuple[float, list[float]]:
    """(uncompressed ms, each row's ms): exported and timed side by side in one interleaved loop."""
    from ...job.compress import compress
    from .latency import time_models

    inputs = loaded.example_inputs(batch=config.batch)
    modules = [loaded.module] + [compress(loaded, list(r.schedule.stages), inputs).module for r in rows]
    times = time_models(loaded, modules, config.batch, config.threads, config.runs, progress=progress)
    return times[0], times[1:]
