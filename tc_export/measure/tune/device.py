"""Tuning for a device this machine cannot time: candidates out in a bundle, the device's latencies back in.

``tc-export tune MODEL --candidates N --target jetson-orin-nano -o bundle/`` writes N candidate schedules (their
recipes, ONNX files and the fidelity measured here) and ``time_engines.py``, which on the device builds each
engine with ``trtexec`` and writes ``device.json``; ``tc-export tune MODEL --latencies device.json --speedup X``
then picks the best-scoring candidate that meets the target. The device side is untested here (no GPU, no
TensorRT): only the pick from a latencies file is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import ConfigError

DEVICE_SCHEMA = "tc-export.device-latencies/1"

TIME_ENGINES = '''"""Build and time every ONNX file of this bundle with trtexec; write device.json for tc-export tune.

    python time_engines.py [--trtexec trtexec] [--fp16] [-o device.json]
"""
import argparse, json, re, subprocess, sys
from pathlib import Path

here = Path(__file__).resolve().parent
parser = argparse.ArgumentParser()
parser.add_argument("--trtexec", default="trtexec")
parser.add_argument("--fp16", action="store_true")
parser.add_argument("-o", "--output", default=str(here / "device.json"))
args = parser.parse_args()
document = json.loads((here / "candidates.json").read_text())
median = re.compile(r"GPU Compute Time:.*?median = ([0-9.]+) ms")


def time(onnx):
    command = [args.trtexec, f"--onnx={here / onnx}", f"--saveEngine={here / onnx}.engine"] + (
        ["--fp16"] if args.fp16 else [])
    text = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    found = median.search(text)
    if not found:
        sys.exit(f"no GPU compute time in trtexec's output for {onnx}")
    return float(found.group(1))


document["uncompressed_ms"] = time(document["uncompressed_onnx"])
for candidate in document["candidates"]:
    candidate["latency_ms"] = time(candidate["onnx"])
    print(candidate["label"], candidate["latency_ms"], "ms")
document["schema"] = "tc-export.device-latencies/1"
Path(args.output).write_text(json.dumps(document, indent=2) + "\\n")
print("wrote", args.output)
'''


def candidate_entries(scored: list[Any], model: str, recipe_text: Any) -> list[dict[str, Any]]:
    return [{"label": s.schedule.label, "family": s.schedule.family, "score": s.score,
             "recipe": recipe_text(s), "onnx": f"candidate{i}.onnx", "predicted_ms_here": round(s.predicted_ms, 3)}
            for i, s in enumerate(scored)]


def pick(path: Path, speedup: float | None, latency_ms: float | None) -> dict[str, Any]:
    """The best-scoring candidate of a latencies file that meets the target (a speed-up or a latency)."""
    if not path.is_file():
        raise ConfigError(f"--latencies {path} does not exist: run time_engines.py of the tune bundle on the device")
    try:
        document = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConfigError(f"--latencies {path} is not JSON: pass the device.json time_engines.py wrote") from None
    if not isinstance(document, dict) or document.get("schema") != DEVICE_SCHEMA:
        raise ConfigError(f"--latencies {path}: not a {DEVICE_SCHEMA} document (write it with time_engines.py)")
    candidates = document.get("candidates") or []
    base = document.get("uncompressed_ms")
    if not isinstance(base, (int, float)) or base <= 0:
        raise ConfigError(f"--latencies {path}: no uncompressed_ms")
    if not all(isinstance(c.get("latency_ms"), (int, float)) and "recipe" in c for c in candidates) or not candidates:
        raise ConfigError(f"--latencies {path}: every candidate needs latency_ms and recipe")
    if (speedup is None) == (latency_ms is None):
        raise ConfigError("--latencies needs exactly one target: --speedup X or --latency-ms MS")
    target = latency_ms if latency_ms is not None else base / speedup  # type: ignore[operator]
    meeting = [c for c in candidates if c["latency_ms"] <= target]
    if not meeting:
        fastest = min(candidates, key=lambda c: c["latency_ms"])
        raise ConfigError(f"--latencies {path}: no candidate meets {target:.2f} ms; the fastest, {fastest['label']}, "
                          f"takes {fastest['latency_ms']:.2f} ms ({base / fastest['latency_ms']:.2f}x)")
    best = max(meeting, key=lambda c: (c.get("score") or 0.0, -c["latency_ms"]))
    return dict(best, target_ms=target, speedup=base / best["latency_ms"])


def write_bundle(folder: Path, loaded: Any, rows: list[Any], batch: int, target: str, metric: str,
                 recipe_text: Any) -> Path:
    """The candidates' ONNX files, candidates.json and time_engines.py in ``folder``."""
    from ...job.compress import compress
    from ...export.onnx_export import ExportConfig, write_onnx

    folder.mkdir(parents=True, exist_ok=True)
    inputs = loaded.example_inputs(batch=batch)
    names = {spec.name: spec.export_name for spec in loaded.inputs}

    def export(module: Any, name: str) -> None:
        write_onnx(module, inputs, folder / name, ExportConfig(batch=batch), input_names=[names[k] for k in inputs],
                   output_names=loaded.output_names)

    export(loaded.module, "uncompressed.onnx")
    entries = candidate_entries(rows, loaded.name, recipe_text)
    for entry, scored in zip(entries, rows):
        export(compress(loaded, list(scored.schedule.stages), inputs).module, entry["onnx"])
    document = {"model": loaded.name, "batch": batch, "target_device": target, "metric": metric,
                "uncompressed_onnx": "uncompressed.onnx", "candidates": entries}
    (folder / "candidates.json").write_text(json.dumps(document, indent=2) + "\n")
    (folder / "time_engines.py").write_text(TIME_ENGINES)
    return folder
