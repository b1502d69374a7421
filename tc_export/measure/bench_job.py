"""``tc-export bench``: build every configuration of a sweep and measure it against the uncompressed model.

Per batch size, every model of the run (the uncompressed baseline, each configuration, their int8 versions, the
tuned baseline) is timed in ONE interleaved loop (``bench.time_interleaved``), so the speed-up of a row is its
baseline's median over its own median from the same loop. Fidelity compares each model's outputs with the
uncompressed model's on the same seeded inputs, in the same backend (none, with a note, for a model that outputs
tokens, e.g. through a projector: as in the export job); accuracy comes from the model's evaluator when it has one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import math
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .bench import make_session, time_interleaved
from ..errors import BackendUnavailableError, ConfigError, TCExportError
from ..export.checks.fidelity import NOT_COMPARABLE, first_output
from ..export.macs import count_macs
from ..export.onnx_export import ExportConfig, write_onnx
from ..models import LoadedModel
from ..job.pipeline import compress_for_job
from .sweep import Candidate

BACKENDS = ("ort", "torch", "trt")
# Models with a held-out accuracy: name -> (module, function) imported lazily, or the function itself;
# the function takes an nn.Module (called with a batch of inputs, returning logits) and returns accuracy in [0, 1].
EVALUATORS: dict[str, tuple[str, str] | Callable[[torch.nn.Module], float]] = {
    "mnist_vit": ("tc_export.models.mnist", "mnist_accuracy"),
}


@dataclass(frozen=True)
class SweepConfig:
    """How a sweep measures: batch sizes, timing runs, threads, backend and the extra rows to add."""

    batches: tuple[int, ...] = (1,)
    runs: int = 30
    warmup: int = 5
    threads: int = 2
    backend: str = "ort"
    int8: bool = False
    baselines: bool = False
    samples: int = 16  # seeded inputs for fidelity
    seed: int = 1000
    profile: bool = False  # also print where each ONNX model's time goes, by op type
    flat: bool = False  # export without ONNX local functions (the token ops inlined into the main graph)

    def __post_init__(self) -> None:
        if not self.batches or min(self.batches) < 1:
            raise ConfigError(f"--batch values must be >= 1, got {list(self.batches)}")
        if len(set(self.batches)) != len(self.batches):
            raise ConfigError(f"--batch repeats a value: {list(self.batches)}")
        if self.runs < 3 or self.warmup < 0 or self.threads < 1:
            raise ConfigError("--runs must be >= 3, --warmup >= 0 and --threads >= 1")
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.samples < 1:
            raise ConfigError(f"--samples must be >= 1, got {self.samples}")
        if self.int8 and self.backend != "ort":
            raise ConfigError("--int8 quantizes the ONNX models: use it with --backend ort")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Entry:
    """One timed model of a loop: what its row says, how to run it, and how to predict for fidelity."""

    row: dict[str, Any]
    call: Callable[[], object]
    predict: Callable[[dict[str, torch.Tensor]], np.ndarray]
    key: tuple[str, ...]  # identifies the model across batch sizes (accuracy is measured once)
    path: Path | None = None  # the ONNX file, for --profile
    feed: dict[str, np.ndarray] | None = None


@dataclass
class Group:
    """Models timed in one loop; ``entries[0]`` is the baseline the speed-ups refer to."""

    name: str
    entries: list[Entry] = field(default_factory=list)


def check_backend(backend: str) -> None:
    if backend == "trt":
        if importlib.util.find_spec("tensorrt") is None:
            raise BackendUnavailableError(
                "TensorRT missing: --backend trt needs the tensorrt Python package and a GPU; use --backend ort "
                "(ONNX Runtime) or --backend torch here"
            )
        raise BackendUnavailableError("--backend trt: TensorRT is present but bench does not drive it yet; use ort")


def run_sweep(
    loaded: LoadedModel,
    candidates: Sequence[Candidate],
    config: SweepConfig,
    say: Callable[[str], None] = print,
    progress: Callable[[str], None] = lambda label: None,
) -> list[dict[str, Any]]:
    """Measure every candidate at every batch size; returns the rows of the ``tc-export.bench/1`` schema."""
    check_backend(config.backend)
    evaluator = find_evaluator(loaded.name)
    classes = loaded.output_names[0] == "logits"
    one = loaded.example_inputs(batch=1)
    base_macs = count_macs(loaded.module, one)
    base_tokens = _token_counts(loaded, [], one)
    accuracy_cache: dict[tuple[str, ...], float | None] = {}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tc-export-bench-") as folder, _threads(config.threads):
        for batch in config.batches:
            inputs = loaded.example_inputs(batch=batch)
            fidelity_inputs = [loaded.example_inputs(batch=batch, seed=config.seed + i)
                               for i in range(math.ceil(config.samples / batch))]
            common = {"model": loaded.name, "batch": batch, "threads": config.threads}
            groups = _build_groups(loaded, candidates, config, batch, inputs, Path(folder), common, base_macs,
                                   base_tokens, say, progress)
            for group in groups:
                progress(f"timing {group.name} batch {batch}")
                timings = time_interleaved([e.call for e in group.entries], config.runs, config.warmup)
                reference = [group.entries[0].predict(x) for x in fidelity_inputs]
                tuned_ms = next((t.median for e, t in zip(group.entries, timings)
                                 if e.row["kind"] == "baseline-tuned"), None)
                for entry, timing in zip(group.entries, timings):
                    row = dict(entry.row)
                    row["latency_ms"] = {"median": timing.median, "p90": timing.p90}
                    row["baseline_ms"] = timings[0].median
                    row["speedup"] = timings[0].median / timing.median
                    row["throughput"] = batch * 1000.0 / timing.median
                    if tuned_ms is not None:
                        row["baseline_tuned_ms"] = tuned_ms
                        row["speedup_vs_tuned"] = tuned_ms / timing.median
                    if "fidelity" not in row:  # set already when the outputs are not comparable
                        got = [entry.predict(x) for x in fidelity_inputs]
                        row["fidelity"] = compare_outputs(reference, got, classes, config.samples)
                    if entry.key not in accuracy_cache:
                        accuracy_cache[entry.key] = _accuracy(evaluator, entry.predict, loaded, batch)
                    row["accuracy"] = accuracy_cache[entry.key]
                    rows.append(row)
                say(f"batch {batch} ({group.name}): " + " · ".join(
                    f"{r['label']}{' int8' if r['precision'] == 'int8' else ''} {r['latency_ms']['median']:.1f} ms "
                    f"{r['speedup']:.2f}x" for r in rows[-len(group.entries):]))
                if config.profile:
                    _say_profile(group, config.threads, say)
    return rows


def _build_groups(
    loaded: LoadedModel, candidates: Sequence[Candidate], config: SweepConfig, batch: int,
    inputs: dict[str, torch.Tensor], folder: Path, common: dict[str, Any], base_macs: int,
    base_tokens: list[int] | None, say: Callable[[str], None], progress: Callable[[str], None],
) -> list[Group]:
    names = {spec.name: spec.export_name for spec in loaded.inputs}
    feed = {names[k]: v.numpy() for k, v in inputs.items()}
    backend = config.backend
    main = Group(f"{backend}")
    int8_rows: list[Entry] = []

    def add(row: dict[str, Any], module_or_path: Any, key: tuple[str, ...], group: Group) -> None:
        if isinstance(module_or_path, Path):
            session = make_session(module_or_path, config.threads)
            call = lambda s=session: s.run(None, feed)  # noqa: E731
            predict = _ort_predict(session, names)
        else:
            call = _torch_call(module_or_path, inputs, config.threads)
            predict = _torch_predict(module_or_path, config.threads)
        path = module_or_path if isinstance(module_or_path, Path) else None
        group.entries.append(Entry(row, call, predict, key, path, feed))

    def export(module: torch.nn.Module, name: str) -> Path:
        path = folder / f"{name}-b{batch}.onnx"
        export_config = ExportConfig(batch=batch, functions=False) if config.flat else ExportConfig(batch=batch)
        write_onnx(module, inputs, path, export_config, input_names=[names[k] for k in inputs],
                   output_names=loaded.output_names)
        return path

    base_row = _row(common, Candidate("uncompressed", "none", ()), backend, "fp32", "uncompressed", base_tokens,
                    base_macs, base_macs)
    progress(f"uncompressed batch {batch}")
    base_target: Any = export(loaded.module, "baseline") if backend == "ort" else loaded.module
    add(base_row, base_target, ("uncompressed", backend, "fp32"), main)
    if config.int8:
        int8_rows.append(_int8_entry(base_row, base_target, folder, batch, config, feed, names,
                                     ("uncompressed", backend, "int8")))
    if config.baselines and backend == "ort":
        progress(f"tuned baseline batch {batch}")
        path, note = _tuned_baseline(base_target, loaded)
        tuned = _row(common, Candidate("uncompressed (ORT transformer optimizer)", "none", ()), backend, "fp32",
                     "baseline-tuned", base_tokens, base_macs, base_macs)
        tuned["note"] = note
        add(tuned, path, ("tuned", backend, "fp32"), main)

    for index, candidate in enumerate(candidates):
        progress(f"{candidate.label} batch {batch}")
        if candidate.uncompressed:
            continue
        compressed = compress_for_job(loaded, candidate.configs, inputs, candidate.params.get("recipe"))
        macs = count_macs(compressed.module, inputs) // batch
        row = _row(common, candidate, backend, "fp32", "compressed", compressed.token_counts(), macs, base_macs)
        if compressed.report.output_is_tokens:  # the export job's rule: tokens are not the model's output
            row["fidelity"] = {"cosine": None, "min_cosine": None, "top1_agreement": None, "kl": None, "samples": 0,
                               "note": NOT_COMPARABLE}
            if batch == config.batches[0]:
                say(f"{candidate.label}: fidelity not shown: {NOT_COMPARABLE}")
        target: Any = export(compressed.module, f"candidate{index}") if backend == "ort" else compressed.module
        add(row, target, (candidate.label, backend, "fp32"), main)
        if config.int8:
            int8_rows.append(_int8_entry(row, target, folder, batch, config, feed, names,
                                         (candidate.label, backend, "int8")))
    main.entries.extend(int8_rows)
    groups = [main]
    if config.baselines:
        reference = _reference_group(loaded, candidates, config, inputs, common, base_macs, base_tokens, progress)
        if reference is not None:
            groups.append(reference)
        else:
            say("--baselines: no timm VisionTransformer or no tome configuration: no reference eager ToMe rows")
    return groups


def _say_profile(group: Group, threads: int, say: Callable[[str], None]) -> None:
    from .bench import profile_op_types

    for entry in group.entries:
        if entry.path is not None and entry.feed is not None:
            top = list(profile_op_types(entry.path, entry.feed, threads).items())[:8]
            name = entry.row["label"] + (" int8" if entry.row["precision"] == "int8" else "")
            say(f"  {name} time by op type: " + ", ".join(f"{op} {ms:.2f} ms" for op, ms in top))


def _int8_entry(row: dict[str, Any], path: Path, folder: Path, batch: int, config: SweepConfig,
                feed: dict[str, np.ndarray], names: dict[str, str], key: tuple[str, ...]) -> Entry:
    from ..export.quantize import quantize_int8

    result = quantize_int8(path, folder / f"{path.stem}-int8.onnx")
    session = make_session(result.path, config.threads)
    quant_row = dict(row, precision="int8")
    quant_row["note"] = result.describe()
    return Entry(quant_row, lambda s=session: s.run(None, feed), _ort_predict(session, names), key, result.path, feed)


def _tuned_baseline(path: Path, loaded: LoadedModel) -> tuple[Path, str]:
    """The uncompressed ONNX after ONNX Runtime's transformer optimizer (model_type vit), with what it fused."""
    import logging

    from onnxruntime.transformers.optimizer import optimize_model

    heads, hidden = _heads_and_width(loaded.module)
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(None):
        optimized = optimize_model(str(path), model_type="vit", num_heads=heads, hidden_size=hidden, opt_level=0,
                                   use_gpu=False)
    target = path.with_name(path.stem + "-ortopt.onnx")
    optimized.save_model_to_file(str(target))
    fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
    note = ("onnxruntime.transformers.optimizer.optimize_model(model_type='vit', opt_level=0), then the session's "
            "ORT_ENABLE_ALL; fused: " + (", ".join(f"{k} {v}" for k, v in fused.items()) or "nothing"))
    return target, note


