"""Parity bundle for a device and its CI: ONNX, reference inputs/outputs (Polygraphy JSON), manifest, build script.

``tc-export MODEL ... --target T -o DIR/`` runs the usual job with the ONNX written into a staging directory
(``job.pipeline``); then this sink over the job's result lints the ONNX for the target's TensorRT, has ONNX
Runtime produce the reference outputs on the seeded parity inputs, writes the manifest and ``build_and_verify.sh``,
and the job renames the staging directory to DIR only when all of it succeeded. On the device the script builds the engine and runs ``polygraphy run model.engine --model-type engine
--trt --load-inputs inputs.json --load-outputs outputs.json``; ``tc-export verify`` does the same comparison.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import platform
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import ConfigError
from .engine import EngineConfig, get_target, is_function_layer, keep_fp32_layers, package_version
from ..files import created_timestamp, external_data_files

if TYPE_CHECKING:
    from ...models import LoadedModel
    from ...job.pipeline import JobConfig, JobResult

BUNDLE_FORMAT = "tc-export parity bundle 1"
MANIFEST = "manifest.json"
INPUTS = "inputs.json"
OUTPUTS = "outputs.json"
SCRIPT = "build_and_verify.sh"
FP32_SCRIPT = "fp32_layers.py"
MODEL = "model.onnx"
VERIFY_SCRIPT = "verify_outputs.py"  # writes the verification variant: the sites' values as extra outputs
VERIFY_MODEL = "model.verify.onnx"
VERIFY_ENGINE = "model.verify.engine"
REFERENCE_RUNNER = "onnxruntime-reference"

# Engine vs ONNX Runtime tolerances per precision (elementwise: an element fails only if it breaks both).
# fp32 engines use TF32 matrix products by default on Ampere and later. Not yet measured on a GPU.
ENGINE_TOLERANCES = {"fp32": (1e-2, 1e-2), "fp16": (5e-2, 2e-2), "bf16": (2e-1, 5e-2), "int8": (5e-1, 1e-1)}


def is_bundle_output(text: str | os.PathLike) -> bool:
    """``-o DIR/`` (a trailing slash) or ``-o DIR`` naming an existing directory asks for a bundle."""
    raw = os.fspath(text)
    return raw.endswith(("/", os.sep)) or Path(raw).is_dir()


def check_bundle_dir(path: Path) -> Path:
    """Fail early: the parent must exist and be writable; an existing DIR must be empty or an earlier bundle."""
    parent = path.resolve().parent
    if not parent.is_dir():
        raise ConfigError(f"cannot write bundle {path}/: directory {parent} does not exist")
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"cannot write bundle {path}/: it is a file")
        if any(path.iterdir()) and not (path / MANIFEST).is_file():
            raise ConfigError(f"{path}/ is not empty and is not a tc-export bundle: choose a new or empty directory")
    try:
        with tempfile.TemporaryDirectory(dir=parent, prefix=f".{path.name}.probe-"):
            pass
    except OSError as error:
        raise ConfigError(f"cannot write bundle {path}/: directory {parent} is not writable "
                          f"({error.strerror})") from None
    return path


@contextlib.contextmanager
def staging_dir(final: Path):
    """A temporary sibling directory, renamed to ``final`` only if the block succeeds (an old bundle is replaced)."""
    staging = Path(tempfile.mkdtemp(dir=final.resolve().parent, prefix=f".{final.name}.partial-"))
    try:
        yield staging
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(staging, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_bundle_job(config: JobConfig) -> tuple[Path, EngineConfig]:
    """Before the job runs: a bundle needs a target, and DIR must be writable (``check_bundle_dir``)."""
    engine = config.engine
    if engine is None or engine.target is None:
        raise ConfigError("a parity bundle is built for a device: add --target "
                          "jetson-orin-nano|jetson-agx-orin|datacenter")
    return check_bundle_dir(config.output), engine


def bundle_sink(staging: Path, config: JobConfig, loaded: LoadedModel, result: JobResult, engine: EngineConfig,
                say: Callable[[str], None] = print) -> None:
    """After the job wrote ``staging/model.onnx`` and passed parity: lint it for the target's TensorRT, then write
    the reference inputs and outputs, the manifest and the device script beside it."""
    from .lint import require_lint_clean

    lint = require_lint_clean(staging / MODEL, engine.trt_version, say=say)
    say(lint.summary())
    write_bundle(staging, config, loaded, result, engine)


def reference_feeds(config: JobConfig, loaded: LoadedModel, result: JobResult, onnx_path: Path) -> list[OrderedDict]:
    """The parity inputs (same seeds as the PyTorch vs ONNX Runtime check), keyed by the ONNX input names.

    The exporter names the graph inputs in the order of the example inputs, so they are matched by position.
    """
    from .engine import onnx_inputs

    names = [item.name for item in onnx_inputs(onnx_path)]
    feeds = []
    for i in range(config.parity.samples):
        inputs = job_inputs(config, loaded, result, config.parity.seed + i)
        if len(inputs) != len(names):
            raise ConfigError(f"the ONNX has inputs {names} but the model gives {list(inputs)}: cannot write the "
                              "bundle's reference inputs")
        feeds.append(OrderedDict((name, value.numpy()) for name, value in zip(names, inputs.values())))
    return feeds


def job_inputs(config: JobConfig, loaded: LoadedModel, result: JobResult, seed: int) -> dict:
    """The model's parity inputs of ``seed`` keyed by forward-argument name, with those a method added."""
    inputs = loaded.example_inputs(batch=config.export.batch, seed=seed)
    extra = getattr(result.compressed, "extra_inputs", None) if result.compressed else None
    return inputs if extra is None else inputs | extra(config.export.batch, seed)


