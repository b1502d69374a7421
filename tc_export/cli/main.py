"""``tc-export MODEL --method tome --r 16 -o model.onnx`` and the ``list`` and ``bench`` subcommands."""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import click

from ..errors import ConfigError, InternalError, TCExportError
from .options import MethodFlags, method_configs, method_options, weights_seed_option
from .report_command import report_command
from .trt_commands import EngineFlags, engine_options, export_target, register_trt_commands
from .tune_command import tune_command


class DefaultCommandGroup(click.Group):
    """A group whose first argument, when it is not a subcommand, is the model of the default ``export``."""

    default_command = "export"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultCommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tc-export")
def cli() -> None:
    """Export token-compressed transformers to static-shape ONNX and TensorRT.

    \b
    tc-export vit_b --method tome --r 16 -o model.onnx
    tc-export vit_b --method tome --r 16 -o model.engine   # on a machine with TensorRT and a GPU
    tc-export list
    tc-export bench vit_b --method tome --r 16
    """


@cli.command("export")
@click.argument("model")
@method_options
@click.option("-o", "--output", type=click.Path(), default=None, help="model.onnx, model.engine or DIR/ (a bundle).")
@click.option("--weights", type=click.Path(path_type=Path), default=None, help="safetensors or PyTorch state dict.")
@click.option("--pretrained", is_flag=True, help="Library's pretrained weights (from its local cache).")
@click.option("--img-size", type=int, default=None, help="Input resolution, e.g. 384.")
@click.option("--pooling", default=None, help="transformers models: logits, pooler, cls, mean or tokens "
              "(default: logits, else pooler, else mean).")
@click.option("--batch", type=int, default=1, show_default=True, help="Static batch size.")
@click.option("--dynamic-batch", is_flag=True, help="Leave the batch dimension symbolic.")
@click.option("--features", type=int, default=None,
              help="Vision-tower mode: output the tokens of this block (-2: second-to-last, as LLaVA).")
@click.option("--frames", type=int, default=None, help="Video: input (B, T, 3, H, W); the tower runs per frame.")
@click.option("--emit-positions", is_flag=True,
              help="Add outputs 'positions' (B, N, P) and 'sizes' (B, N, 1) of the output tokens.")
@click.option("--unit", type=int, default=None, metavar="S",
              help="Merge units: token methods act on whole S x S patch windows (set by itself when a patchmerger, "
                   "unshuffle or pool follows a token method).")
