"""TensorRT engines: target presets, build settings, the Polygraphy build and its JSON sidecar.

TensorRT and Polygraphy's TensorRT loaders are imported lazily: where TensorRT (or a GPU) is missing, the ONNX
is kept and the user is told the exact command that finishes the build on the target. Everything that does not
need TensorRT (configs, presets, profiles, the sidecar, the command line, which layers stay fp32) is plain
Python and tested here; ``_build`` and ``keep_fp32_layers`` on a real network are the untested part.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ...errors import BackendUnavailableError, ConfigError
from ..files import atomic_output, created_timestamp, external_data_files, read_onnx

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
FUNCTION_DOMAIN = "tc_export"
GIB = 1 << 30


@dataclass(frozen=True)
class TargetPreset:
    """A deployment target: the GPU it has, the TensorRT it ships, and the build settings that suit it."""

    name: str
    description: str
    compute_capability: str
    precision: str
    workspace: int  # bytes
    tensorrt: str  # the TensorRT version the target is expected to have
    plugins: bool  # AOT Python plugins (TensorRT >= 10.9); off: the ONNX local-function bodies are built
    batch_profile: tuple[int, int, int]  # min/opt/max batch for a dynamic-batch ONNX
    memory_gb: int

    @property
    def engine_path(self) -> str:
        return "plugins (AOT Triton kernels)" if self.plugins else "function bodies (plain TensorRT layers)"


TARGETS: dict[str, TargetPreset] = {
    preset.name: preset
    for preset in (
        TargetPreset("jetson-orin-nano", "Jetson Orin Nano 8 GB, JetPack 6.2 (L4T 36.4): TensorRT 10.3, CUDA 12.6",
                     "8.7", "fp16", 1 * GIB, "10.3", False, (1, 1, 4), 8),
        TargetPreset("jetson-agx-orin", "Jetson AGX Orin 32/64 GB, JetPack 6.2 (L4T 36.4): TensorRT 10.3, CUDA 12.6",
                     "8.7", "fp16", 4 * GIB, "10.3", False, (1, 4, 16), 32),
        TargetPreset("datacenter", "Hopper datacenter GPU (H100, 80 GB): TensorRT >= 10.9 with AOT plugins",
                     "9.0", "fp16", 8 * GIB, "10.9", True, (1, 8, 64), 80),
    )
}
AOT_PLUGINS_SINCE = (10, 9)


def get_target(name: str) -> TargetPreset:
    if name not in TARGETS:
        raise ConfigError(f"unknown --target {name!r}: choose one of {', '.join(TARGETS)}")
    return TARGETS[name]


@dataclass(frozen=True)
class EngineConfig:
    """How to build one engine. ``for_target`` fills the settings a user did not give from a preset."""

    precision: str = "fp32"
    workspace: int | None = None  # bytes; None: TensorRT's default (the device's memory)
    opt_level: int = 3  # builder optimisation level, 0..5 (TensorRT's default is 3)
    batch_profile: tuple[int, int, int] | None = None  # min/opt/max batch; only for a dynamic-batch ONNX
    plugins: bool = False
    target: str | None = None
    trt_version: str = "10.3"  # the TensorRT the engine is meant for (lint rules, plugin availability)
    compute_capability: str | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.workspace is not None and self.workspace <= 0:
            raise ConfigError(f"--workspace must be a positive size (e.g. 1G, 512M), got {self.workspace}")
        if not 0 <= self.opt_level <= 5:
            raise ConfigError(f"--opt-level must be between 0 and 5 (TensorRT's builder levels), got {self.opt_level}")
        if self.batch_profile is not None:
            low, opt, high = self.batch_profile
            if not 1 <= low <= opt <= high:
                raise ConfigError(f"batch profile must satisfy 1 <= min <= opt <= max, got {low}/{opt}/{high}")
        if self.target is not None:
            get_target(self.target)
        from .lint import parse_version

        if self.plugins and parse_version(self.trt_version) < AOT_PLUGINS_SINCE:
            where = f"--target {self.target} ships TensorRT {self.trt_version}" if self.target else \
                f"TensorRT {self.trt_version}"
            raise ConfigError(f"{where}, which has no AOT Python plugins (TensorRT >= 10.9): use --plugins off "
                              "(the ONNX function bodies are built instead)")

    @classmethod
    def for_target(cls, target: str | None = None, *, precision: str | None = None, workspace: int | None = None,
                   opt_level: int | None = None, batch_profile: tuple[int, int, int] | None = None,
                   plugins: bool | None = None) -> EngineConfig:
        """The preset's settings, overridden by whatever was given (None: not given)."""
        if target is None:
            return cls(precision=precision or "fp32", workspace=workspace,
                       opt_level=3 if opt_level is None else opt_level, batch_profile=batch_profile,
                       plugins=bool(plugins), trt_version="10.9" if plugins else "10.3")
        preset = get_target(target)
        return cls(
            precision=precision or preset.precision,
            workspace=workspace if workspace is not None else preset.workspace,
            opt_level=3 if opt_level is None else opt_level,
            batch_profile=batch_profile,
            plugins=preset.plugins if plugins is None else plugins,
            target=preset.name,
            trt_version=preset.tensorrt,
            compute_capability=preset.compute_capability,
        )

    def profile_for(self, dynamic: bool) -> tuple[int, int, int] | None:
        """The batch profile to build: the given one, the preset's, or (1, 1, 8); None for a static ONNX."""
        if not dynamic:
            return None
        if self.batch_profile is not None:
            return self.batch_profile
        return get_target(self.target).batch_profile if self.target else (1, 1, 8)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_size(text: str) -> int:
    """``1G`` / ``512M`` / ``65536`` / ``64K`` -> bytes (base 2, as trtexec and Polygraphy read them)."""
    units = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    value = str(text).strip().upper()
    suffix = value[-1] if value and value[-1] in "BKMG" else ""
    number = value[: len(value) - len(suffix)] if suffix else value
    try:
        size = int(float(number) * units[suffix])
    except ValueError:
        raise ConfigError(f"--workspace must be a size like 1G, 512M or 1048576, got {text!r}") from None
    if size <= 0:
        raise ConfigError(f"--workspace must be positive, got {text!r}")
    return size


