"""The ``tc-export tune`` job: load, calibration data, search with a progress bar, real timing, outputs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ...errors import ConfigError, TCExportError
from .search import Scored, TuneConfig

if TYPE_CHECKING:
    from ...models import ModelOptions


def run_tune(model: str | Any, config: TuneConfig, output: Path, metric: str | None = None,
             calib: Path | None = None, samples: int = 64, json_path: Path | None = None, plot: Path | None = None,
             candidates: int | None = None, device: str | None = None, say: Callable[[str], None] = print,
             progress_file: TextIO | None = None, table: Any = None,
             compare: Sequence[Any] = (), options: ModelOptions | None = None) -> dict[str, Any]:
    """Run the whole job; returns the results document (also written to ``json_path``).

    ``table``: a latency table measured already (skips measuring one); ``compare``: extra schedules scored and
    timed in the same final loop as the winner (a benchmark's comparison rows); ``options``: the ``ModelOptions``
    a model name is built with (its weights seed)."""
    import click

    from ..bench_job import find_evaluator
    from ...models import LoadedModel, ModelOptions, load_model
    from ...models.registry import random_weights_message
    from .calib import load_calib, seeded_calib
    from .fidelity import Scorer
    from .output import RANDOM_INPUTS_WARNING, markdown, rows, summary, write_json, write_plot, write_text
    from .schedule import recipe_yaml
    from .search import comparison_rows, measure, model_shape, tune

    if samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {samples}")
    loaded = model if isinstance(model, LoadedModel) else load_model(model, options or ModelOptions(), warn_random=False)
    evaluator = find_evaluator(loaded.name)
    data = load_calib(calib, loaded, samples) if calib is not None else seeded_calib(loaded, samples)
    metric = metric or ("accuracy" if (evaluator is not None and data.seeded) or data.labels is not None
                        else "cosine")
    warning = None
    if data.seeded and not (metric == "accuracy" and evaluator is not None):
        warning = RANDOM_INPUTS_WARNING
        say(f"warning: {warning}")
    if loaded.random_init:
        say(f"warning: {random_weights_message(loaded, 'fidelity is vs the random model')}")
    scorer = Scorer(loaded, data, metric, evaluator)
    shape = model_shape(loaded)
    say(f"tune {loaded.name}: {shape.tokens} tokens ({shape.protected} protected), {shape.layers} layers, batch "
        f"{config.batch}; scoring by {scorer.describe}; uncompressed {scorer.show(scorer.baseline)}")
    budget = int(config.budget_s)
    with click.progressbar(length=budget, label="tune", file=progress_file, show_percent=False, show_eta=False,
                           item_show_func=lambda item: item,
                           bar_template="%(label)s [%(bar)s] %(info)s") as bar:
        def progress(seconds: float, label: str) -> None:
            bar.pos = min(int(seconds), budget)
            bar.current_item = f"{int(seconds) // 60}:{int(seconds) % 60:02d} of {budget // 60}:{budget % 60:02d}  {label[:60]}"
            bar.render_progress()

        result = tune(loaded, scorer, config, shape, progress, table)
    if result.best is None:
        reachable = min(result.unreachable.values(), default=None)
        raise ConfigError(f"no schedule of {', '.join(config.methods)} reaches {result.target_ms:.1f} ms at batch "
                          f"{config.batch} (uncompressed {result.table.baseline_ms:.1f} ms; the fastest predicted: "
                          f"{reachable:.1f} ms = {result.table.baseline_ms / reachable:.2f}x): lower the target")

    def recipe_text(scored: Scored) -> str:
        return recipe_yaml(scored.schedule, loaded.name,
                           f"tc-export tune: {scored.schedule.label}; {scorer.describe} {scorer.show(scored.score)}; "
                           f"predicted {result.table.baseline_ms / scored.predicted_ms:.2f}x at batch {config.batch}")

    if candidates is not None:
        from .device import write_bundle

        chosen = sorted([s for s in result.history if s.score is not None and s.predicted_ms <= result.target_ms * 1.3],
                        key=lambda s: -s.score)[:candidates]  # type: ignore[operator]
        write_bundle(output, loaded, chosen, config.batch, str(device), metric, recipe_text)
        say(f"wrote {len(chosen)} candidates to {output}/ (device side untested here: run time_engines.py on the "
            f"{device}, then tc-export tune {loaded.name} --latencies device.json --speedup X -o tuned.yaml)")
        return {"candidates": [s.schedule.label for s in chosen]}
    measured = comparison_rows(result, config.measure)
    shown = {s.schedule.label for s in measured}
    measured += [Scored(s, result.table.predict(s.stages), scorer.score(s.stages)) for s in compare
                 if s.label not in shown]
    searched = len(measured)
    baseline_ms, times = measure(loaded, measured, config)
    refit = refit_after_miss(result, measured, times, baseline_ms, shape, config, scorer)
    if refit is not None:  # every row timed again with it, so that all stay side by side in one loop
        measured.insert(searched, refit)
        searched += 1
        baseline_ms, times = measure(loaded, measured, config)
    result.best = pick_measured(result.best, measured[:searched], times[:searched], baseline_ms, config, say, refit)
    document = {
        "schema": "tc-export.tune/1", "model": loaded.name, "metric": metric, "calib": data.source,
        "calib_warning": warning, "target_ms": result.target_ms, "config": {
            k: v for k, v in vars(config).items()}, "table": result.table.as_dict(), "baseline_ms": baseline_ms,
        "baseline_score": result.baseline_score, "baseline_shown": scorer.show(result.baseline_score),
        "evaluations": result.evaluations, "search_seconds": result.search_seconds,
        "unreachable": result.unreachable,
        "rows": rows(result, measured, baseline_ms, times, shape, scorer.show),
    }
    write_text(output, recipe_text(result.best))
    say(markdown(document))
    say(summary(document))
    say(f"wrote {output} (export it with: tc-export {loaded.name} --recipe {output})")
    if json_path is not None:
        write_json(document, json_path)
    if plot is not None:
        say(f"wrote {write_plot(document, plot)}")
    return document


def refit_after_miss(result: Any, measured: Sequence[Scored], times: Sequence[float], baseline_ms: float,
                     shape: Any, config: TuneConfig, scorer: Any) -> Scored | None:
    """When the predicted winner measures short of the target, the latency model was off for it: the member of its
    family that the table corrected by that error predicts to meet the target, scored (to be timed with the rest;
    None when there is none)."""
    from .search import refit_member

    winner = result.best
    ms = next((t for row, t in zip(measured, times) if row is winner), None)
    if winner is None or ms is None or config.met_by(ms, baseline_ms):
        return None
    if config.latency_ms is not None:
        over = ms / winner.predicted_ms
    else:  # predicted speed-up / measured speed-up
        over = (result.table.baseline_ms / winner.predicted_ms) / (baseline_ms / ms)
    member = refit_member(winner, over, shape, result.table, result.target_ms, config)
    if member is None:
        return None
    try:
        return Scored(member, result.table.predict(member.stages), scorer.score(member.stages))
    except TCExportError:  # the passes refused it: nothing to time
        return None


def pick_measured(predicted: Scored | None, rows: Sequence[Scored], times: Sequence[float], baseline_ms: float,
                  config: TuneConfig, say: Callable[[str], None], refit: Scored | None = None) -> Scored | None:
    """The final pick is made on the real timing: when the predicted winner measures short of the target and
    other schedules measured beside it (the re-fitted member of its family among them, ``refit_after_miss``) meet
    it, the best-scoring of those wins. When none does, the re-fitted member (the winner moved towards the target
    by its own error) is taken if it measured faster than the winner: the closer of the two to the target."""
    measured = dict(zip((id(r) for r in rows), times))
    if predicted is None or id(predicted) not in measured or config.met_by(measured[id(predicted)], baseline_ms):
        return predicted
    meeting = [r for r, ms in zip(rows, times) if config.met_by(ms, baseline_ms) and r.score is not None]
    if not meeting:
        if refit is not None and id(refit) in measured and measured[id(refit)] < measured[id(predicted)]:
            say(f"note: nothing measured meets the target; {refit.schedule.label} (re-fitted to the measured error) "
                f"measured {baseline_ms / measured[id(refit)]:.2f}x, the closest: picked over {predicted.schedule.label}"
                f" ({baseline_ms / measured[id(predicted)]:.2f}x)")
            return refit
        say(f"note: {predicted.schedule.label} measured {baseline_ms / measured[id(predicted)]:.2f}x, short of the "
            "target, and no schedule measured beside it meets the target")
        return predicted
    best = max(meeting, key=lambda r: r.score)  # type: ignore[arg-type, return-value]
    say(f"note: {predicted.schedule.label} (the predicted winner) measured {baseline_ms / measured[id(predicted)]:.2f}x,"
        f" short of the target; {best.schedule.label} measured {baseline_ms / measured[id(best)]:.2f}x and scores "
        "best among those that meet it: picked on the measurement")
    return best
