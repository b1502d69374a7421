"""The main job: load -> compress -> export ONNX -> parity (Polygraphy) -> fidelity -> engine."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from .compress import CompressedModel, compress
from ..errors import ConfigError, ParityError
from ..export.tensorrt.engine import EngineConfig, build_engine
from ..export.checks.fidelity import NOT_COMPARABLE, Fidelity, measure_fidelity
from ..export.files import check_output_path, external_data_files
from ..export.macs import count_macs
from ..export.onnx_export import ExportConfig, write_onnx
from ..export.precision import NOT_RUNNABLE, check_runs_in_dtype, in_dtype, torch_dtype
from ..export.checks.parity import ParityConfig, ParityReport, check_parity, pin_mmap_threshold
from ..models import LoadedModel, ModelOptions, load_model
from ..models.registry import random_weights_message


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
    features: int | None = None  # vision-tower mode: end at this block's output tokens (-2: LLaVA's layer)
    emit_positions: bool = False  # add outputs: each output token's position and size
    unit: int | None = None  # merge units of unit x unit patches (docs/merge-units.md)
    # --- TensorRT (export/engine.py, export/bundle.py): engine settings; bundle: output is a parity-bundle DIR ---
    engine: EngineConfig | None = None
    bundle: bool = False
    # --- end TensorRT ---


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
    loaded: LoadedModel, methods: Sequence[object], example: dict, recipe: str | None, features: int | None = None,
    emit_positions: bool = False, unit: int | None = None,
) -> CompressedModel:
    """``compress``, with a recipe's errors (a layer out of range, a budget too large) naming the recipe."""
    try:
        return compress(loaded, list(methods), example, features=features, emit_positions=emit_positions, unit=unit)
    except ConfigError as error:
        if recipe is None:
            raise
        raise ConfigError(f"recipe {recipe}: {error}") from None


def load_for_job(config: JobConfig) -> LoadedModel:
    """The job's model, after checking (from its parameter count, before loading) that the export fits here."""
    from ..models.footprint import check_fits

    check_fits(config.model, config.model_options, config.export.dtype)
    return load_model(config.model, config.model_options, warn_random=False)