def parse_batch_profile(text: str) -> tuple[int, int, int]:
    """``1,4,16`` -> (1, 4, 16)."""
    try:
        low, opt, high = (int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"--batch-profile must be MIN,OPT,MAX (e.g. 1,4,16), got {text!r}") from None
    return low, opt, high


@dataclass(frozen=True)
class OnnxInput:
    name: str
    shape: tuple[int | str, ...]  # str: a symbolic dimension


def onnx_inputs(onnx_path: Path) -> list[OnnxInput]:
    model = read_onnx(onnx_path, "build an engine from")
    initializers = {init.name for init in model.graph.initializer}
    return [
        OnnxInput(value.name, tuple(d.dim_param if d.HasField("dim_param") else d.dim_value
                                    for d in value.type.tensor_type.shape.dim))
        for value in model.graph.input if value.name not in initializers
    ]


def batch_shapes(inputs: Sequence[OnnxInput], profile: tuple[int, int, int] | None) -> dict[str, tuple]:
    """Per input, (min, opt, max) shapes of an optimisation profile; {} for a static ONNX."""
    dynamic = [i for i in inputs if any(isinstance(d, str) for d in i.shape)]
    if not dynamic:
        return {}
    if profile is None:
        raise ConfigError("the ONNX has a dynamic batch: give a batch profile (--batch-profile MIN,OPT,MAX)")
    shapes = {}
    for item in dynamic:
        if any(isinstance(d, str) for d in item.shape[1:]):
            raise ConfigError(f"input {item.name!r} has dynamic dimensions other than the batch {item.shape}: "
                              "export with static token counts")
        shapes[item.name] = tuple((batch, *item.shape[1:]) for batch in profile)
    return shapes


def finish_command(onnx_path: Path, engine_path: Path, fp16: bool = False, config: EngineConfig | None = None,
                   inputs: Sequence[OnnxInput] = ()) -> str:
    """The trtexec command that builds the engine on the target (trtexec ships with TensorRT, JetPack included).

    trtexec cannot pin the function bodies' layers to fp32 by name before parsing; the bundle's script uses
    ``polygraphy convert`` with a network postprocess for that and falls back to this command.
    """
    config = config or EngineConfig(precision="fp16" if fp16 else "fp32")
    parts = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}"]
    if config.precision == "int8":
        parts += ["--int8", "--fp16"]
    elif config.precision != "fp32":
        parts.append(f"--{config.precision}")
    if config.workspace is not None:
        parts.append(f"--memPoolSize=workspace:{max(config.workspace >> 20, 1)}M")
    if config.opt_level != 3:
        parts.append(f"--builderOptimizationLevel={config.opt_level}")
    shapes = batch_shapes(inputs, config.profile_for(any(isinstance(d, str) for i in inputs for d in i.shape)))
    for flag, position in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
        if shapes:
            spec = ",".join(f"{name}:{'x'.join(str(d) for d in dims[position])}" for name, dims in shapes.items())
            parts.append(f"{flag}={spec}")
    return " ".join(shlex.quote(p) for p in parts)