def _heads_and_width(module: torch.nn.Module) -> tuple[int, int]:
    for sub in module.modules():
        heads = getattr(sub, "num_heads", None) or getattr(sub, "num_attention_heads", None)
        if isinstance(heads, int) and heads > 0:
            qkv = getattr(sub, "qkv", None)
            width = qkv.in_features if isinstance(qkv, torch.nn.Linear) else 0
            return heads, width
    return 0, 0


def _reference_group(
    loaded: LoadedModel, candidates: Sequence[Candidate], config: SweepConfig, inputs: dict[str, torch.Tensor],
    common: dict[str, Any], base_macs: int, base_tokens: list[int] | None, progress: Callable[[str], None],
) -> Group | None:
    """Eager uncompressed vs eager ToMe applied the reference way (``reference_tome``), for each tome candidate."""
    from ..ops.tome import effective_r
    from .reference_tome import apply_reference_tome

    tome = [c for c in candidates if len(c.configs) == 1 and getattr(c.configs[0], "method", "") == "tome"]
    blocks = getattr(loaded.module, "blocks", None)
    if not tome or blocks is None:
        return None
    group = Group("torch eager reference ToMe")
    base_row = _row(common, Candidate("uncompressed", "none", ()), "torch", "fp32", "uncompressed", base_tokens,
                    base_macs, base_macs)
    group.entries.append(Entry(base_row, _torch_call(loaded.module, inputs, config.threads),
                               _torch_predict(loaded.module, config.threads), ("uncompressed", "torch", "fp32")))
    one = loaded.example_inputs(batch=1)
    for candidate in tome:
        progress(f"reference eager {candidate.label}")
        tome_config = candidate.configs[0]
        schedule = tome_config.schedule(len(blocks))
        if tome_config.layers is not None:
            schedule = [r if i in tome_config.layers else 0 for i, r in enumerate(schedule)]
        at_input = tome_config.placement == "input"
        merges = {"input": schedule if at_input else [], "attention": [] if at_input else schedule}
        try:
            module = apply_reference_tome(loaded.module, merges["attention"], tome_config.prop_attn,
                                          input_schedule=merges["input"])
        except TCExportError:
            return None
        macs = count_macs(module, one)
        tokens = None
        if base_tokens:  # as token_counts(): the tokens each attention sees, then the tokens leaving the last layer
            protected, n, tokens = module.blocks.protected, base_tokens[0], []
            for layer in range(len(blocks)):
                for where in ("input", "attention"):
                    r = merges[where][layer] if layer < len(merges[where]) else 0
                    n -= effective_r(n, r, protected)
                    if where == "input":
                        tokens.append(n)
            tokens.append(n)
        row = _row(common, dataclasses.replace(candidate, label=f"{candidate.label} (reference eager)"), "torch",
                   "fp32", "reference", tokens, macs, base_macs)
        group.entries.append(Entry(row, _torch_call(module, inputs, config.threads),
                                   _torch_predict(module, config.threads), (row["label"], "torch", "fp32")))
    return group


