"""The three results of ``tc-export tune`` (issue: the best schedule for a speed or latency target), one command.

    python benchmarks/tune_results.py                       # mnist_vit, minilm, vit_b
    python benchmarks/tune_results.py --models mnist_vit --budget 5m --runs 10

1. mnist_vit, batch 64, held-out accuracy: every constant-r ToMe measured side by side, the fastest within 1 point
   taken, then ``tune --speedup`` above it; done when the tuned schedule stays within 1 point at a higher measured
   speed-up.
2. minilm, real sentences (``--calib`` a text file), cosine: the tuned schedule against ToMe's constant r at the
   same target, both measured.
3. vit_b, batch 1, ``--speedup 1.85``: the schedule found, or the highest reachable with the latency table.

Writes benchmarks/results/tune_MODEL.md and .json. Timing is ORT CPU, side by side (interleaved); on a shared
machine the latency model's error and the speed-ups are noisy: rerun on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

from tc_export.cli.tune_command import parse_budget
from tc_export.models import ModelOptions, load_model
from tc_export.passes.tome import ToMeConfig
from tc_export.measure.tune.output import markdown, summary
from tc_export.measure.tune.run import run_tune
from tc_export.measure.tune.search import TuneConfig, latency_table, model_shape
from tc_export.measure.tune.schedule import Schedule

RESULTS = Path(__file__).resolve().parent / "results"


def constant_r_target(loaded, values, batch, runs, budget):
    """The constant-r ToMe rows scored by the evaluator and predicted by one latency table; the tune target is just
    above the fastest one that stays within 1 point (those rows are timed again beside the tuned one)."""
    from tc_export.measure.bench_job import find_evaluator
    from tc_export.measure.tune.calib import seeded_calib
    from tc_export.measure.tune.fidelity import Scorer

    scorer = Scorer(loaded, seeded_calib(loaded, 64), "accuracy", find_evaluator(loaded.name))
    schedules = [Schedule(f"tome r={r}", "tome constant r", (ToMeConfig(r=r),)) for r in values]
    table = latency_table(loaded, model_shape(loaded), TuneConfig(speedup=2.0, batch=batch, runs=runs,
                                                                   budget_s=budget))
    within = [s for s in schedules if scorer.baseline - scorer.score(s.stages) <= 0.01]
    fastest = max((table.baseline_ms / table.predict(s.stages) for s in within), default=1.0)
    return schedules, table, round(max(fastest * 1.05, 1.05), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mnist_vit,minilm,vit_b")
    parser.add_argument("--budget", default="10m")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where tune_MODEL.md/.json go")
    parser.add_argument("--smoke", action="store_true",
                        help="mnist_vit only, a 5 s budget, three runs, results in ./tune_smoke (the benchmark test)")
    args = parser.parse_args()
    if args.smoke:
        args.models, args.budget, args.runs, args.out = "mnist_vit", "5s", 3, Path("tune_smoke")
    warnings.filterwarnings("ignore")
    budget = parse_budget(args.budget)
    sections = []
    for model in args.models.split(","):
        started = time.monotonic()
        loaded = load_model(model, ModelOptions(), warn_random=False)
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "tuned.yaml"
            if model == "mnist_vit":
                values = (16,) if args.smoke else (16, 32, 48, 64, 80, 98)
                schedules, table, target = constant_r_target(loaded, values, 64, args.runs, budget)
                document = run_tune(loaded, TuneConfig(speedup=target, batch=64, budget_s=budget, runs=args.runs),
                                    out, table=table, compare=schedules)
                baseline = document["baseline_score"]
                tuned = next(r for r in document["rows"] if r["tuned"])
                rows = [r for r in document["rows"] if r["family"] == "tome constant r"]
                within = [r for r in rows if baseline - r["score"] <= 0.01]
                best = max(within, key=lambda r: r["speedup"])
                met = tuned["speedup"] > best["speedup"] and baseline - tuned["score"] <= 0.01
                verdict = (f"constant-r ToMe within 1 point, timed in the same loop as the tuned schedule: fastest "
                           f"{best['label']} {best['speedup']:.2f}x ({best['shown']}); tune --speedup {target} (5% "
                           f"above its prediction): {tuned['label']} {tuned['speedup']:.2f}x ({tuned['shown']}, "
                           f"uncompressed {document['baseline_shown']}): " + ("done" if met else "NOT met in this run"))
                if not met:
                    faster = [r for r in document["rows"] if r["speedup"] > best["speedup"]]
                    ceiling = best["label"] == f"tome r={max(values)}"
                    verdict += ((f". {best['label']} is ToMe's ceiling (every layer merges half its tokens)"
                                 if ceiling else "")
                                + ". Faster here: " + ("; ".join(
                                    f"{r['label']} {r['speedup']:.2f}x, {100 * (baseline - r['score']):.1f} points down"
                                    for r in faster) if faster else "nothing"))
            elif model == "minilm":
                from tc_export.data import sentences

                calib = Path(folder) / "sentences.txt"
                calib.write_text("\n".join(sentences()[-128:]) + "\n")
                shape = model_shape(loaded)
                max_r = (shape.tokens - shape.protected) // 2
                compare = [Schedule(f"tome r={r}", "tome constant r", (ToMeConfig(r=r),))
                           for r in sorted({min(r, max_r) for r in (2, 4, 8, 12, 16, 24, 32)})]
                document = run_tune(loaded, TuneConfig(speedup=1.5, batch=1, methods=("tome", "adjacent"),
                                                       budget_s=budget, runs=args.runs), out, metric="cosine",
                                    calib=calib, samples=128, compare=compare)
                tuned = next(r for r in document["rows"] if r["tuned"])
                rows = [r for r in document["rows"] if r["family"] == "tome constant r"]
                as_fast = [r for r in rows if r["speedup"] >= tuned["speedup"]]
                rival = max(as_fast, key=lambda r: r["score"], default=None)
                verdict = (f"tuned {tuned['label']} {tuned['speedup']:.2f}x cosine {tuned['score']:.4f}; best "
                           "constant r at least as fast (same loop): "
                           + (f"{rival['label']} {rival['speedup']:.2f}x cosine {rival['score']:.4f}: "
                              + ("done" if tuned["score"] > rival["score"] else "NOT met in this run")
                              if rival else "none as fast: done"))
            else:
                try:
                    document = run_tune(loaded, TuneConfig(speedup=1.85, batch=1, budget_s=budget, runs=args.runs),
                                        out)
                    tuned = next(r for r in document["rows"] if r["tuned"])
                    verdict = (f"tune --speedup 1.85 at batch 1: {tuned['label']} {tuned['speedup']:.2f}x measured "
                               f"({tuned['shown']}): " + ("done" if tuned["speedup"] >= 1.85 else "NOT met in this run"))
                except Exception as error:  # noqa: BLE001 - the unreachable case is a result, with its reason
                    document, verdict = {}, f"not reached: {error}"
        minutes = (time.monotonic() - started) / 60
        sections.append(f"## {model}\n\n{verdict}; search + measurement {minutes:.1f} min\n\n"
                        + (markdown(document) + "\n\n```\n" + summary(document) + "\n```\n" if document else ""))
        print(sections[-1], flush=True)
        args.out.mkdir(exist_ok=True)  # one file per model, so models can be rerun one at a time
        (args.out / f"tune_{model}.md").write_text(sections[-1])
        (args.out / f"tune_{model}.json").write_text(json.dumps(document, indent=2, default=str) + "\n")

if __name__ == "__main__":
    main()