def reference_outputs(onnx_path: Path, feeds: Sequence[Mapping[str, Any]]):
    """ONNX Runtime's outputs on ``feeds`` as Polygraphy ``RunResults`` (what ``--load-outputs`` reads)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator

    from ..checks.parity import quiet_polygraphy

    quiet_polygraphy()
    runner = OnnxrtRunner(SessionFromOnnx(str(onnx_path)), name=REFERENCE_RUNNER)
    results = Comparator.run([runner], data_loader=list(feeds))
    for _, iterations in results:
        for iteration in iterations:
            iteration.runtime = 0.0  # a reference has outputs, not a speed: the same bundle has the same bytes
    return results


def write_bundle(directory: Path, config: JobConfig, loaded: LoadedModel, result: JobResult,
                 engine: EngineConfig) -> dict[str, Any]:
    """Write inputs.json, outputs.json, manifest.json, fp32_layers.py and build_and_verify.sh next to the ONNX."""
    from polygraphy.json import save_json

    from .engine import function_node_names, onnx_inputs
    from ..checks.sites import SITES, write_sites

    onnx_path = directory / MODEL
    feeds = reference_feeds(config, loaded, result, onnx_path)
    save_json(feeds, str(directory / INPUTS))
    results = reference_outputs(onnx_path, feeds)
    results.save(str(directory / OUTPUTS))
    node_names, op_types = function_node_names(onnx_path)
    data_files = [path.name for path in external_data_files(onnx_path)]
    sites = result.compressed is not None and write_sites(
        directory, result.compressed.module, onnx_path, job_inputs(config, loaded, result, config.parity.seed), feeds)
    first = results[0][1][0]
    manifest = {
        "format": BUNDLE_FORMAT,
        "model": loaded.name,
        "random_weights": loaded.random_init,
        "methods": [repr(m) for m in config.methods],
        "recipe": config.recipe,
        "tokens_per_layer": result.compressed.token_counts() if result.compressed else None,
        "positions": result.compressed.report.emitted_positions() if result.compressed else None,
        "macs": {"original": result.macs_original, "compressed": result.macs_compressed},
        "inputs": [{"name": name, "shape": list(value.shape), "dtype": str(value.dtype)}
                   for name, value in feeds[0].items()],
        "outputs": [{"name": name, "shape": list(np.shape(value)), "dtype": str(np.asarray(value).dtype)}
                    for name, value in first.items()],
        "samples": len(feeds),
        "seed": config.parity.seed,
        "tolerances": {
            "check_error_stat": "elemwise",
            "onnxruntime": {"atol": config.parity.atol, "rtol": config.parity.rtol},
            "engine": dict(zip(("atol", "rtol"), ENGINE_TOLERANCES[engine.precision]), precision=engine.precision),
        },
        "parity_pytorch_vs_onnxruntime": {
            "passed": bool(result.parity),
            "outputs": {o.name: {"max_abs": o.max_abs, "max_rel": o.max_rel} for o in result.parity.outputs},
        },
        "target": _target_dict(engine),
        "engine": {
            "precision": engine.precision,
            "workspace_bytes": engine.workspace,
            "builder_optimization_level": engine.opt_level,
            "batch_profile": list(engine.profile_for(_dynamic(onnx_path)) or []) or None,
            "plugins": engine.plugins,
            "uses": "plugins" if engine.plugins else "function bodies",
            "tc_export_functions": sorted(op_types),
            "fp32_layers": "function-body layers pinned to fp32 (precision constraints obey)"
            if engine.precision != "fp32" and op_types else None,
        },
        "versions": _versions(),
        "external_data": data_files,  # the weights' file(s) beside model.onnx; [] when it holds them itself
        "files": [MODEL, *data_files, INPUTS, OUTPUTS, MANIFEST, SCRIPT, FP32_SCRIPT,
                  *([SITES, VERIFY_SCRIPT] if sites else [])],
        "dtype": config.export.dtype,
        "created": created_timestamp(),
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    (directory / FP32_SCRIPT).write_text(fp32_script(node_names, op_types))
    if sites:
        (directory / VERIFY_SCRIPT).write_text(verify_outputs_script())
    script = directory / SCRIPT
    script.write_text(build_script(engine, manifest, onnx_inputs(onnx_path), pinned=bool(sites)))
    script.chmod(0o755)
    return manifest


def _dynamic(onnx_path: Path) -> bool:
    from .engine import onnx_inputs

    return any(isinstance(d, str) for i in onnx_inputs(onnx_path) for d in i.shape)


def _target_dict(engine: EngineConfig) -> dict[str, Any]:
    preset = get_target(engine.target)
    return {"name": preset.name, "description": preset.description,
            "compute_capability": preset.compute_capability, "tensorrt": preset.tensorrt,
            "memory_gb": preset.memory_gb, "engine_path": preset.engine_path}


def _versions() -> dict[str, str | None]:
    names = ("tc-export", "torch", "onnx", "onnxruntime", "onnxscript", "polygraphy", "timm", "transformers")
    versions = {name: package_version(name) for name in names}
    versions["python"] = platform.python_version()
    return versions


def fp32_script(node_names: set[str], op_types: set[str]) -> str:
    """A self-contained ``polygraphy convert --trt-network-postprocess-script``: the same pinning as engine.py."""
    helpers = inspect.getsource(is_function_layer) + "\n\n" + inspect.getsource(keep_fp32_layers)
    return f'''"""Written by tc-export: pin the tc_export function bodies' layers to fp32 in a reduced-precision engine.

