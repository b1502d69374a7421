"""``tc-export report``: one self-contained HTML page from a ``tc-export bench --json`` results file.

The page needs nothing but itself: styles inline, plots embedded as base64 PNG (matplotlib, Agg backend, drawn by
``bench_report.write_plots``), no scripts or fonts from elsewhere. It holds the results table, a trade-off summary
per method (where accuracy first drops by more than a point), the run's configuration, the machine and the
versions. A small inline script marks ``<body data-plots="ok">`` once every image has decoded, which the browser
test reads.
"""

from __future__ import annotations

import base64
import html
import importlib.util
import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .bench_report import SCHEMA_ID, row_name, validate, write_plots
from ..errors import BackendUnavailableError, ConfigError

TUNE_SCHEMA_ID = "tc-export.tune/1"
ACCURACY_DROP = 0.01  # "within a point": the summary's tolerance on held-out accuracy

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; }
tr.uncompressed td { background: #f8f8f0; }
figure { display: inline-block; margin: .5em 1em .5em 0; } figcaption { font-size: .9em; color: #555; }
img { max-width: 100%; } code { font-size: .92em; } .note { color: #555; font-size: .92em; }
"""

# Sets data-plots on <body>: "ok" when every image decoded (naturalWidth > 0), else "broken"; and how many did.
_CHECK_IMAGES = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var decoded = images.filter(function (img) { return img.complete && img.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images-decoded", decoded + "/" + images.length);
  document.body.setAttribute("data-plots", decoded === images.length ? "ok" : "broken");
});
"""


def load_results(path: str | Path) -> dict[str, Any]:
    """Read and validate a results file; any problem is a one-line ConfigError saying what to do."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"results file {path} does not exist: write one with tc-export bench MODEL --json {path}")
    try:
        document = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"results file {path} is not JSON ({error}): pass the file tc-export bench --json wrote")
    schema = document.get("schema") if isinstance(document, dict) else None
    if schema == TUNE_SCHEMA_ID and isinstance(document.get("rows"), list) and "table" in document:
        return document
    if schema != SCHEMA_ID:
        found = "no schema field" if schema is None else f"schema {schema!r}"
        raise ConfigError(f"results file {path} has {found}; this tc-export reads {SCHEMA_ID!r} (or "
                          f"{TUNE_SCHEMA_ID!r} from tc-export tune --json): "
                          "rerun tc-export bench --json with this version")
    problems = validate(document)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError(f"results file {path} is not a valid {SCHEMA_ID} document: {problems[0]}{more}")
    return document


def render_tune(document: Mapping[str, Any], title: str | None = None) -> str:
    """A page for a ``tc-export tune --json`` document: its section (summary, table, plot) and configuration."""
    from .tune.output import html_section

    title = title or f"tc-export tune: {document['model']}"
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head>", '<body data-plots="pending">',
        f"<h1>{_e(title)}</h1>", html_section(document),
        "<h2>Configuration</h2>", _key_value_table(document["config"]),
        "<h2>Latency table</h2>", _key_value_table(document["table"]),
        f"<script>{_CHECK_IMAGES}</script>", "</body></html>"]) + "\n"


def render_report(document: Mapping[str, Any], title: str | None = None,
                  tune_documents: Sequence[Mapping[str, Any]] = ()) -> str:
    """The whole page as one HTML string (``document`` already validated); tune results get their section."""
    if document.get("schema") == TUNE_SCHEMA_ID:
        return render_tune(document, title)
    rows = list(document["rows"])
    models = sorted({row["model"] for row in rows})
    title = title or f"tc-export bench: {', '.join(models) or 'no rows'}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head>",
        '<body data-plots="pending">',
        f"<h1>{_e(title)}</h1>",
        f'<p class="note">{len(rows)} measured rows; schema <code>{_e(document["schema"])}</code>. Speed-up is '
        "against the uncompressed fp32 model timed in the same run; fidelity compares outputs with it; accuracy "
        "is the model's held-out accuracy where it has one.</p>",
        "<h2>Results</h2>",
        _results_table(rows),
    ]
    summary = _summary_table(rows)
    if summary:
        parts += ["<h2>Trade-off: accuracy against speed-up</h2>", summary]
    if tune_documents:
        from .tune.output import html_section

        parts += [html_section(tuned) for tuned in tune_documents]
    plots = _plots(rows)
    if plots:
        parts.append("<h2>Plots</h2>")
        parts += [f'<figure><img src="data:image/png;base64,{data}" alt="{_e(name)}">'
                  f"<figcaption>{_e(name)}</figcaption></figure>" for name, data in plots]
    parts += [
        "<h2>Configuration</h2>", _key_value_table(document["config"]),
        "<h2>Machine</h2>", _key_value_table(document["machine"]),
        "<h2>Versions</h2>", _key_value_table(document["versions"]),
        f"<script>{_CHECK_IMAGES}</script>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_report(document: Mapping[str, Any], output: str | Path, title: str | None = None,
                 tune_documents: Sequence[Mapping[str, Any]] = ()) -> Path:
    """Render and write the page (under a temporary name, renamed when complete)."""
    output = Path(output)
    if not output.resolve().parent.is_dir():
        raise ConfigError(f"cannot write {output}: directory {output.resolve().parent} does not exist")
    page = render_report(document, title, tune_documents)
    temporary = output.with_name(output.name + ".tmp")
    temporary.write_text(page, encoding="utf-8")
    temporary.replace(output)
    return output


def accuracy_tradeoff(rows: Sequence[Mapping[str, Any]], drop: float = ACCURACY_DROP) -> list[dict[str, Any]]:
    """Per (method, batch): the baseline accuracy, the fastest row within ``drop`` of it, and the first row (by
    speed-up) that loses more than ``drop``. Only rows with an accuracy count; the baseline is the uncompressed
    fp32 row of the same batch."""
    out = []
    for batch in sorted({row["batch"] for row in rows}):
        same = [row for row in rows if row["batch"] == batch and row["accuracy"] is not None]
        base = next((r for r in same if r["method"] == "none" and r.get("precision", "fp32") == "fp32"
                     and r.get("kind", "uncompressed") == "uncompressed"), None)
        if base is None:
            continue
        curves: dict[str, list[Mapping[str, Any]]] = {}
        for row in same:
            if row is not base:
                curves.setdefault(_curve(row), []).append(row)
        for name, members in sorted(curves.items()):
            members.sort(key=lambda r: r["speedup"])
            kept = [r for r in members if base["accuracy"] - r["accuracy"] <= drop]
            lost = [r for r in members if base["accuracy"] - r["accuracy"] > drop]
            out.append({"curve": name, "batch": batch, "baseline": base["accuracy"],
                        "best_within": max(kept, key=lambda r: r["speedup"]) if kept else None,
                        "first_drop": lost[0] if lost else None})
    return out


def _results_table(rows: Sequence[Mapping[str, Any]]) -> str:
    tuned = any("speedup_vs_tuned" in row for row in rows)
    head = ["model", "configuration", "batch", "tokens per layer", "MACs (G)", "MAC ratio", "median (ms)", "p90 (ms)",
            "throughput (/s)", "speed-up"] + (["vs tuned"] if tuned else []) + [
            "top-1 agreement", "cosine", "KL", "accuracy"]
    lines = ['<table id="results"><thead><tr>' + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for row in rows:
        fidelity = row["fidelity"]
        tokens = row.get("tokens_per_layer")
        cells = [
            _e(row["model"]), _e(row_name(row)), _n(row["batch"]),
            _e(" ".join(map(str, tokens))) if tokens else "-",
            _n(f"{row['macs'] / 1e9:.3f}"), _n(f"{row['mac_ratio']:.2f}x"),
            _n(f"{row['latency_ms']['median']:.2f}"), _n(f"{row['latency_ms']['p90']:.2f}"),
            _n(f"{row['throughput']:.1f}"), _n(f"{row['speedup']:.2f}x"),
        ]
        if tuned:
            cells.append(_n(f"{row['speedup_vs_tuned']:.2f}x" if "speedup_vs_tuned" in row else "-"))
        cells += [
            _n("-" if fidelity["top1_agreement"] is None else f"{fidelity['top1_agreement']:.1%}"),
            _n("-" if fidelity["cosine"] is None else f"{fidelity['cosine']:.4f}"),
            _n("-" if fidelity["kl"] is None else f"{fidelity['kl']:.2e}"),
            _n("-" if row["accuracy"] is None else f"{row['accuracy']:.2%}"),
        ]
        kind = "uncompressed" if row["method"] == "none" else "compressed"
        lines.append(f'<tr class="result {kind}" data-label="{_e(row_name(row))}" data-batch="{row["batch"]}">'
                     + "".join(cell if cell.startswith("<td") else f"<td>{cell}</td>" for cell in cells) + "</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _summary_table(rows: Sequence[Mapping[str, Any]]) -> str:
    entries = accuracy_tradeoff(rows)
    if not entries:
        return ""
    points = f"{ACCURACY_DROP * 100:g} point"
    head = ["method", "batch", "uncompressed accuracy", f"fastest within {points}", f"first drop > {points}"]
    lines = ['<table id="tradeoff"><thead><tr>' + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for entry in entries:
        cells = [_e(entry["curve"]), _n(entry["batch"]), _n(f"{entry['baseline']:.2%}"),
                 _point(entry["best_within"]), _point(entry["first_drop"])]
        lines.append("<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in cells) + "</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _point(row: Mapping[str, Any] | None) -> str:
    if row is None:
        return "none"
    return _e(f"{row['speedup']:.2f}x ({row_name(row)}: {row['accuracy']:.2%})")


def _plots(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(name, base64 PNG) for every plot ``write_plots`` draws; none for an empty result set."""
    if not rows:
        return []
    if importlib.util.find_spec("matplotlib") is None:
        raise BackendUnavailableError(
            "tc-export report draws its plots with matplotlib: pip install 'tc-export[report]'")
    with tempfile.TemporaryDirectory(prefix="tc-export-report-") as folder:
        paths = write_plots(rows, Path(folder))
        return [(path.stem.replace("_", " "), base64.b64encode(path.read_bytes()).decode("ascii")) for path in paths]


def _key_value_table(mapping: Mapping[str, Any]) -> str:
    lines = ["<table><tbody>"]
    for key, value in mapping.items():
        lines.append(f"<tr><th>{_e(key)}</th><td>{_e(_show(value))}</td></tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)) and all(not isinstance(v, (dict, list)) for v in value):
        return ", ".join(_show(v) for v in value) or "-"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _curve(row: Mapping[str, Any]) -> str:
    suffix = (" int8" if row.get("precision") == "int8" else "") + (
        f" [{row['backend']}]" if row.get("backend", "ort") != "ort" else "")
    if row.get("kind") == "reference":
        return "tome (reference eager)" + suffix
    if row.get("kind") == "baseline-tuned":
        return "uncompressed (ORT optimizer)" + suffix
    return ("uncompressed" if row["method"] == "none" else row["method"]) + suffix


def _n(value: Any) -> str:
    return f'<td class="num">{_e(value)}</td>'


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)

