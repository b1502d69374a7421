"""Reproduce the benchmark tables of the docs pages (docs/speed.md, docs/tune.md, ...) and plots in one run.

    python benchmarks/readme_tables.py [--out benchmarks/results] [--repeats 3] [--runs 40] [--smoke]

Writes ``tables.md`` (the tables the docs pages show, with the machine and load they were measured under),
one ``tc-export.bench/1`` JSON per section and the plots of the MNIST sweep. Sections:

- ``vit_b``: ToMe r=16 against the uncompressed ViT-B at batch 1 and 8, ``--repeats`` independent runs (the spread);
- ``stack``: ToMe r=8 / r=16, fp32 and int8, with the ORT-optimized uncompressed baseline and eager reference ToMe;
- ``deit_s``: the shipped EViT recipe (Top-K keep 0.7 at blocks 3, 6, 9, fused token) on DeiT-S;
- ``mnist``: held-out accuracy against speed-up for every method on the MNIST ViT trained in this repository,
  with an int8 row on top of the compressed models, and per method the fastest configuration within 1 point.

- ``floor``: ``token_count_floor.py`` (ToMe against a model with its token counts and no merge work);
- ``long``: ``long_sequences.py`` at 1,500 frames (Whisper encoder: ToMe, windowed ToMe, adjacent merging);
- ``projectors``: ``projector_recipes.py`` (each vision-language recipe: tower alone against tower + projector);
- ``memory``: ``export_memory.py`` (export wall time and peak resident memory, vit_b and vit_l at 336 px).
``--smoke`` runs the sections on tiny settings so the script cannot rot (its numbers mean nothing; it writes
into ``./readme-tables-smoke`` and leaves out the sections that run other scripts, which have smoke modes of
their own). ``--sections`` measures some sections again; ``tables.md`` keeps the others from earlier runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tc_export.measure.bench_job import SweepConfig, run_sweep
from tc_export.measure.bench_report import document, footnote, markdown_table, write_json, write_plots
from tc_export.models import ModelOptions, load_model
from tc_export.measure.sweep import Candidate, expand, parse_config_spec, parse_sweep

MNIST_SWEEPS = {  # method -> (config spec, sweep); every one reaches the method's strongest setting
    "tome": ("tome", "r=8,16,24,32,40,48,64,80,98"),
    "adjacent": ("adjacent", "r=8,16,24,32,40,48,64,80,98"),
    "topk": ("topk layers=1,2,3", "keep=0.9,0.8,0.7,0.6,0.5,0.4,0.3,0.25"),
    "prumerge": ("prumerge tokens=64 layers=1", "tokens=128,96,64,48,32,24,16"),
}


SECTIONS = ("vit_b", "stack", "deit_s", "mnist", "floor", "long", "projectors", "memory")
SCRIPTS = ("floor", "long", "projectors", "memory")  # sections that run another script of this folder


def candidates(specs: Sequence[str], sweeps: Sequence[str] = ()) -> list[Candidate]:
    return expand([parse_config_spec(spec) for spec in specs], [parse_sweep(s) for s in sweeps])


def measure(model: str, cands: Sequence[Candidate], config: SweepConfig, out: Path, name: str,
            options: ModelOptions | None = None) -> list[dict[str, Any]]:
    loaded = load_model(model, options or ModelOptions(), warn_random=False)
    started = time.perf_counter()
    rows = run_sweep(loaded, cands, config, say=lambda line: print(f"  {line}", flush=True))
    doc = document(rows, {"model": model, "candidates": [c.label for c in cands], "section": name,
                          "seconds": round(time.perf_counter() - started, 1), **config.as_dict()})
    doc["machine"]["load_average"] = list(os.getloadavg())
    write_json(doc, out / f"{name}.json")
    return rows


def script_section(script: str, argv: Sequence[str]) -> str:
    """Run another benchmark script of this folder and keep the Markdown table it prints."""
    command = [sys.executable, str(Path(__file__).parent / script), *argv]
    print(f"  $ {' '.join(command[1:])}", flush=True)
    printed = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return "\n".join(line for line in printed.splitlines() if line.startswith("|"))


def spread_table(runs: list[list[dict[str, Any]]]) -> str:
    """One line per batch: the compressed model's speed-up in each repeat, and their range and median."""
    lines = ["| batch | uncompressed (ms, median of runs) | ToMe r=16 (ms) | speed-up per run | range | median | "
             "MAC ratio |", "|---|---|---|---|---|---|---|"]
    batches = sorted({row["batch"] for rows in runs for row in rows})
    for batch in batches:
        picked = [[r for r in rows if r["batch"] == batch and r["kind"] == "compressed"] for rows in runs]
        ups = [rows[0]["speedup"] for rows in picked]
        base = statistics.median(rows[0]["baseline_ms"] for rows in picked)
        ms = statistics.median(rows[0]["latency_ms"]["median"] for rows in picked)
        lines.append(f"| {batch} | {base:.1f} | {ms:.1f} | {' '.join(f'{u:.2f}x' for u in ups)} | "
                     f"{min(ups):.2f}x-{max(ups):.2f}x | {statistics.median(ups):.2f}x | "
                     f"{picked[0][0]['mac_ratio']:.2f}x |")
    return "\n".join(lines)