def tensorrt_missing_reason() -> str | None:
    """None when TensorRT is importable and a CUDA device answers; else why not."""
    try:
        import tensorrt as trt  # noqa: F401
    except Exception:  # noqa: BLE001 - the stub wheels raise on import in many ways
        return "TensorRT is not installed here"
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU is visible here"
    except Exception:  # noqa: BLE001
        return "no CUDA GPU is visible here"
    return None


def function_node_names(onnx_path: Path) -> tuple[set[str], set[str]]:
    """Names and op types of the ``tc_export`` function calls: how their layers are recognised after parsing."""
    model = read_onnx(onnx_path, "build an engine from")
    nodes = [n for n in model.graph.node if n.domain == FUNCTION_DOMAIN]
    return {n.name for n in nodes if n.name}, {n.op_type for n in nodes}


def is_function_layer(layer_name: str, metadata: str, node_names: set[str], op_types: set[str]) -> bool:
    """Whether a TensorRT layer comes from a ``tc_export`` function body.

    The parser names layers after ONNX nodes and (from 10.6) records the local-function call stack in the
    layer's metadata, so the calling node's name or the function's op type shows up in one of them.
    """
    text = f"{layer_name}\n{metadata}"
    return any(name and name in text for name in node_names) or any(op in text for op in op_types)


def keep_fp32_layers(network: Any, node_names: set[str], op_types: set[str], float_types: Sequence[Any],
                     fp32: Any) -> list[str]:
    """Pin the function-body layers (scoring, selection, merge) to fp32 and return their names.

    Needs ``precision_constraints="obey"`` in the builder config. Index outputs (TopK's, Gather's int) keep
    their type: only floating-point outputs are set to fp32.
    """
    pinned = []
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if not is_function_layer(layer.name, str(getattr(layer, "metadata", "") or ""), node_names, op_types):
            continue
        layer.precision = fp32
        for out in range(layer.num_outputs):
            if layer.get_output(out).dtype in float_types:
                layer.set_output_type(out, fp32)
        pinned.append(layer.name)
    return pinned


@dataclass
class EngineResult:
    engine_path: Path
    sidecar_path: Path
    trt_version: str
    compute_capability: str | None
    fp32_layers: int
    notes: list[str] = field(default_factory=list)


def sidecar_content(config: EngineConfig, onnx_path: Path, engine_path: Path, trt_version: str | None,
                    compute_capability: str | None, fp32_layers: int = 0,
                    batch_profile: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """What ``model.engine.json`` records: what the engine was built for, with what, from which ONNX."""
    preset = get_target(config.target) if config.target else None
    return {
        "engine": engine_path.name,
        "onnx": onnx_path.name,
        "onnx_sha256": _sha256(onnx_path),
        "external_data_sha256": {path.name: _sha256(path) for path in external_data_files(onnx_path)},
        "target": config.target,
        "target_description": preset.description if preset else None,
        "precision": config.precision,
        "tensorrt_version": trt_version,
        "tensorrt_expected": config.trt_version,
        "compute_capability": compute_capability,
        "compute_capability_expected": config.compute_capability,
        "engine_path": "plugins" if config.plugins else "function bodies",
        "options": {
            "workspace_bytes": config.workspace,
            "builder_optimization_level": config.opt_level,
            "batch_profile": list(batch_profile) if batch_profile else None,
            "plugins": config.plugins,
            "fp32_function_layers": fp32_layers,
            "precision_constraints": "obey" if config.precision != "fp32" else None,
        },
        "tc_export_version": package_version("tc-export"),
        "created": created_timestamp(),
    }


def sidecar_path(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + ".json")


def write_sidecar(path: Path, content: Mapping[str, Any]) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(content, indent=2) + "\n")