def run_job(config: JobConfig, say: Callable[[str], None] = print, loaded: LoadedModel | None = None) -> JobResult:
    """Run the pipeline, reporting each step through ``say``. Raises ``ParityError`` on a parity failure."""
    dtype = config.export.dtype
    if dtype in NOT_RUNNABLE and (config.bundle or Path(config.output).suffix in (".engine", ".plan")):
        raise ConfigError(f"--dtype {dtype} cannot go into a bundle or an engine here: {NOT_RUNNABLE[dtype]}, so "
                          "there are no reference outputs and no parity; bundle or build the fp32 file (--precision "
                          f"{dtype} builds a {dtype} engine from it)")
    # --- TensorRT parity bundle (export/tensorrt/bundle.py): the job into a staging dir, then the bundle sink ---
    if config.bundle:
        return _run_into_bundle(config, say, loaded)
    # --- end TensorRT ---
    output = check_output_path(config.output)
    wants_engine = output.suffix in (".engine", ".plan")
    onnx_path = output.with_suffix(".onnx") if wants_engine else output
    loaded = loaded or load_for_job(config)
    if loaded.random_init:
        say(f"warning: {random_weights_message(loaded)}")

    batch = config.export.batch
    example = loaded.example_inputs(batch=max(batch, 2) if config.export.dynamic_batch else batch)
    wants_compression = (bool(config.methods) or config.features is not None or config.emit_positions
                         or config.unit is not None)
    compressed = (compress_for_job(loaded, config.methods, example, config.recipe, config.features,
                                   config.emit_positions, config.unit)
                  if wants_compression else None)
    module = compressed.module if compressed else loaded.module
    output_names = loaded.output_names
    if compressed:
        _say_structure(compressed, say)
        if compressed.report.output_is_tokens:
            output_names = ["tokens", *compressed.report.extra_outputs]
        output_names = emitted_output_names(output_names, compressed.report.emitted_after)

    def inputs_for(batch: int, seed: int = 0) -> dict:
        """The model's inputs, plus those a method added (e.g. LLaMA-VID's text queries)."""
        extra = compressed.extra_inputs(batch, seed) if compressed else {}
        return loaded.example_inputs(batch=batch, seed=seed) | extra

    example = inputs_for(example[next(iter(example))].shape[0])
    one = inputs_for(1)
    macs_original = count_macs(loaded.module, loaded.example_inputs(batch=1))
    macs_compressed = count_macs(module, one) if compressed else macs_original
    say(f"MACs per image: {macs_original / 1e9:.2f} G -> {macs_compressed / 1e9:.2f} G "
        f"({macs_original / max(macs_compressed, 1):.2f}x fewer)")

    fidelity = None
    wants_fidelity = compressed and config.fidelity_samples and not compressed.report.output_is_tokens
    if compressed and config.fidelity_samples and compressed.report.output_is_tokens:
        say(f"fidelity not shown: {NOT_COMPARABLE}")
    fp32_module = None  # a file no runtime here runs (bf16) is compared with its fp32 model instead
    if config.export.dtype != "fp32":
        if wants_fidelity:  # before the cast, which casts the original too (it shares the weights)
            fidelity = _fidelity(config, loaded, compressed, say)
        if config.export.dtype in NOT_RUNNABLE:
            fp32_module = copy.deepcopy(module)
        module = in_dtype(module, torch_dtype(config.export.dtype))
        check_runs_in_dtype(module, one, config.export.dtype, config.model)
        say(f"weights and compute in {config.export.dtype} (inputs and outputs fp32; token ops score in fp32)")

    start = time.perf_counter()
    onnx_names = {name: name for name in example} | {spec.name: spec.export_name for spec in loaded.inputs}
    # write_onnx, not export_onnx: the returned model would hold a copy of every weight through parity
    nodes = write_onnx(
        module, example, onnx_path, config.export,
        input_names=[onnx_names[name] for name in example], output_names=output_names,
        metadata=_metadata(config, loaded, compressed),
    )
    seconds = time.perf_counter() - start
    data = external_data_files(onnx_path)
    say(f"exported {onnx_path} (opset {config.export.opset}, {nodes} nodes, "
        f"batch {'dynamic' if config.export.dynamic_batch else batch}, {config.export.dtype}"
        + "".join(f", weights in {path.name}" for path in data) + f") in {seconds:.1f} s")

    pin_mmap_threshold()  # from here on, memory freed by ONNX Runtime and the fidelity runs is returned
    if fp32_module is not None:
        return _unrunnable_job(config, loaded, compressed, module, fp32_module, onnx_path, inputs_for, output_names,
                               macs_original, macs_compressed, fidelity, seconds, wants_fidelity, say)
    parity = check_parity(
        module, onnx_path, lambda seed: inputs_for(batch, seed), onnx_names, output_names, config.parity,
    )
    say(f"parity PyTorch vs ONNX Runtime ({config.parity.samples} seeded inputs, atol {config.parity.atol:g}, "
        f"rtol {config.parity.rtol:g}): {parity.describe()}")

    if wants_fidelity and fidelity is None:
        fidelity = _fidelity(config, loaded, compressed, say)
    result = JobResult(onnx_path, compressed, macs_original, macs_compressed, parity, fidelity, seconds)
    if not parity:
        raise ParityError(parity.failure_message(config.parity.atol, config.parity.rtol), kept=onnx_path)
    if wants_engine:
        # --- TensorRT engine (export/tensorrt/engine.py): lint, build with the preset/flags, sidecar; int8 calibrates
        # on the model's seeded example inputs ---
        engine_config = config.engine or EngineConfig(precision="fp16" if config.fp16 else "fp32")
        calibration = lambda: [  # noqa: E731
            {onnx_names[k]: v.numpy() for k, v in loaded.example_inputs(batch=batch, seed=seed).items()}
            for seed in range(config.parity.seed + 2000, config.parity.seed + 2016)
        ]
        built = build_engine(onnx_path, output, engine_config, calibration=calibration, say=say)
        result.engine_path = output
        say(f"built TensorRT engine {output} ({engine_config.precision}, TensorRT {built.trt_version}); "
            f"sidecar {built.sidecar_path}")
        # --- end TensorRT ---
    return result


