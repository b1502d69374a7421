"""``tc-export MODEL --method tome --r 16 -o model.onnx`` and the ``list`` and ``bench`` subcommands."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import click

from ..errors import TCExportError
from .options import MethodFlags, method_configs, method_options


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
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="model.onnx or model.engine.")
@click.option("--weights", type=click.Path(path_type=Path), default=None, help="safetensors or PyTorch state dict.")
@click.option("--pretrained", is_flag=True, help="Library's pretrained weights (from its local cache).")
@click.option("--img-size", type=int, default=None, help="Input resolution, e.g. 384.")
@click.option("--batch", type=int, default=1, show_default=True, help="Static batch size.")
@click.option("--dynamic-batch", is_flag=True, help="Leave the batch dimension symbolic.")
@click.option("--opset", type=int, default=18, show_default=True)
@click.option("--atol", type=float, default=1e-4, show_default=True, help="Parity: absolute tolerance.")
@click.option("--rtol", type=float, default=1e-3, show_default=True, help="Parity: relative tolerance.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the parity inputs.")
@click.option("--fp16", is_flag=True, help="TensorRT engine: allow FP16 kernels.")
def export_command(model: str, flags: MethodFlags, output: Path | None, weights: Path | None, pretrained: bool,
                   img_size: int | None, batch: int,
                   dynamic_batch: bool, opset: int, atol: float, rtol: float, seed: int, fp16: bool) -> None:
    """Compress MODEL, export it to ONNX (and TensorRT), and check parity."""
    from ..export.onnx_export import ExportConfig
    from ..export.parity import ParityConfig
    from ..models import ModelOptions
    from ..pipeline import JobConfig, run_job
    methods, _ = method_configs(flags)
    if output is None:
        suffix = flags.method or (flags.recipe and Path(flags.recipe).stem)
        output = Path(f"{model.replace(':', '_').replace('/', '_')}{'-' + suffix if suffix else ''}.onnx")
    config = JobConfig(
        model=model,
        output=output,
        methods=methods,
        recipe=flags.recipe,
        model_options=ModelOptions(img_size=img_size, weights=weights, pretrained=pretrained),
        export=ExportConfig(opset=opset, batch=batch, dynamic_batch=dynamic_batch),
        parity=ParityConfig(atol=atol, rtol=rtol, seed=seed),
        fp16=fp16,
    )
    run_job(config, say=click.echo)


@cli.command("bench")
@click.argument("model")
@method_options
@click.option("--img-size", type=int, default=None)
@click.option("--batch", "batches", type=int, multiple=True, default=(1, 8), show_default=True)
@click.option("--runs", type=int, default=30, show_default=True)
@click.option("--warmup", type=int, default=5, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--profile", is_flag=True, help="Also print where the time goes, by ONNX op type.")
@click.option("--markdown", type=click.Path(path_type=Path), default=None, help="Write the table to this file.")
def bench_command(model: str, flags: MethodFlags, img_size: int | None,
                  batches: tuple[int, ...], runs: int, warmup: int, threads: int, profile: bool,
                  markdown: Path | None) -> None:
    """Time uncompressed vs compressed ONNX side by side in ONNX Runtime (CPU). Default: --method tome --r 16."""
    from ..bench import BenchConfig, format_table
    from ..bench_job import bench_model
    from ..models import ModelOptions

    methods, label = method_configs(flags, default_method="tome")
    config = BenchConfig(batches=tuple(batches), runs=runs, warmup=warmup, threads=threads)
    rows = bench_model(model, methods, ModelOptions(img_size=img_size), config, say=click.echo, profile=profile,
                       recipe=flags.recipe)
    table = format_table(model, label, rows, threads)
    click.echo(table)
    if markdown is not None:
        markdown.write_text(table + "\n")


@cli.command("list")
def list_command() -> None:
    """Show the models and methods."""
    from ..models import hf_models, timm_models  # noqa: F401 - registers their entries
    from ..models.registry import MODELS, PREFIXES, load_model  # noqa: F401
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
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except click.exceptions.Abort:
        click.echo("tc-export: aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("tc-export: interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