def trade_off(rows: Sequence[dict[str, Any]], points: float = 0.01) -> str:
    """Per method and precision: the fastest configuration within ``points`` of the uncompressed accuracy, and the
    first configuration (by speed-up) that is more than that below it."""
    base = next(r for r in rows if r["kind"] == "uncompressed" and r["precision"] == "fp32")["accuracy"]
    lines = [f"Uncompressed held-out accuracy: {base:.2%}.", "",
             "| method | fastest within 1 point | its speed-up | its accuracy | first > 1 point down | its speed-up |"
             " its accuracy |", "|---|---|---|---|---|---|---|"]
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["kind"] == "compressed":
            groups.setdefault(row["method"] + (" int8" if row["precision"] == "int8" else ""), []).append(row)
    for method, group in groups.items():
        group = sorted(group, key=lambda r: r["speedup"])
        within = [r for r in group if r["accuracy"] >= base - points]
        below = [r for r in group if r["accuracy"] < base - points]
        best = max(within, key=lambda r: r["speedup"]) if within else None
        first = below[0] if below else None
        cell = (lambda r: [r["label"], f"{r['speedup']:.2f}x", f"{r['accuracy']:.2%}"] if r else ["none", "-", "-"])
        lines.append(f"| {method} | " + " | ".join(cell(best) + cell(first)) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results")
    parser.add_argument("--repeats", type=int, default=3, help="independent vit_b runs (the spread)")
    parser.add_argument("--runs", type=int, default=40, help="timed runs per model (interleaved)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated; tables.md keeps the "
                        "sections an earlier run measured")
    parser.add_argument("--mnist-batch", type=int, default=64, help="batch of the MNIST sweep: the ViT is tiny, "
                        "at small batches per-op overhead hides what the token counts save")
    parser.add_argument("--smoke", action="store_true", help="tiny settings: checks the script, numbers mean nothing")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    args.out = args.out or (Path("readme-tables-smoke") if args.smoke else Path(__file__).parent / "results")
    args.out.mkdir(parents=True, exist_ok=True)
    sections = [s for s in args.sections.split(",") if not (args.smoke and s in SCRIPTS)]
    runs = 3 if args.smoke else args.runs
    vit = "vit_t" if args.smoke else "vit_b"
    small = ModelOptions(img_size=64) if args.smoke else None
    texts: dict[str, list[str]] = {}

    def section(name: str, title: str) -> list[str]:
        """Start a section: its Markdown lines (title, load average now), written to ``<name>.md`` at the end."""
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        texts[name] = [f"## {title}\n", f"Load average at the start of this section: {load}.\n"]
        return texts[name]

    if "vit_b" in sections:
        print(f"[vit_b] ToMe r=16, batch 1 and 8, {args.repeats} repeats", flush=True)
        md = section("vit_b", "vit_b ToMe r=16: the spread over independent runs")
        spec, batches = ("tome r=2", (1,)) if args.smoke else ("tome r=16", (1, 8))
        repeats = [measure(vit, candidates([spec]), SweepConfig(batches=batches, runs=runs, samples=8),
                           args.out, f"vit_b_repeat{i}", small) for i in range(1 if args.smoke else args.repeats)]
        md += [spread_table(repeats), ""]
    if "stack" in sections:
        print("[stack] ToMe r=8 / r=16, int8, tuned and eager baselines", flush=True)
        md = section("stack", "vit_b: int8 on top of ToMe, against the tuned and the eager-reference baselines")
        rows = measure(vit, candidates(["tome r=1", "tome r=2"] if args.smoke else ["tome r=8", "tome r=16"]),
                       SweepConfig(batches=(1,), runs=runs, int8=True, baselines=True, samples=8),
                       args.out, "vit_b_stack", small)
        md += [markdown_table(rows), ""]
    if "deit_s" in sections:
        print("[deit_s] EViT recipe", flush=True)
        md = section("deit_s", "DeiT-S Top-K keep 0.7 at blocks 3, 6, 9 (EViT, fused token)")
        rows = measure("vit_t" if args.smoke else "deit_s",
                       candidates(["topk keep=0.7 layers=3,6,9 fuse=true" if not args.smoke else "topk keep=0.7"]),
                       SweepConfig(batches=(1,), runs=runs, samples=8), args.out, "deit_s_topk", small)
        md += [markdown_table(rows), ""]
    if "mnist" in sections:
        print("[mnist] accuracy against speed-up, every method", flush=True)
        md = section("mnist", f"MNIST ViT: held-out accuracy against measured speed-up (batch {args.mnist_batch})")
        specs = {m: MNIST_SWEEPS[m] for m in (["tome", "topk"] if args.smoke else MNIST_SWEEPS)}
        cands = [c for spec, sweep in specs.values()
                 for c in candidates([spec], [sweep if not args.smoke else sweep.split(",")[0]])]
        rows = measure("mnist_vit", cands, SweepConfig(batches=(args.mnist_batch,), runs=runs, int8=True, samples=64),
                       args.out, "mnist_sweep")
        md += [trade_off(rows), "", markdown_table(rows), ""]
        write_plots(rows, args.out / "plots")
    scripts = {
        "floor": ("vit_b: ToMe against a model with its token counts and no merge work", "token_count_floor.py",
                  ["--model", "vit_b", "--r", "16", "--batch", "1", "--batch", "8", "--runs", str(args.runs)]),
        "long": ("Long sequences: Whisper tiny encoder at 1,500 frames, about 2x fewer MACs", "long_sequences.py",
                 ["--frames", "1500", "--runs", "10", "--window", "16", "--window", "64"]),
        "projectors": ("Vision-language recipes: the tower alone and with its projector (batch 1)",
                       "projector_recipes.py", ["--runs", "10"]),
        "memory": ("Export cost: wall time and peak resident memory of the whole job", "export_memory.py",
                   ["--models", "vit_b,vit_l", "--img-size", "336"]),
    }
    for name, (title, script, argv) in scripts.items():
        if name in sections:
            print(f"[{name}] {script}", flush=True)
            section(name, title).extend([script_section(script, argv), ""])
    for name, lines in texts.items():
        (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    write_tables(args.out)


def write_tables(out: Path) -> None:
    """``tables.md``: every section measured so far (this run's or an earlier one's), in a fixed order."""
    parts = ["# Benchmark tables (`python benchmarks/readme_tables.py`)\n"]
    parts += [(out / f"{name}.md").read_text() for name in SECTIONS if (out / f"{name}.md").is_file()]
    documents = sorted(out.glob("*.json"), key=lambda path: path.stat().st_mtime)
    if documents:
        doc = json.loads(documents[-1].read_text())
        parts.append(footnote(doc["config"], doc["machine"]).strip()
                     + f" Versions: {', '.join(f'{k} {v}' for k, v in doc['versions'].items() if v)}.\n")
    (out / "tables.md").write_text("\n".join(parts))
    print(f"wrote {out / 'tables.md'}")


if __name__ == "__main__":
    main()