def _row(common: dict[str, Any], candidate: Candidate, backend: str, precision: str, kind: str,
         tokens: list[int] | None, macs: int, base_macs: int) -> dict[str, Any]:
    return {
        **common,
        "method": candidate.method,
        "label": candidate.label,
        "params": _jsonable(candidate.params),
        "backend": backend,
        "precision": precision,
        "kind": kind,
        "tokens_per_layer": tokens,
        "macs": int(macs),
        "mac_ratio": base_macs / max(int(macs), 1),
    }


def compare_outputs(reference: Sequence[np.ndarray], got: Sequence[np.ndarray], classes: bool,
                    samples: int) -> dict[str, Any]:
    """Top-1 agreement, mean / min cosine and mean KL(softmax(reference) || softmax(got)) over ``samples`` rows.

    Sequence outputs of different lengths (B, N', C) vs (B, N, C) are averaged over tokens first.
    """
    ref = np.concatenate([np.asarray(r, dtype=np.float64) for r in reference])[:samples]
    out = np.concatenate([np.asarray(g, dtype=np.float64) for g in got])[:samples]
    if ref.ndim == 3 and ref.shape != out.shape:
        ref, out = ref.mean(axis=1), out.mean(axis=1)
    ref, out = ref.reshape(len(ref), -1), out.reshape(len(out), -1)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    cosine = np.clip(np.where(norms > 0, (ref * out).sum(axis=1) / np.maximum(norms, 1e-300), 1.0), -1.0, 1.0)
    cosine = np.where(np.array_equal(ref, out), 1.0, cosine)
    result: dict[str, Any] = {"cosine": round(float(cosine.mean()), 6), "min_cosine": round(float(cosine.min()), 6),
                              "top1_agreement": None, "kl": None, "samples": int(len(ref))}
    if classes:
        result["top1_agreement"] = float((ref.argmax(axis=1) == out.argmax(axis=1)).mean())
        log_p, log_q = _log_softmax(ref), _log_softmax(out)
        result["kl"] = max(0.0, float((np.exp(log_p) * (log_p - log_q)).sum(axis=1).mean()))
    return result


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def find_evaluator(model_name: str) -> Callable[[torch.nn.Module], float] | None:
    """The model's accuracy function when it has one and it imports; None otherwise (accuracy: null)."""
    entry = EVALUATORS.get(model_name)
    if entry is None or callable(entry):
        return entry
    try:
        return getattr(importlib.import_module(entry[0]), entry[1])
    except (ImportError, AttributeError):
        return None


