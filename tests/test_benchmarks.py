"""Every script under benchmarks/ runs end to end in a tiny mode, so none of them can rot unnoticed."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
# Tiny arguments per script; a script not listed here is run with --smoke (add that flag to new scripts).
TINY_ARGS = {
    "minilm_fidelity.py": ["--sentences", "8", "--length", "16", "--r", "2", "--method", "tome"],
    "relative_bias_rules.py": ["--epochs", "0", "--samples", "8", "--r", "2"],
    "train_mnist_vit.py": ["--low-epochs", "0", "--full-epochs", "0", "-o", "{tmp}/mnist_vit.safetensors"],
}
SCRIPTS = sorted(path.name for path in BENCHMARKS.glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_runs_in_tiny_mode(script, tmp_path):
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in TINY_ARGS.get(script, ["--smoke"])]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                            timeout=900, cwd=tmp_path, env=env)
    assert result.returncode == 0, f"{script} failed:\n{result.stderr[-2000:]}"


def test_export_memory_smoke_prints_the_table(tmp_path):
    """benchmarks/export_memory.py --smoke: one vit_t row with a measured peak above the weights."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, str(BENCHMARKS / "export_memory.py"), "--smoke"], capture_output=True,
                            text=True, timeout=900, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("| model | image size | fp32 weights (GB) |")
    row = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert row[0].startswith("vit_t") and row[1] == "224"
    weights, seconds, peak = float(row[2]), float(row[3]), float(row[4])
    assert 0 < weights < peak and seconds > 0
    assert float(row[5].rstrip("x")) > 1


def test_units_speed_smoke_prints_the_table(tmp_path):
    """benchmarks/units_speed.py --smoke (a 2-layer Qwen2-VL tower + its merger, 16 merge units): unit Top-K hands the
    language model ceil(keep x 16) tokens, every compressed row costs fewer MACs than the uncompressed one."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, str(BENCHMARKS / "units_speed.py"), "--smoke"], capture_output=True,
                            text=True, timeout=900, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout[result.stdout.index("| configuration |"):].strip().splitlines()
    lines = list(itertools.takewhile(lambda line: line.startswith("|"), text))  # the machine's load follows
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    assert len(rows) == 5 and text[len(lines) + 1].startswith("Machine load average")
    assert rows["uncompressed"][1] == "64 x2" and rows["uncompressed"][2] == "16"
    assert rows["unit Top-K keep=0.5 @0 (received)"][1:3] == ["64, 32", "8"]
    assert rows["unit Top-K keep=0.25 @0 (received)"][1:3] == ["64, 16", "4"]
    assert rows["unit ToMe r=4 @0-1"][1:3] == ["64, 48", "8"]
    assert all(float(cells[4].rstrip("x")) > 1 for name, cells in rows.items() if name != "uncompressed")

def test_docs_show_the_measured_tables():
    """The docs pages' benchmark tables are the ones `python benchmarks/readme_tables.py` wrote (first table of
    each section file in benchmarks/results), not numbers typed by hand."""
    pages = [BENCHMARKS.parent / "README.md", *sorted((BENCHMARKS.parent / "docs").glob("*.md"))]
    readme = "\n".join(page.read_text() for page in pages)
    sections = sorted(path for path in (BENCHMARKS / "results").glob("*.md") if path.name != "tables.md")
    assert sections, "benchmarks/results holds no section tables: run python benchmarks/readme_tables.py"
    for path in sections:
        lines = path.read_text().splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("|"))
        table = "\n".join(line for line in itertools.takewhile(lambda x: x.startswith("|"), lines[start:]))
        assert table in readme, f"no docs page shows the table of {path.name}: copy it from there"