@click.option("--opset", type=int, default=18, show_default=True)
@click.option("--no-functions", is_flag=True, help="Flat ONNX: no tc_export function node per token op.")
@click.option("--external-data", is_flag=True,
              help="Weights in one data file beside the ONNX (MODEL.onnx.data); automatic over 2 GB.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="Weights and compute of the ONNX (inputs and outputs stay fp32); token ops score in fp32.")
@click.option("--atol", type=float, default=None, help="Parity: absolute tolerance [default: 1e-4; per --dtype].")
@click.option("--rtol", type=float, default=None, help="Parity: relative tolerance [default: 1e-3; per --dtype].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the parity inputs.")
@weights_seed_option
@click.option("--parity-samples", type=int, default=2, show_default=True,
              help="Parity inputs, seeds --seed, --seed + 1, ...")
@click.option("--fp16", is_flag=True, help="TensorRT engine: allow FP16 kernels.")
@engine_options
def export_command(model: str, flags: MethodFlags, engine_flags: EngineFlags, output: Path | None,
                   weights: Path | None, pretrained: bool, weights_seed: int,
                   img_size: int | None, pooling: str | None, batch: int,
                   dynamic_batch: bool, features: int | None, frames: int | None, emit_positions: bool,
                   unit: int | None, opset: int,
                   no_functions: bool, external_data: bool, dtype: str, atol: float | None, rtol: float | None,
                   seed: int, parity_samples: int, fp16: bool) -> None:
    """Compress MODEL, export it to ONNX (and TensorRT), and check parity."""
    from ..export.onnx_export import ExportConfig
    from ..export.checks.parity import ParityConfig
    from ..models import ModelOptions
    from ..job.pipeline import JobConfig, run_job
    methods, _ = method_configs(flags)
    if flags.recipe is not None:  # a recipe may carry the tower settings (--features, --frames)
        from ..recipes import load_recipe

        recipe = load_recipe(flags.recipe)
        features = recipe.features if features is None else features
        frames = recipe.frames if frames is None else frames
        unit = recipe.unit if unit is None else unit
    if output is None:
        suffix = flags.method or (flags.recipe and Path(flags.recipe).stem)
        output = Path(f"{model.replace(':', '_').replace('/', '_')}{'-' + suffix if suffix else ''}.onnx")
    output, engine, bundle = export_target(output, engine_flags, fp16)  # TensorRT: engine flags, DIR/ bundles
    config = JobConfig(
        model=model,
        output=output,
        methods=methods,
        recipe=flags.recipe,
        model_options=ModelOptions(img_size=img_size, weights=weights, pretrained=pretrained, pooling=pooling,
                                   frames=frames, weights_seed=weights_seed),
        features=features,
        emit_positions=emit_positions,
        unit=unit,
        export=ExportConfig(opset=opset, batch=batch, dynamic_batch=dynamic_batch, functions=not no_functions,
                            external_data=external_data, dtype=dtype),
        parity=ParityConfig.for_dtype(dtype, atol=atol, rtol=rtol, seed=seed, samples=parity_samples),
        fp16=fp16,
        engine=engine,
        bundle=bundle,
    )
    run_job(config, say=click.echo)


@cli.command("bench")
@click.argument("model")
@method_options
@click.option("--config", "configs", multiple=True, metavar="SPEC",
              help='Another configuration, side by side (repeatable): "tome r=8", "topk keep=0.7 layers=3,6,9", '
                   'a recipe name or YAML file.')
@click.option("--sweep", "sweeps", multiple=True, metavar="NAME=V1,V2",
              help="Sweep a config field over values (repeatable: their product), e.g. r=0,4,8,12,16 or keep=0.5,0.7.")
@click.option("--img-size", type=int, default=None)
@click.option("--weights", type=click.Path(path_type=Path), default=None, help="safetensors or PyTorch state dict.")
@click.option("--batch", "batches", type=int, multiple=True, default=(1, 8), show_default=True)
@click.option("--runs", type=int, default=30, show_default=True, help="Timed runs per model (interleaved).")
@click.option("--warmup", type=int, default=5, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--backend", type=click.Choice(["ort", "torch", "trt"]), default="ort", show_default=True,
              help="ort: ONNX Runtime CPU; torch: eager PyTorch of the same compressed graph; trt: TensorRT.")
@click.option("--int8", is_flag=True, help="Add an int8 row (ONNX Runtime dynamic quantization) per configuration.")
@click.option("--baselines", is_flag=True,
              help="Add the uncompressed model after ORT's transformer optimizer and eager reference ToMe.")
@click.option("--samples", type=int, default=16, show_default=True, help="Seeded inputs for fidelity.")
@click.option("--seed", type=int, default=1000, show_default=True, help="Seed of the fidelity inputs.")
@weights_seed_option
@click.option("--profile", is_flag=True, help="Also print where the time goes, by ONNX op type.")
@click.option("--no-functions", "flat", is_flag=True, help="Export the token ops inline (no ONNX local functions).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write results (JSON).")
@click.option("--markdown", type=click.Path(path_type=Path), default=None, help="Write the table to this file.")
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="Write PNG plots into this directory.")
def bench_command(model: str, flags: MethodFlags, configs: tuple[str, ...], sweeps: tuple[str, ...],
                  img_size: int | None, weights: Path | None, batches: tuple[int, ...], runs: int, warmup: int,
                  threads: int, backend: str, int8: bool, baselines: bool, samples: int, seed: int, weights_seed: int,
                  profile: bool, flat: bool,
                  json_path: Path | None, markdown: Path | None, plot: Path | None) -> None:
    """Measure configurations against the uncompressed model: speed, fidelity, accuracy. Default: tome r=16.

    \b
    tc-export bench vit_b --method tome --sweep r=0,8,16 --batch 1 --batch 8 --json out.json --plot plots/
    tc-export bench deit_s --config "tome r=8" --config "topk keep=0.7 layers=3,6,9" --int8 --baselines
    """
    from ..measure.bench_job import SweepConfig, check_backend, run_sweep
    from ..measure.bench_report import document, footnote, markdown_table, require_matplotlib, write_json, write_plots
    from ..models import ModelOptions, load_model
    from ..measure.sweep import candidate_from_configs, expand, parse_config_spec, parse_sweep
    from ..models.registry import random_weights_message

    config = SweepConfig(batches=tuple(batches), runs=runs, warmup=warmup, threads=threads, backend=backend,
                         int8=int8, baselines=baselines, samples=samples, seed=seed, profile=profile,
                         flat=flat)
    check_backend(backend)
    if plot is not None:
        require_matplotlib()
    for path in (json_path, markdown):
        if path is not None and not path.resolve().parent.is_dir():
            raise ConfigError(f"cannot write {path}: directory {path.resolve().parent} does not exist")
    axes = [parse_sweep(text) for text in sweeps]
    candidates = [parse_config_spec(text) for text in configs]
    if flags.method or flags.recipe or flags.given() or not candidates:
        methods, label = method_configs(flags, default_method="tome")
        base = candidate_from_configs(methods, flags.method or None)
        if flags.recipe:
            base = replace(base, label=label, method=label, params={"recipe": flags.recipe})
        candidates.insert(0, base)
    candidates = expand(candidates, axes)
    loaded = load_model(model, ModelOptions(img_size=img_size, weights=weights, weights_seed=weights_seed),
                        warn_random=False)
    if loaded.random_init:
        click.echo(f"warning: {random_weights_message(loaded, 'fidelity is vs the random model, accuracy is null')}")
    groups = 2 if baselines else 1
    steps = len(batches) * (1 + len(candidates) + groups + (1 + len(candidates) if baselines else 0))
    with click.progressbar(length=steps, label="bench", file=sys.stderr, show_pos=True,
                           item_show_func=lambda item: item) as bar:
        rows = run_sweep(loaded, candidates, config, say=click.echo,
                         progress=lambda label: bar.update(1, label[:40]))
    doc = document(rows, {"model": model, "candidates": [c.label for c in candidates], "sweeps": list(sweeps),
                          "img_size": img_size, **config.as_dict()})
    table = markdown_table(rows) + footnote(doc["config"], doc["machine"])
    click.echo(table)
    if json_path is not None:
        write_json(doc, json_path)
    if markdown is not None:
        markdown.write_text(table + "\n")
    if plot is not None:
        for path in write_plots(rows, plot):
            click.echo(f"wrote {path}")