class FixedBatchModule(torch.nn.Module):
    """An nn.Module over a static-batch predictor: splits the input into batches, pads the last one."""

    def __init__(self, predict: Callable[[dict[str, torch.Tensor]], np.ndarray], names: Sequence[str], batch: int):
        super().__init__()
        self.predict, self.names, self.batch = predict, list(names), batch

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        tensors = dict(zip(self.names, args)) | kwargs
        total = next(iter(tensors.values())).shape[0]
        outputs = []
        for start in range(0, total, self.batch):
            chunk = {k: v[start:start + self.batch] for k, v in tensors.items()}
            short = self.batch - next(iter(chunk.values())).shape[0]
            if short:
                chunk = {k: torch.cat([v, v[-1:].expand(short, *v.shape[1:])]) for k, v in chunk.items()}
            outputs.append(torch.from_numpy(np.asarray(self.predict(chunk)))[: self.batch - short])
        return torch.cat(outputs)


def _accuracy(evaluator: Callable[[torch.nn.Module], float] | None,
              predict: Callable[[dict[str, torch.Tensor]], np.ndarray], loaded: LoadedModel, batch: int) -> float | None:
    if evaluator is None:
        return None
    module = FixedBatchModule(predict, [spec.name for spec in loaded.inputs], batch)
    return float(evaluator(module))


def _ort_predict(session: Any, names: dict[str, str]) -> Callable[[dict[str, torch.Tensor]], np.ndarray]:
    return lambda inputs: session.run(None, {names[k]: v.numpy() for k, v in inputs.items()})[0]


@contextlib.contextmanager
def _threads(threads: int) -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _torch_call(module: torch.nn.Module, inputs: dict[str, torch.Tensor], threads: int) -> Callable[[], object]:
    """Eager forward; the thread count is set once for the whole run (changing it rebuilds the thread pool)."""
    def call() -> object:
        with torch.inference_mode():
            return module(**inputs)

    return call


def _torch_predict(module: torch.nn.Module, threads: int) -> Callable[[dict[str, torch.Tensor]], np.ndarray]:
    def predict(inputs: dict[str, torch.Tensor]) -> np.ndarray:
        with torch.inference_mode():
            return first_output(module(**inputs)).float().numpy()

    return predict


def _token_counts(loaded: LoadedModel, configs: Sequence[object], example: dict[str, torch.Tensor]) -> list[int] | None:
    from ..job.compress import compress

    try:
        return compress(loaded, list(configs), example).token_counts()
    except TCExportError:
        return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return repr(value)