def _unrunnable_job(config: JobConfig, loaded: LoadedModel, compressed: CompressedModel | None, module, fp32_module,
                    onnx_path: Path, inputs_for, output_names, macs_original: int, macs_compressed: int, fidelity,
                    seconds: float, wants_fidelity: bool, say: Callable[[str], None]) -> JobResult:
    """The rest of the job for a file no runtime here runs (bf16): what can be checked (checks/unrunnable.py) in
    place of parity; no engine is built from it here."""
    from ..export.checks.unrunnable import check_unrunnable

    dtype = config.export.dtype
    trt_version = config.engine.trt_version if config.engine is not None else "10.3"
    try:
        report = check_unrunnable(fp32_module, module, onnx_path, lambda seed: inputs_for(config.export.batch, seed),
                                  output_names, dtype, NOT_RUNNABLE[dtype], config.parity.seed,
                                  config.parity.samples, config.parity.atol, config.parity.rtol, trt_version)
    except ConfigError:  # an invalid file (checker, lint) is not left behind
        for path in [*external_data_files(onnx_path), onnx_path]:
            path.unlink(missing_ok=True)
        raise
    for line in report.lines():
        say(line)
    if wants_fidelity and fidelity is None:
        fidelity = _fidelity(config, loaded, compressed, say)
    parity = ParityReport("PyTorch fp32", f"PyTorch {dtype}", passed=True)
    return JobResult(onnx_path, compressed, macs_original, macs_compressed, parity, fidelity, seconds)


def _run_into_bundle(config: JobConfig, say: Callable[[str], None], loaded: LoadedModel | None) -> JobResult:
    """The job with its ONNX written into a staging directory, then the bundle sink over its result (lint, reference
    I/O, manifest and script); the directory is renamed to DIR only when all of it succeeded."""
    from ..export.tensorrt.bundle import MODEL, SCRIPT, bundle_sink, check_bundle_job, staging_dir
    from ..export.tensorrt.engine import get_target

    final, engine = check_bundle_job(config)
    loaded = loaded or load_for_job(config)
    with staging_dir(final) as staging:
        def say_final(text: str) -> None:  # the user sees where the file will be, not the staging name
            say(text.replace(str(staging), str(final)))

        try:
            result = run_job(replace(config, output=staging / MODEL, bundle=False), say=say_final, loaded=loaded)
        except ParityError as error:  # the staging directory goes: the ONNX is not kept, whatever run_job says
            raise ParityError(f"{error.failure}; no bundle written to {final}/") from None
        bundle_sink(staging, config, loaded, result, engine, say=say)
    result.onnx_path = final / MODEL
    say(f"wrote parity bundle {final}/ for {engine.target} ({get_target(engine.target).engine_path}): "
        f"run ./{SCRIPT} on the device")
    return result


def emitted_output_names(names: Sequence[str], emitted_after: int | None) -> list[str]:
    """The output names with ``positions`` and ``sizes`` after the model's ``emitted_after`` own outputs."""
    if emitted_after is None:
        return list(names)
    own = [*names[:emitted_after], *(f"output_{i}" for i in range(len(names), emitted_after))]
    return [*own, "positions", "sizes"]


def _fidelity(config: JobConfig, loaded: LoadedModel, compressed: CompressedModel,
              say: Callable[[str], None]) -> Fidelity:
    inputs = loaded.example_inputs(batch=config.fidelity_samples, seed=config.parity.seed + 1000)
    fidelity = measure_fidelity(loaded.module, compressed.module, inputs, classes=loaded.output_names[0] == "logits")
    say(f"fidelity vs uncompressed: {fidelity.describe()}")
    return fidelity


def _say_structure(compressed: CompressedModel, say: Callable[[str], None]) -> None:
    report = compressed.report
    say(f"protected tokens: {report.protected} ({report.protected_source})"
        + (f", {report.suffix} trailing ({report.suffix_source})" if report.suffix else "")
        + (f"; patch grid {'x'.join(map(str, report.grid))}" if report.grid else ""))
    if report.positions is not None:
        say(f"positions carried: {report.positions} coordinate(s) per token"
            + (f"; rewired {', '.join(report.rewired)}" if report.rewired else ""))
    if report.unit is not None:
        say(next(note for note in report.notes if note.startswith("merge units")))
    for note in report.skipped:
        say(f"left uncompressed: attention {note}")
    say("tokens per layer: " + " ".join(str(n) for n in compressed.token_counts()))


def _metadata(config: JobConfig, loaded: LoadedModel, compressed: CompressedModel | None) -> dict[str, str]:
    from ..passes import config_to_dict

    meta = {"tc_export.model": loaded.name,
            "tc_export.methods": json.dumps([config_to_dict(m) for m in config.methods])}
    if compressed:
        meta["tc_export.tokens_per_layer"] = ",".join(str(n) for n in compressed.token_counts())
        if compressed.report.unit is not None:
            meta["tc_export.unit"] = str(compressed.report.unit)
        if compressed.report.emitted_positions():
            meta["tc_export.positions"] = json.dumps(compressed.report.emitted_positions())
    return meta


def methods_label(methods: Sequence[object]) -> str:
    return ", ".join(repr(m) for m in methods) if methods else "uncompressed"
