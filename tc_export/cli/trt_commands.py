"""TensorRT subcommands (``lint``, ``build``, ``verify``) and the engine flags of the export command."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from ..errors import ConfigError, ParityError

F = TypeVar("F", bound=Callable[..., Any])
TARGET_NAMES = ("jetson-orin-nano", "jetson-agx-orin", "datacenter")


@dataclass(frozen=True)
class EngineFlags:
    """The engine flags as given (None: not given)."""

    target: str | None = None
    precision: str | None = None
    workspace: str | None = None
    opt_level: int | None = None
    plugins: str | None = None
    batch_profile: str | None = None

    def given(self) -> list[str]:
        names = {"--target": self.target, "--precision": self.precision, "--workspace": self.workspace,
                 "--opt-level": self.opt_level, "--plugins": self.plugins, "--batch-profile": self.batch_profile}
        return [flag for flag, value in names.items() if value is not None]

    def config(self, fp16: bool = False):
        from ..export.tensorrt.engine import EngineConfig, parse_batch_profile, parse_size

        precision = self.precision
        if fp16:
            if precision not in (None, "fp16"):
                raise ConfigError(f"--fp16 and --precision {precision} disagree: drop --fp16")
            precision = "fp16"
        return EngineConfig.for_target(
            self.target,
            precision=precision,
            workspace=parse_size(self.workspace) if self.workspace is not None else None,
            opt_level=self.opt_level,
            batch_profile=parse_batch_profile(self.batch_profile) if self.batch_profile is not None else None,
            plugins=None if self.plugins is None else self.plugins == "on",
        )


def engine_options(function: F) -> F:
    """Add the engine flags to a click command; the command receives them as one ``engine_flags: EngineFlags``."""
    options = [
        click.option("--target", type=click.Choice(TARGET_NAMES), default=None,
                     help="Device preset: compute capability, precision, workspace, TensorRT version, plugins."),
        click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16", "int8"]), default=None,
                     help="Engine precision (default: the target's, else fp32). int8 calibrates on example inputs."),
        click.option("--workspace", default=None, help="Builder workspace limit, e.g. 1G or 512M."),
        click.option("--opt-level", type=int, default=None, help="Builder optimisation level 0-5 (default 3)."),
        click.option("--plugins", type=click.Choice(["on", "off"]), default=None,
                     help="on: tc_export AOT plugins (TensorRT >= 10.9); off: the ONNX function bodies."),
        click.option("--batch-profile", default=None, help="MIN,OPT,MAX batch for a --dynamic-batch ONNX."),
    ]

    def wrapped(**kwargs: Any) -> Any:
        names = list(EngineFlags.__dataclass_fields__)
        flags = EngineFlags(**{name: kwargs.pop(name) for name in names})
        return function(engine_flags=flags, **kwargs)

    wrapped.__name__ = function.__name__
    wrapped.__doc__ = function.__doc__
    wrapped.__click_params__ = list(getattr(function, "__click_params__", []))
    for option in reversed(options):
        wrapped = option(wrapped)
    return wrapped  # type: ignore[return-value]


def export_target(output: str | os.PathLike, flags: EngineFlags, fp16: bool):
    """``-o`` and the engine flags -> (output path, EngineConfig or None, whether it is a bundle directory)."""
    from ..export.tensorrt.bundle import is_bundle_output

    bundle = is_bundle_output(output)
    path = Path(output)
    wants_engine = bundle or path.suffix in (".engine", ".plan")
    if not wants_engine:
        if flags.given():
            raise ConfigError(f"{flags.given()[0]} applies to a TensorRT engine or a parity bundle: use "
                              "-o model.engine or -o DIR/")
        return path, None, False
    config = flags.config(fp16)
    if bundle and config.target is None:
        raise ConfigError("a parity bundle (-o DIR/) is built for a device: add --target "
                          f"{'|'.join(TARGET_NAMES)}")
    return path, config, bundle


@click.command("lint")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--trt-version", default=None, help="TensorRT version to check against (default 10.3, or the target's).")
@click.option("--target", type=click.Choice(TARGET_NAMES), default=None, help="Use the target's TensorRT version.")
@click.option("--static", is_flag=True, help="Also reject a dynamic batch dimension.")
def lint_command(model: Path, trt_version: str | None, target: str | None, static: bool) -> int:
    """Check MODEL (ONNX) against TensorRT's ONNX parser support; exit 1 on an error."""
    from ..export.tensorrt.engine import get_target
    from ..export.tensorrt.lint import lint_model

    version = trt_version or (get_target(target).tensorrt if target else "10.3")
    report = lint_model(model, version, allow_dynamic_batch=not static)
    for problem in report.problems:
        click.echo(problem.describe())
    click.echo(f"{model}: {report.summary()}")
    return 0 if report.ok else 1


@click.command("build")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="model.engine (default: beside MODEL).")
@engine_options
def build_command(model: Path, output: Path | None, engine_flags: EngineFlags) -> None:
    """Lint MODEL (ONNX) and build a TensorRT engine from it, with a JSON sidecar (needs TensorRT and a GPU)."""
    from ..export.tensorrt.engine import build_engine
    from ..export.files import check_output_path

    if not model.is_file():
        raise ConfigError(f"cannot build from {model}: no such file")
    if model.suffix != ".onnx":
        raise ConfigError(f"tc-export build takes an ONNX file, got {model}")
    output = output or model.with_suffix(".engine")
    if output.suffix not in (".engine", ".plan"):
        raise ConfigError(f"-o must name a .engine (or .plan) file, got {output}")
    check_output_path(output)
    config = engine_flags.config()
    result = build_engine(model, output, config, say=click.echo)
    click.echo(f"built TensorRT engine {output} ({config.precision}, TensorRT {result.trt_version}); "
               f"sidecar {result.sidecar_path}")


@click.command("verify")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--against", "against", type=click.Path(path_type=Path), required=True,
              help="A parity bundle directory (tc-export ... --target T -o DIR/).")
@click.option("--atol", type=float, default=None, help="Override the manifest's absolute tolerance.")
@click.option("--rtol", type=float, default=None, help="Override the manifest's relative tolerance.")
def verify_command(model: Path, against: Path, atol: float | None, rtol: float | None) -> None:
    """Run MODEL (.onnx here, .engine on the device) on a bundle's inputs and compare with its outputs."""
    from ..export.checks.verify import verify

    report = verify(model, against, atol, rtol)
    for line in report.lines():
        click.echo(line)
    if not report:
        failed = [o.name for o in report.outputs if not o.passed] or ["(no outputs)"]
        pinned = f"; {report.failure()}" if report.failure() else ""
        raise ParityError(f"verify failed: {model} ({report.runtime}) differs from {against}'s reference outputs "
                          f"in {', '.join(failed)} (atol {report.atol:g}, rtol {report.rtol:g}){pinned}")
    how = (" by pinned parity (with the candidate's decisions pinned; the flips it took are listed above)"
           if report.by_pinning else " (as it is; decisions pinned above for the flips)" if report.pinned else "")
    click.echo(f"verify passed{how}: {model} ({report.runtime}) matches {against} (atol {report.atol:g}, "
               f"rtol {report.rtol:g})")


def register_trt_commands(group: click.Group) -> None:
    for command in (lint_command, build_command, verify_command):
        group.add_command(command)