Used as `polygraphy convert ... --precision-constraints obey --trt-network-postprocess-script {FP32_SCRIPT}`.
"""

from __future__ import annotations

from typing import Any, Sequence

NODE_NAMES = {sorted(node_names)!r}
OP_TYPES = {sorted(op_types)!r}


{helpers}

def postprocess(network):
    import tensorrt as trt

    pinned = keep_fp32_layers(network, set(NODE_NAMES), set(OP_TYPES),
                              (trt.float32, trt.float16, trt.bfloat16), trt.float32)
    print(f"fp32_layers.py: pinned {{len(pinned)}} function-body layers to fp32")
'''


def verify_outputs_script() -> str:
    """``verify_outputs.py``: the source of ``checks/site_outputs.py`` (self-contained, onnx only)."""
    from ..checks import site_outputs

    return f"# Written by tc-export: python3 {VERIFY_SCRIPT} {MODEL} {VERIFY_MODEL}\n" + inspect.getsource(site_outputs)


def build_script(engine: EngineConfig, manifest: Mapping[str, Any], inputs, pinned: bool = False) -> str:
    """``build_and_verify.sh``: build the engine on the device, then check it with ``polygraphy run``; ``pinned``
    (the bundle has ``sites.json``): in reduced precision or after a failure, build the verification engine and
    judge with ``tc-export verify`` (decisions pinned)."""
    from ..checks.sites import SITES
    from .engine import batch_shapes, finish_command

    preset = get_target(engine.target)
    profile = engine.profile_for(any(isinstance(d, str) for i in inputs for d in i.shape))
    shapes = batch_shapes(inputs, profile)
    shape_flags = ""
    for flag, position in (("--trt-min-shapes", 0), ("--trt-opt-shapes", 1), ("--trt-max-shapes", 2)):
        if shapes:
            spec = " ".join(f"{name}:[{','.join(str(d) for d in dims[position])}]" for name, dims in shapes.items())
            shape_flags += f" {flag} {spec}"
    workspace = f" --pool-limit workspace:{max(engine.workspace >> 20, 1)}M" if engine.workspace else ""
    tolerance_cases = "\n".join(f"  {p}) DEFAULT_ATOL={a:g}; DEFAULT_RTOL={r:g} ;;" for p, (a, r) in
                                ENGINE_TOLERANCES.items())
    trtexec = finish_command(Path(MODEL), Path("ENGINE_PLACEHOLDER"), config=replace(engine, precision="fp32"),
                             inputs=inputs)  # the precision flags come from $PRECISION
    trtexec = trtexec.replace("trtexec ", '"$TRTEXEC" ', 1).replace("ENGINE_PLACEHOLDER", '"$ENGINE"')
    trtexec += " $(trtexec_precision)"
    plugin_build = (f"tc-export build {MODEL} -o \"$ENGINE\" --target {preset.name} --precision \"$PRECISION\" "
                    "--plugins on")
    script = f'''#!/usr/bin/env bash
# Written by tc-export {manifest["versions"].get("tc-export")} for {preset.name}: {preset.description}.
# Builds the TensorRT engine on this device from {MODEL}, then checks it against the reference outputs that ONNX
# Runtime produced ({INPUTS}, {OUTPUTS}; Polygraphy JSON). Exits non-zero if an output differs beyond the
# tolerances, 3 if TensorRT or Polygraphy is missing. In reduced precision (or after a failure), when the bundle has
# {SITES}, `tc-export verify` judges the verification engine ({VERIFY_ENGINE}) with the decisions pinned.
# Engine path: {preset.engine_path}. Model: {manifest["model"]}, methods: {", ".join(manifest["methods"]) or "none"}.
#   ./{SCRIPT}                       # build with polygraphy convert, then verify
#   BUILDER=trtexec ./{SCRIPT}       # build with trtexec (no fp32 pinning of the function bodies)
#   PRECISION=fp32 ATOL=1e-3 ./{SCRIPT}
set -euo pipefail
cd "$(dirname "$0")"

PRECISION="${{PRECISION:-{engine.precision}}}"
ENGINE="${{ENGINE:-model.engine}}"
BUILDER="${{BUILDER:-{"tc-export" if engine.plugins else "polygraphy"}}}"
TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}"
case "$PRECISION" in
{tolerance_cases}
  *) echo "{SCRIPT}: PRECISION must be fp32, fp16, bf16 or int8, got $PRECISION" >&2; exit 2 ;;
esac
ATOL="${{ATOL:-$DEFAULT_ATOL}}"
RTOL="${{RTOL:-$DEFAULT_RTOL}}"

if ! python3 -c "import tensorrt" 2>/dev/null; then
  echo "{SCRIPT}: TensorRT's Python package is missing (JetPack: sudo apt install python3-libnvinfer)" >&2; exit 3
fi
if ! command -v polygraphy >/dev/null; then
  echo "{SCRIPT}: polygraphy is missing: python3 -m pip install polygraphy" >&2; exit 3
fi
python3 -c "import tensorrt as trt; print('TensorRT', trt.__version__, '(bundle expects {preset.tensorrt})')"

polygraphy_precision() {{
  case "$PRECISION" in
    fp32) ;;
    fp16) echo "--fp16 --precision-constraints obey --trt-network-postprocess-script {FP32_SCRIPT}" ;;
    bf16) echo "--bf16 --precision-constraints obey --trt-network-postprocess-script {FP32_SCRIPT}" ;;
    int8) echo "--int8 --fp16 --load-inputs {INPUTS} --precision-constraints obey \\
                --trt-network-postprocess-script {FP32_SCRIPT}" ;;
  esac
}}
trtexec_precision() {{
  case "$PRECISION" in
    fp32) ;;
    int8) echo "--int8 --fp16" ;;
    *) echo "--$PRECISION" ;;
  esac
}}

case "$BUILDER" in
  polygraphy)
    # shellcheck disable=SC2046
    polygraphy convert {MODEL} --convert-to trt -o "$ENGINE" $(polygraphy_precision){workspace} \\
      --builder-optimization-level {engine.opt_level}{shape_flags} ;;
  trtexec)
    # shellcheck disable=SC2046
    {trtexec} ;;
  tc-export)
    {plugin_build} ;;
  *) echo "{SCRIPT}: BUILDER must be polygraphy, trtexec or tc-export, got $BUILDER" >&2; exit 2 ;;
esac

status=0
polygraphy run "$ENGINE" --model-type engine --trt --load-inputs {INPUTS} --load-outputs {OUTPUTS} \\
  --atol "$ATOL" --rtol "$RTOL" --check-error-stat elemwise || status=$?
{{pinned_block}}if [ "$status" -ne 0 ]; then
  echo "{SCRIPT}: $ENGINE differs from the reference outputs beyond atol $ATOL, rtol $RTOL" >&2; exit "$status"
fi
echo "{SCRIPT}: $ENGINE matches the reference outputs (atol $ATOL, rtol $RTOL)"
'''
    return script.replace("{pinned_block}", pinned_block(engine, workspace, shape_flags) if pinned else "")


def pinned_block(engine: EngineConfig, workspace: str, shape_flags: str) -> str:
    """The script's pinned check: in reduced precision (near-ties flip) or after a failure, the verification engine
    (the same network with the token-op sites' values as extra outputs) is judged by ``tc-export verify``."""
    return f'''# Reduced precision flips near-tied token-op decisions: judge with the decisions pinned (tc-export verify
# on the verification engine: the same network with the token-op sites' values and decisions as extra outputs).
if [ "$PRECISION" != fp32 ] || [ "$status" -ne 0 ]; then
  if command -v tc-export >/dev/null; then
    python3 {VERIFY_SCRIPT} {MODEL} {VERIFY_MODEL}
    # shellcheck disable=SC2046
    polygraphy convert {VERIFY_MODEL} --convert-to trt -o {VERIFY_ENGINE} $(polygraphy_precision){workspace} \\
      --builder-optimization-level {engine.opt_level}{shape_flags}
    tc-export verify {VERIFY_ENGINE} --against . --atol "$ATOL" --rtol "$RTOL"
    exit 0
  fi
  echo "{SCRIPT}: tc-export is missing: decisions not pinned, the plain comparison decides" >&2
fi
'''


@dataclass(frozen=True)
class Bundle:
    """A bundle read back: its manifest, inputs (feed dicts) and reference outputs (RunResults)."""

    directory: Path
    manifest: dict[str, Any]
    feeds: list
    reference: Any

    @classmethod
    def load(cls, directory: Path) -> Bundle:
        from polygraphy.comparator import RunResults
        from polygraphy.json import load_json

        from ..checks.parity import quiet_polygraphy

        quiet_polygraphy()
        if not directory.is_dir():
            raise ConfigError(f"--against {directory}: no such directory (a bundle from tc-export ... -o DIR/)")
        missing = [name for name in (MANIFEST, INPUTS, OUTPUTS) if not (directory / name).is_file()]
        if missing:
            raise ConfigError(f"--against {directory}: not a tc-export bundle (missing {', '.join(missing)})")
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
            feeds = list(load_json(str(directory / INPUTS)))
            reference = RunResults.load(str(directory / OUTPUTS))
        except Exception as error:  # noqa: BLE001 - any decode failure means a damaged bundle
            raise ConfigError(f"--against {directory}: cannot read the bundle ({type(error).__name__}: "
                              f"{str(error).splitlines()[0][:120] if str(error) else ''})") from None
        if manifest.get("format") != BUNDLE_FORMAT:
            raise ConfigError(f"--against {directory}: {MANIFEST} is not a {BUNDLE_FORMAT!r} manifest")
        return cls(directory, manifest, feeds, reference)
