"""The results of ``tc-export bench``: the versioned JSON document, its schema, a Markdown table and PNG plots.

Schema ``tc-export.bench/1`` (consumed by the report page; names are stable, extra fields may be added)::

    {"schema": "tc-export.bench/1", "machine": {...}, "versions": {...}, "config": {...}, "rows": [row, ...]}
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailableError, ConfigError

SCHEMA_ID = "tc-export.bench/1"

_NUMBER = {"type": "number"}
_NULLABLE_NUMBER = {"type": ["number", "null"]}
ROW_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["model", "method", "label", "params", "backend", "batch", "threads", "tokens_per_layer", "macs",
                 "mac_ratio", "latency_ms", "baseline_ms", "speedup", "throughput", "fidelity", "accuracy"],
    "properties": {
        "model": {"type": "string"},
        "method": {"type": "string"},
        "label": {"type": "string"},
        "params": {"type": "object"},
        "backend": {"type": "string", "enum": ["ort", "torch", "trt"]},
        "precision": {"type": "string", "enum": ["fp32", "int8"]},
        "kind": {"type": "string", "enum": ["uncompressed", "compressed", "baseline-tuned", "reference"]},
        "batch": {"type": "integer"},
        "threads": {"type": "integer"},
        "tokens_per_layer": {"type": ["array", "null"], "items": {"type": "integer"}},
        "macs": {"type": "integer"},
        "mac_ratio": _NUMBER,
        "latency_ms": {"type": "object", "required": ["median", "p90"],
                       "properties": {"median": _NUMBER, "p90": _NUMBER}},
        "baseline_ms": _NUMBER,
        "speedup": _NUMBER,
        "throughput": _NUMBER,
        "fidelity": {"type": "object", "required": ["top1_agreement", "cosine", "kl"],
                     "properties": {"top1_agreement": _NULLABLE_NUMBER, "cosine": _NULLABLE_NUMBER,
                                    "kl": _NULLABLE_NUMBER}},  # all null: outputs not comparable (see its note)
        "accuracy": _NULLABLE_NUMBER,
    },
}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["schema", "machine", "versions", "config", "rows"],
    "properties": {
        "schema": {"type": "string", "enum": [SCHEMA_ID]},
        "machine": {"type": "object", "required": ["cpu", "cores", "memory_gb"],
                    "properties": {"cpu": {"type": "string"}, "cores": {"type": "integer"}, "memory_gb": _NUMBER}},
        "versions": {"type": "object", "required": ["torch", "onnxruntime", "onnx", "tc_export"]},
        "config": {"type": "object"},
        "rows": {"type": "array", "items": ROW_SCHEMA},
    },
}


def validate(document: Any, schema: Mapping[str, Any] = SCHEMA, where: str = "$") -> list[str]:
    """Problems of ``document`` against ``schema`` (the subset of JSON Schema used above); empty when valid."""
    problems: list[str] = []
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_is(document, kind) for kind in kinds):
            return [f"{where}: expected {' or '.join(kinds)}, got {type(document).__name__}"]
    if "enum" in schema and document not in schema["enum"]:
        problems.append(f"{where}: {document!r} is not one of {schema['enum']}")
    if isinstance(document, dict):
        for key in schema.get("required", []):
            if key not in document:
                problems.append(f"{where}: missing {key!r}")
        for key, sub in schema.get("properties", {}).items():
            if key in document:
                problems.extend(validate(document[key], sub, f"{where}.{key}"))
    if isinstance(document, list) and "items" in schema:
        for i, item in enumerate(document):
            problems.extend(validate(item, schema["items"], f"{where}[{i}]"))
    return problems


def _is(value: Any, kind: str) -> bool:
    return {
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "null": value is None,
        "boolean": isinstance(value, bool),
    }[kind]


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, and the CPU flags that matter for these kernels."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine(), platform.processor()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    memory_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gb = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores": int(cores or 0),
        "memory_gb": memory_gb if memory_gb is not None else 0.0,
        "isa": sorted(flag for flag in flags if flag in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for key, dist in (("torch", "torch"), ("onnxruntime", "onnxruntime"), ("onnx", "onnx"), ("tc_export", "tc-export"),
                      ("timm", "timm"), ("transformers", "transformers"), ("numpy", "numpy")):
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    return out


def document(rows: Sequence[Mapping[str, Any]], config: Mapping[str, Any]) -> dict[str, Any]:
    return {"schema": SCHEMA_ID, "machine": machine_info(), "versions": versions(), "config": dict(config),
            "rows": [dict(row) for row in rows]}


def write_json(doc: Mapping[str, Any], path: Path) -> None:
    problems = validate(doc)
    if problems:  # a bug, not a user error: the document must match its own schema
        raise AssertionError(f"bench results do not match {SCHEMA_ID}: {problems[0]}")
    path.write_text(json.dumps(doc, indent=2) + "\n")


def row_name(row: Mapping[str, Any]) -> str:
    extra = " int8" if row.get("precision") == "int8" else ""
    backend = "" if row.get("kind") != "reference" and row.get("backend") == "ort" else f" [{row.get('backend')}]"
    return f"{row['label']}{extra}{backend}"


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per row; speed-up is against the uncompressed fp32 model timed in the same loop."""
    tuned = any("speedup_vs_tuned" in row for row in rows)
    head = ["model", "configuration", "batch", "tokens per layer", "MAC ratio", "median (ms)", "p90 (ms)",
            "images/s", "speed-up"] + (["vs tuned"] if tuned else []) + ["top-1 agree", "cosine", "KL", "accuracy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        fid = row["fidelity"]
        tokens = row.get("tokens_per_layer")
        cells = [
            row["model"], row_name(row), str(row["batch"]),
            " ".join(map(str, tokens)) if tokens else "-",
            f"{row['mac_ratio']:.2f}x", f"{row['latency_ms']['median']:.1f}", f"{row['latency_ms']['p90']:.1f}",
            f"{row['throughput']:.1f}", f"{row['speedup']:.2f}x",
        ]
        if tuned:
            cells.append(f"{row['speedup_vs_tuned']:.2f}x" if "speedup_vs_tuned" in row else "-")
        cells += [
            "-" if fid["top1_agreement"] is None else f"{fid['top1_agreement']:.0%}",
            "-" if fid["cosine"] is None else f"{fid['cosine']:.4f}",
            "-" if fid["kl"] is None else f"{fid['kl']:.2e}",
            "-" if row["accuracy"] is None else f"{row['accuracy']:.2%}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def footnote(config: Mapping[str, Any], machine: Mapping[str, Any]) -> str:
    return (f"\n{machine.get('cpu')}, {config.get('threads')} threads; backend {config.get('backend')}, "
            f"{config.get('runs')} interleaved runs per model (median, p90), spinning off; speed-up vs the "
            f"uncompressed fp32 model in the same loop; fidelity over {config.get('samples')} seeded inputs.")


def write_plots(rows: Sequence[Mapping[str, Any]], folder: Path) -> list[Path]:
    """PNG plots: speed-up vs fidelity (or accuracy), one curve per method and precision; tokens per layer."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--plot {folder}: cannot create the directory ({error.strerror})") from None
    written = []
    use_accuracy = any(row["accuracy"] is not None for row in rows)
    y_key = "accuracy" if use_accuracy else "cosine"
    for batch in sorted({row["batch"] for row in rows}):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        curves: dict[str, list[tuple[float, float, str]]] = {}
        for row in rows:
            if row["batch"] != batch:
                continue
            y = row["accuracy"] if use_accuracy else row["fidelity"]["cosine"]
            if y is None:
                continue
            y = 100.0 * y if use_accuracy else y
            name = _curve_name(row)
            curves.setdefault(name, []).append((row["speedup"], y, row["label"]))
        for name, points in sorted(curves.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        ax.set_ylabel("held-out accuracy (%)" if use_accuracy else "output cosine vs uncompressed")
        base = next((r for r in rows if r["batch"] == batch and r["method"] == "none"
                     and r.get("kind", "uncompressed") == "uncompressed"), None)
        if base is not None:
            base_y = base["accuracy"] if use_accuracy else base["fidelity"]["cosine"]
            if base_y is not None:
                metric_axis(ax, y_key, 100.0 * base_y if use_accuracy else base_y,
                            [p[1] for points in curves.values() for p in points])
        ax.set_xlabel("speed-up vs uncompressed fp32 (same run)")
        ax.set_title(f"{rows[0]['model']}: speed-up vs {y_key}, batch {batch}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = folder / f"speedup_vs_{y_key}_b{batch}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    seen = set()
    for row in rows:
        tokens = row.get("tokens_per_layer")
        if not tokens or row["label"] in seen or row.get("precision") == "int8":
            continue
        seen.add(row["label"])
        ax.plot(range(len(tokens)), tokens, marker=".", label=row["label"])
    ax.set_xlabel("layer (last point: tokens leaving the last layer)")
    ax.set_ylabel("tokens")
    ax.set_title(f"{rows[0]['model']}: tokens per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = folder / "tokens_per_layer.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def metric_axis(ax: Any, metric: str, baseline: float, values: Sequence[float]) -> None:
    """Label the y axis in the units people read: accuracy in percent on a range of at least 4 points with the
    band within 1 point of the uncompressed model shaded (a 0.1-point change must not look like a cliff)."""
    if metric == "accuracy":
        low = min([baseline - 4.0, *values]) - 0.5
        high = max([baseline + 1.0, *values]) + 0.5
        ax.set_ylim(max(0.0, low), min(100.0, high))
        ax.axhspan(baseline - 1.0, baseline, color="tab:green", alpha=0.12, label="within 1 point")
        ax.axhline(baseline, color="grey", linewidth=0.8)
        ax.set_ylabel("held-out accuracy (%)")
    else:
        ax.set_ylabel("output cosine vs uncompressed" if metric == "cosine" else f"{metric} (higher is better)")


def require_matplotlib() -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise BackendUnavailableError("--plot needs matplotlib: pip install 'tc-export[report]'")


def _curve_name(row: Mapping[str, Any]) -> str:
    """Rows of one method (all sweep values) form a curve; the uncompressed model joins every curve at 1x."""
    method = row["method"]
    suffix = (" int8" if row.get("precision") == "int8" else "") + (f" [{row['backend']}]" if row["backend"] != "ort" or row.get("kind") == "reference" else "")
    if row.get("kind") == "reference":
        return "tome (reference eager)"
    if row.get("kind") == "baseline-tuned":
        return "uncompressed (ORT optimizer)"
    if method == "none":
        return f"uncompressed{suffix}"
    return f"{method}{suffix}"
