"""``tc-export tune MODEL --speedup 2 -o tuned.yaml``: the best schedule for a target, on this backend."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click

from ..errors import ConfigError
from .options import weights_seed_option


def parse_budget(text: str) -> float:
    """``20m`` -> 1200.0 seconds; ``90s``, ``1h``, ``45`` (seconds)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", text)
    if not match:
        raise ConfigError(f"--time-budget must be a duration like 20m, 90s or 1h, got {text!r}")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


@click.command("tune")
@click.argument("model")
@click.option("--speedup", type=float, default=None, help="Target: this speed-up over the uncompressed model.")
@click.option("--latency-ms", type=float, default=None, help="Target: this latency (ms) at --batch.")
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--methods", default="tome,topk,adjacent,prumerge", show_default=True,
              help="Methods searched (comma-separated).")
@click.option("--metric", type=click.Choice(["accuracy", "cosine", "kl"]), default=None,
              help="Default: accuracy when the model has an evaluator or --calib has labels, else cosine.")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="Your inputs: a folder of images, a text file of sentences, or a tensor file.")
@click.option("--samples", type=int, default=64, show_default=True, help="Calibration inputs used (at most).")
@click.option("--time-budget", "budget", default="20m", show_default=True, help="Search time, e.g. 20m, 90s.")
@click.option("--multiple", type=int, default=None, help="Snap token counts to multiples of this (e.g. 8).")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--runs", type=int, default=20, show_default=True, help="Timed runs per model (interleaved).")
@click.option("--measure", "measure_count", type=int, default=8, show_default=True,
              help="Schedules timed for real at the end, side by side with the uncompressed model.")
@click.option("--candidates", type=int, default=None, help="Write N candidates into the bundle -o DIR/ instead.")
@click.option("--target", "device", default=None, help="With --candidates: the device, e.g. jetson-orin-nano.")
@click.option("--latencies", type=click.Path(path_type=Path), default=None,
              help="Pick from a device.json written by the bundle's time_engines.py.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the results (JSON).")
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="Write the plot (PNG).")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="tuned.yaml (or DIR/ with --candidates).")
@weights_seed_option
def tune_command(model: str, speedup: float | None, latency_ms: float | None, batch: int, methods: str,
                 metric: str | None, calib: Path | None, samples: int, budget: str, multiple: int | None,
                 threads: int, runs: int, measure_count: int, candidates: int | None, device: str | None,
                 latencies: Path | None, json_path: Path | None, plot: Path | None, output: Path,
                 weights_seed: int) -> None:
    """Search the method and per-layer schedule that best keeps fidelity at a speed-up or latency target.

    \b
    tc-export tune mnist_vit --speedup 2 --batch 64 -o tuned.yaml
    tc-export tune minilm --speedup 1.5 --calib sentences.txt --metric cosine -o tuned.yaml
    tc-export MODEL --recipe tuned.yaml -o model.onnx
    """
    from ..measure.tune.output import write_text

    if latencies is not None:
        from ..measure.tune.device import pick

        chosen = pick(latencies, speedup, latency_ms)
        write_text(output, chosen["recipe"])
        click.echo(f"picked {chosen['label']}: {chosen['latency_ms']:.2f} ms on the device ({chosen['speedup']:.2f}x, "
                   f"target {chosen['target_ms']:.2f} ms), score {chosen.get('score')}; wrote {output}")
        return
    if (candidates is None) != (device is None):
        raise ConfigError("--candidates N and --target DEVICE go together (a bundle for the device)")
    if candidates is not None and candidates < 1:
        raise ConfigError(f"--candidates must be >= 1, got {candidates}")
    if candidates is None and output.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"-o {output}: tune writes a recipe: give a .yaml file (or --candidates N -o DIR/)")
    for path in (output if candidates is None else None, json_path, plot):
        if path is not None and not path.resolve().parent.is_dir():
            raise ConfigError(f"cannot write {path}: directory {path.resolve().parent} does not exist")
    if plot is not None:
        from ..measure.bench_report import require_matplotlib

        require_matplotlib()
    from ..measure.tune.search import TuneConfig

    config = TuneConfig(speedup=speedup, latency_ms=latency_ms, batch=batch,
                        methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
                        budget_s=parse_budget(budget), multiple=multiple, threads=threads, runs=runs,
                        measure=measure_count)
    from ..measure.tune.run import run_tune
    from ..models import ModelOptions

    run_tune(model, config, output, options=ModelOptions(weights_seed=weights_seed), metric=metric, calib=calib, samples=samples, json_path=json_path, plot=plot,
             candidates=candidates, device=device, say=click.echo, progress_file=sys.stderr)