def build_engine(onnx_path: Path, engine_path: Path, config: EngineConfig | None = None, *, fp16: bool = False,
                 calibration: Callable[[], Sequence[Mapping[str, Any]]] | None = None,
                 say: Callable[[str], None] = print, lint: bool = True) -> EngineResult:
    """Lint, then build and save a TensorRT engine and its sidecar; ``BackendUnavailableError`` where impossible.

    ``calibration()`` returns int8 calibration feeds (the model's example inputs); without it Polygraphy's
    seeded random data loader is used.
    """
    config = config or EngineConfig(precision="fp16" if fp16 else "fp32")
    inputs = onnx_inputs(onnx_path)
    dynamic = any(isinstance(d, str) for i in inputs for d in i.shape)
    profile = config.profile_for(dynamic)
    batch_shapes(inputs, profile)  # a bad profile or a non-batch dynamic dim fails before anything else
    if lint:
        from .lint import require_lint_clean

        require_lint_clean(onnx_path, config.trt_version, say=say)
    reason = tensorrt_missing_reason()
    if reason is not None:
        raise BackendUnavailableError(
            f"{reason}; a TensorRT engine needs TensorRT and an NVIDIA GPU. The ONNX is written to {onnx_path}; "
            f"finish on the target with: {finish_command(onnx_path, engine_path, config=config, inputs=inputs)}"
        )
    return _build(onnx_path, engine_path, config, inputs, profile, calibration, say)  # pragma: no cover - GPU


def _build(onnx_path: Path, engine_path: Path, config: EngineConfig, inputs: Sequence[OnnxInput],
           profile: tuple[int, int, int] | None, calibration, say) -> EngineResult:  # pragma: no cover - GPU only
    import tensorrt as trt
    import torch
    from polygraphy.backend.trt import (Calibrator, CreateConfig, EngineFromNetwork, NetworkFromOnnxPath,
                                        PostprocessNetwork, Profile, SaveEngine)

    from .lint import parse_version

    notes = []
    if config.plugins:
        if parse_version(trt.__version__) < AOT_PLUGINS_SINCE:
            raise BackendUnavailableError(f"--plugins on needs TensorRT >= 10.9 for AOT plugins, this is "
                                          f"{trt.__version__}: use --plugins off")
        try:
            import importlib

            importlib.import_module("tc_export.export.tensorrt.plugins")  # registers the tc_export plugins
        except ImportError as error:
            raise BackendUnavailableError(f"--plugins on: the tc_export TensorRT plugins cannot be loaded ({error}); "
                                          "use --plugins off") from None
    major, minor = torch.cuda.get_device_capability()
    device_cc = f"{major}.{minor}"
    if config.compute_capability and device_cc != config.compute_capability:
        notes.append(f"built on compute capability {device_cc}, target {config.target} has "
                     f"{config.compute_capability}: an engine runs only on the GPU kind it was built on")
    node_names, op_types = function_node_names(onnx_path)
    pinned: list[str] = []
    network = NetworkFromOnnxPath(str(onnx_path))
    if config.precision != "fp32" and (node_names or op_types):
        def postprocess(network):
            pinned.extend(keep_fp32_layers(network, node_names, op_types,
                                           (trt.float32, trt.float16, trt.bfloat16), trt.float32))

        network = PostprocessNetwork(network, postprocess)
    profiles = None
    shapes = batch_shapes(inputs, profile)
    if shapes:
        built = Profile()
        for name, (low, opt, high) in shapes.items():
            built.add(name, min=low, opt=opt, max=high)
        profiles = [built]
    calibrator = None
    if config.precision == "int8":
        from polygraphy.comparator import DataLoader

        feeds = calibration() if calibration is not None else DataLoader(iterations=8, seed=0)
        calibrator = Calibrator(feeds)
    create = CreateConfig(
        fp16=config.precision in ("fp16", "int8"),
        bf16=config.precision == "bf16",
        int8=config.precision == "int8",
        calibrator=calibrator,
        profiles=profiles,
        precision_constraints="obey" if config.precision != "fp32" else None,
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: config.workspace} if config.workspace else None,
        builder_optimization_level=config.opt_level,
    )
    with atomic_output(engine_path) as tmp:
        SaveEngine(EngineFromNetwork(network, config=create), str(tmp))()
    sidecar = sidecar_path(engine_path)
    write_sidecar(sidecar, sidecar_content(config, onnx_path, engine_path, trt.__version__, device_cc,
                                           len(pinned), profile))
    for note in notes:
        say(f"note: {note}")
    return EngineResult(engine_path, sidecar, trt.__version__, device_cc, len(pinned), notes)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None