@cli.command("list")
def list_command() -> None:
    """Show the models and methods."""
    from ..models import hf_models, mnist, timm_models, towers  # noqa: F401 - registers their entries
    from ..models.registry import MODELS, PREFIXES  # noqa: F401
    from ..passes import METHODS
    from ..recipes import load_recipe, shipped_recipes

    click.echo("models:")
    for name, spec in MODELS.items():
        click.echo(f"  {name:<18} {spec.description}")
    for _, (usage, _) in sorted(PREFIXES.items()):
        click.echo(f"  {usage}")
    click.echo("methods:")
    for name, spec in METHODS.items():
        click.echo(f"  {name:<18} {spec.description}")
    click.echo("recipes (--recipe NAME, or a YAML file):")
    for name, path in sorted(shipped_recipes().items()):
        click.echo(f"  {name:<26} {load_recipe(str(path)).description}")


register_trt_commands(cli)  # lint, build, verify (trt_commands.py)


cli.add_command(report_command)
cli.add_command(tune_command)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and a non-zero exit, never a traceback."""
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        code = cli.main(args=argv, prog_name="tc-export", standalone_mode=False)
    except TCExportError as error:
        click.echo(f"tc-export: error: {error}", err=True)
        sys.exit(error.exit_code)
    except click.exceptions.NoArgsIsHelpError as error:  # bare ``tc-export``: the help, not an error
        click.echo(error.ctx.get_help() if error.ctx else "tc-export --help")
        sys.exit(0)
    except click.UsageError as error:  # unknown flag, wrong type, missing argument: one line, not click's three
        hint = "" if "--help" in error.format_message() else " (see tc-export --help)"
        click.echo(f"tc-export: error: {error.format_message()}{hint}", err=True)
        sys.exit(error.exit_code)
    except click.ClickException as error:
        click.echo(f"tc-export: error: {error.format_message()}", err=True)
        sys.exit(error.exit_code)
    except click.exceptions.Abort:
        click.echo("tc-export: aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("tc-export: interrupted", err=True)
        sys.exit(130)
    except OSError as error:  # the file system said no (disk full, permissions, a path that vanished)
        click.echo(f"tc-export: error: {error}", err=True)
        sys.exit(2)
    except Exception as error:  # noqa: BLE001 - a bug: one line, the traceback on request
        if os.environ.get("TC_EXPORT_TRACEBACK"):
            raise
        text = str(error).strip().splitlines()
        click.echo(f"tc-export: internal error (a bug in tc-export, not your input): {type(error).__name__}: "
                   f"{text[0][:300] if text else ''}; rerun with TC_EXPORT_TRACEBACK=1 for the traceback", err=True)
        sys.exit(InternalError.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
