"""What ``tc-export tune`` shows: the table of measured schedules, its JSON document, the plot, the recipe."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...errors import ConfigError

SCHEMA_ID = "tc-export.tune/1"
RANDOM_INPUTS_WARNING = ("no --calib: scored on seeded inputs. Random inputs rank schedules poorly (they do not "
                         "look like the data the model sees); pass --calib with a few hundred real inputs")


def rows(result: Any, measured: Sequence[Any], baseline_ms: float, times: Sequence[float], shape: Any,
         show: Any) -> list[dict[str, Any]]:
    """One dict per measured schedule, with prediction error, measured speed-up and Pareto flag."""
    from .search import tokens_of

    out = []
    for scored, ms in zip(measured, times):
        out.append({
            "label": scored.schedule.label, "family": scored.schedule.family,
            "tuned": scored is result.best,
            "stages": [_stage(s) for s in scored.schedule.stages],
            "tokens_per_layer": tokens_of(scored, shape),
            "predicted_ms": round(scored.predicted_ms, 3), "measured_ms": round(ms, 3),
            # The error of the predicted speed-up: the table and the final loop are timed minutes apart, and a
            # load change between them scales every time alike (the table's drift is reported on its own).
            "error_pct": round(100.0 * (result.table.baseline_ms / scored.predicted_ms) / (baseline_ms / ms) - 100.0,
                               2),
            "speedup": round(baseline_ms / ms, 4), "predicted_speedup": round(result.table.baseline_ms /
                                                                             scored.predicted_ms, 4),
            "score": scored.score, "shown": show(scored.score),
        })
    for row in out:
        row["pareto"] = not any(o is not row and o["speedup"] >= row["speedup"] and o["score"] >= row["score"]
                                and (o["speedup"] > row["speedup"] or o["score"] > row["score"]) for o in out)
    return sorted(out, key=lambda r: -r["speedup"])


def _stage(stage: object) -> dict[str, Any]:
    from .schedule import stage_dict

    return stage_dict(stage)


def _head(metric: str) -> list[str]:
    return ["schedule", "family", "tokens per layer", "measured (ms)", "speed-up", "predicted", "error", metric,
            "Pareto"]


def _cells(row: Mapping[str, Any]) -> list[str]:
    """One measured row's cells, in ``_head``'s order."""
    return [row["label"] + (" (tuned)" if row["tuned"] else ""), row["family"],
            " ".join(map(str, row["tokens_per_layer"])), f"{row['measured_ms']:.1f}", f"{row['speedup']:.2f}x",
            f"{row['predicted_speedup']:.2f}x", f"{row['error_pct']:+.1f}%", str(row["shown"]),
            "yes" if row["pareto"] else ""]


def markdown(document: Mapping[str, Any]) -> str:
    """The table a person reads: measured speed-up first, prediction and its error beside it."""
    head = _head(document["metric"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append(f"| uncompressed | - | {document['table']['tokens']} | {document['baseline_ms']:.1f} | 1.00x | - | - "
                 f"| {document['baseline_shown']} | |")
    for row in document["rows"]:
        cells = _cells(row)
        if row["tuned"]:
            cells[0] = f"**{row['label']}** (tuned)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(document: Mapping[str, Any]) -> str:
    errors = [abs(r["error_pct"]) for r in document["rows"]]
    tuned = next((r for r in document["rows"] if r["tuned"]), None)
    text = [f"target {document['target_ms']:.1f} ms at batch {document['table']['batch']} "
            f"(uncompressed {document['table']['measured_ms'][str(document['table']['tokens'])]:.1f} ms in the table)",
            f"search: {document['evaluations']} schedules scored in {document['search_seconds'] / 60:.1f} min",
            f"latency model: predicted speed-ups off by a median {sorted(errors)[len(errors) // 2]:.1f}%, max "
            f"{max(errors):.1f}% (ORT CPU; the table's uncompressed time is {_drift(document):+.1f}% from the final "
            f"loop's, the machine's drift between the two)" if errors else "latency model: nothing measured"]
    if tuned:
        text.append(f"tuned: {tuned['label']}: {tuned['speedup']:.2f}x measured ({tuned['predicted_speedup']:.2f}x "
                    f"predicted), {tuned['shown']} vs {document['baseline_shown']} uncompressed")
    for family, ms in document.get("unreachable", {}).items():
        text.append(f"{family}: cannot reach the target (strongest member predicted {ms:.1f} ms)")
    return "\n".join(text)


def _drift(document: Mapping[str, Any]) -> float:
    table = document["table"]["measured_ms"][str(document["table"]["tokens"])]
    return 100.0 * (table - document["baseline_ms"]) / document["baseline_ms"]


def write_plot(document: Mapping[str, Any], path: Path) -> Path:
    """Measured speed-up against the metric; accuracy in percent with the 1-point band."""
    from ..bench_report import metric_axis, require_matplotlib

    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    metric = document["metric"]
    scale = 100.0 if metric == "accuracy" else 1.0
    ys = [r["score"] * scale for r in document["rows"]]
    families: dict[str, list[tuple[float, float]]] = {}
    for row, y in zip(document["rows"], ys):
        families.setdefault("tuned" if row["tuned"] else row["family"], []).append((row["speedup"], y))
    for name, points in sorted(families.items()):
        ax.scatter([p[0] for p in points], [p[1] for p in points], label=name, s=60 if name == "tuned" else 30,
                   marker="*" if name == "tuned" else "o")
    ax.scatter([1.0], [document["baseline_score"] * scale], color="black", marker="s", label="uncompressed")
    metric_axis(ax, metric, document["baseline_score"] * scale, ys)
    ax.axvline(document["table"]["measured_ms"][str(document["table"]["tokens"])] / document["target_ms"],
               color="grey", linestyle=":", label="target speed-up")
    ax.set_xlabel("measured speed-up vs uncompressed (same loop)")
    ax.set_title(f"{document['model']}: tune, batch {document['table']['batch']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_text(path: Path, text: str) -> None:
    """Write under a temporary name, then rename: never a half-written file."""
    if not path.resolve().parent.is_dir():
        raise ConfigError(f"cannot write {path}: directory {path.resolve().parent} does not exist")
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)


def write_json(document: Mapping[str, Any], path: Path) -> None:
    write_text(path, json.dumps(document, indent=2) + "\n")


def html_section(document: Mapping[str, Any]) -> str:
    """The tune section of ``tc-export report``: summary, table, plot."""
    import base64
    import html
    import tempfile

    parts = [f"<h2>Tune: {html.escape(document['model'])}</h2>",
             "<pre>" + html.escape(summary(document)) + "</pre>",
             '<table id="tune"><thead><tr>']
    head = _head(document["metric"])
    parts[-1] += "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"
    for row in document["rows"]:
        parts.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(row)) + "</tr>")
    parts.append("</tbody></table>")
    if document.get("calib_warning"):
        parts.append(f'<p class="note">{html.escape(document["calib_warning"])}</p>')
    with tempfile.TemporaryDirectory(prefix="tc-export-tune-") as folder:
        path = write_plot(document, Path(folder) / "tune.png")
        data = base64.b64encode(path.read_bytes()).decode("ascii")
    parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="tune plot"><figcaption>measured speed-up vs '
                 f'{html.escape(document["metric"])}</figcaption></figure>')
    return "\n".join(parts)
