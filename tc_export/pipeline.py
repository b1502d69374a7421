"""The main job: load -> compress -> export ONNX -> parity (Polygraphy) -> fidelity -> engine."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .compress import CompressedModel, compress
from .errors import ConfigError, ParityError
from .export.engine import build_engine
from .export.fidelity import Fidelity, measure_fidelity
from .export.files import check_output_path
from .export.macs import count_macs
from .export.onnx_export import ExportConfig, export_onnx
from .export.parity import ParityConfig, ParityReport, check_parity
from .models import LoadedModel, ModelOptions, load_model


@dataclass(frozen=True)
class JobConfig:
    """Everything one ``tc-export MODEL ...`` run does. CLI flags only fill this in."""

    model: str
    output: Path
    methods: tuple[object, ...] = ()
    recipe: str | None = None  # where the methods came from, named in their errors
    model_options: ModelOptions = field(default_factory=ModelOptions)
    export: ExportConfig = field(default_factory=ExportConfig)
    parity: ParityConfig = field(default_factory=ParityConfig)
    fp16: bool = False
    fidelity_samples: int = 8


@dataclass
class JobResult:
    onnx_path: Path
    compressed: CompressedModel | None
    macs_original: int
    macs_compressed: int
    parity: ParityReport
    fidelity: Fidelity | None
    export_seconds: float
    engine_path: Path | None = None

    @property
    def mac_ratio(self) -> float:
        return self.macs_original / max(self.macs_compressed, 1)


def compress_for_job(
    loaded: LoadedModel, methods: Sequence[object], example: dict, recipe: str | None
) -> CompressedModel:
    """``compress``, with a recipe's errors (a layer out of range, a budget too large) naming the recipe."""
    try:
        return compress(loaded, list(methods), example)
    except ConfigError as error:
        if recipe is None:
            raise
        raise ConfigError(f"recipe {recipe}: {error}") from None


def run_job(config: JobConfig, say: Callable[[str], None] = print, loaded: LoadedModel | None = None) -> JobResult:
    """Run the pipeline, reporting each step through ``say``. Raises ``ParityError`` on a parity failure."""
    output = check_output_path(config.output)
    wants_engine = output.suffix in (".engine", ".plan")
    onnx_path = output.with_suffix(".onnx") if wants_engine else output
    loaded = loaded or load_model(config.model, config.model_options, warn_random=False)
    if loaded.random_init:
        say(f"warning: {loaded.name} has random weights (no --weights or --pretrained): outputs are meaningless, parity and speed are still real")

    batch = config.export.batch
    example = loaded.example_inputs(batch=max(batch, 2) if config.export.dynamic_batch else batch)
    compressed = compress_for_job(loaded, config.methods, example, config.recipe) if config.methods else None
    module = compressed.module if compressed else loaded.module
    if compressed:
        say("tokens per layer: " + " ".join(str(n) for n in compressed.token_counts()))

    one = loaded.example_inputs(batch=1)
    macs_original = count_macs(loaded.module, one)
    macs_compressed = count_macs(module, one) if compressed else macs_original
    say(f"MACs per image: {macs_original / 1e9:.2f} G -> {macs_compressed / 1e9:.2f} G "
        f"({macs_original / max(macs_compressed, 1):.2f}x fewer)")

    start = time.perf_counter()
    onnx_names = {spec.name: spec.export_name for spec in loaded.inputs}
    model = export_onnx(
        module, example, onnx_path, config.export,
        input_names=[onnx_names[name] for name in example], output_names=loaded.output_names,
        metadata=_metadata(config, loaded, compressed),
    )
    seconds = time.perf_counter() - start
    say(f"exported {onnx_path} (opset {config.export.opset}, {len(model.graph.node)} nodes, "
        f"batch {'dynamic' if config.export.dynamic_batch else batch}) in {seconds:.1f} s")

    parity = check_parity(
        module, onnx_path, lambda seed: loaded.example_inputs(batch=batch, seed=seed), onnx_names,
        loaded.output_names, config.parity,
    )
    say(f"parity PyTorch vs ONNX Runtime ({config.parity.samples} seeded inputs, atol {config.parity.atol:g}, "
        f"rtol {config.parity.rtol:g}): {parity.describe()}")

    fidelity = None
    if compressed and config.fidelity_samples:
        inputs = loaded.example_inputs(batch=config.fidelity_samples, seed=config.parity.seed + 1000)
        fidelity = measure_fidelity(loaded.module, compressed.module, inputs, classes=loaded.output_names[0] == "logits")
        say(f"fidelity vs uncompressed: {fidelity.describe()}")
    result = JobResult(onnx_path, compressed, macs_original, macs_compressed, parity, fidelity, seconds)
    if not parity:
        worst = parity.failures()[0] if parity.failures() else parity.outputs[0]
        raise ParityError(
            f"parity failed: output {worst.name!r} differs by max abs {worst.max_abs:.3e}, max rel "
            f"{worst.max_rel:.3e} (atol {config.parity.atol:g}, rtol {config.parity.rtol:g}); ONNX kept at {onnx_path}"
        )
    if wants_engine:
        build_engine(onnx_path, output, fp16=config.fp16)
        result.engine_path = output
        say(f"built TensorRT engine {output}")
    return result


def _metadata(config: JobConfig, loaded: LoadedModel, compressed: CompressedModel | None) -> dict[str, str]:
    meta = {"tc_export.model": loaded.name, "tc_export.methods": repr(list(config.methods))}
    if compressed:
        meta["tc_export.tokens_per_layer"] = ",".join(str(n) for n in compressed.token_counts())
    return meta


def methods_label(methods: Sequence[object]) -> str:
    return ", ".join(repr(m) for m in methods) if methods else "uncompressed"
