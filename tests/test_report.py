"""The HTML report page: schema checks, its tables and summary, and the page as a real browser renders it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tc_export.errors import ConfigError

pytest.importorskip("matplotlib")

from tc_export.measure.report import accuracy_tradeoff, load_results, write_report  # noqa: E402

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)), None)


def _row(label: str, method: str, batch: int, speedup: float, accuracy: float | None, **extra: object) -> dict:
    base_ms = 10.0 * batch
    return {
        "model": "mnist_vit", "method": method, "label": label, "params": {}, "backend": "ort", "batch": batch,
        "threads": 2, "tokens_per_layer": [197, 189, 181, 173, 165], "macs": int(60e6 / speedup),
        "mac_ratio": speedup * 1.05, "latency_ms": {"median": base_ms / speedup, "p90": base_ms / speedup * 1.1},
        "baseline_ms": base_ms, "speedup": speedup, "throughput": 1000 * batch / (base_ms / speedup),
        "fidelity": {"top1_agreement": 1.0 if method == "none" else 0.97, "cosine": 1.0 if method == "none" else 0.99,
                     "kl": 0.0 if method == "none" else 1e-3},
        "accuracy": accuracy, **extra,
    }


def synthetic_results() -> dict:
    rows = []
    for batch in (1, 8):
        rows += [
            _row("uncompressed", "none", batch, 1.0, 0.970, kind="uncompressed"),
            _row("tome r=4", "tome", batch, 1.2, 0.968),
            _row("tome r=8", "tome", batch, 1.5, 0.962),
            _row("tome r=16", "tome", batch, 1.9, 0.950),  # 2 points down
            _row("topk keep=0.7", "topk", batch, 1.4, 0.955),  # 1.5 points down already
            _row("tome r=8", "tome", batch, 2.6, 0.961, precision="int8"),
        ]
    return {
        "schema": "tc-export.bench/1",
        "machine": {"cpu": "Test CPU <x86>", "cores": 2, "memory_gb": 24.0},
        "versions": {"torch": "2.14.1", "onnxruntime": "1.23", "onnx": "1.19", "tc_export": "0.1.0"},
        "config": {"model": "mnist_vit", "runs": 30, "threads": 2, "sweeps": ["r=4,8,16"]},
        "rows": rows,
    }


@pytest.fixture(scope="module")
def report_page(tmp_path_factory) -> Path:
    """The synthetic results' page, rendered once (matplotlib is the slow part)."""
    return write_report(synthetic_results(), tmp_path_factory.mktemp("report") / "report.html")


def _write(tmp_path: Path, document: object, name: str = "results.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(document))
    return path


def test_load_results_accepts_the_schema(tmp_path):
    document = synthetic_results()
    assert load_results(_write(tmp_path, document)) == document


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(schema="tc-export.bench/2"), "schema 'tc-export.bench/2'; this tc-export reads"),
        (lambda d: d.pop("schema"), "no schema field"),
        (lambda d: d["rows"][0].pop("speedup"), "missing 'speedup'"),
        (lambda d: d["rows"][1].update(accuracy="high"), "$.rows[1].accuracy: expected number or null"),
    ],
)
def test_load_results_rejects_bad_documents_in_one_line(tmp_path, mutate, message):
    document = synthetic_results()
    mutate(document)
    with pytest.raises(ConfigError) as error:
        load_results(_write(tmp_path, document))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_load_results_missing_and_not_json(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_results(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="is not JSON"):
        load_results(bad)


def test_accuracy_tradeoff_by_hand():
    entries = {(e["curve"], e["batch"]): e for e in accuracy_tradeoff(synthetic_results()["rows"])}
    assert set(entries) == {(c, b) for c in ("tome", "tome int8", "topk") for b in (1, 8)}
    tome = entries[("tome", 1)]
    assert tome["baseline"] == pytest.approx(0.970)
    assert tome["best_within"]["label"] == "tome r=8"  # 0.8 points down at 1.5x
    assert tome["first_drop"]["label"] == "tome r=16"  # 2 points down at 1.9x
    topk = entries[("topk", 8)]
    assert topk["best_within"] is None and topk["first_drop"]["label"] == "topk keep=0.7"
    int8 = entries[("tome int8", 1)]
    assert int8["best_within"]["speedup"] == pytest.approx(2.6) and int8["first_drop"] is None


def test_page_is_self_contained_and_escaped(report_page):
    page = report_page.read_text()
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", page.split("<script>")[0], re.I)
    assert "<link" not in page and "src=\"http" not in page
    assert "Test CPU &lt;x86&gt;" in page and "Test CPU <x86>" not in page
    assert page.count('<tr class="result') == 12
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3  # speed-up vs accuracy at batch 1 and 8, tokens per layer
    import base64

    assert all(base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n" for data in images)
    for text in ("Configuration", "Machine", "Versions", "2.14.1", "r=4,8,16", "fastest within 1 point"):
        assert text in page


def test_cli_report(tmp_path):
    from tc_export.cli.main import main

    document = synthetic_results()
    document["rows"] = [row for row in document["rows"] if row["batch"] == 1]
    results = _write(tmp_path, document)
    output = tmp_path / "report.html"
    with pytest.raises(SystemExit) as done:
        main(["report", str(results), "-o", str(output), "--title", "Sweep <1>"])
    page = output.read_text()
    assert done.value.code == 0 and page.startswith("<!DOCTYPE html>") and "<h1>Sweep &lt;1&gt;</h1>" in page
    assert page.count('<tr class="result') == 6 and page.count("<img ") == 2


def test_cli_report_bad_schema_is_one_line(tmp_path, capsys):
    from tc_export.cli.main import main

    document = synthetic_results()
    document["schema"] = "something/9"
    output = tmp_path / "report.html"
    with pytest.raises(SystemExit) as done:
        main(["report", str(_write(tmp_path, document)), "-o", str(output)])
    err = capsys.readouterr().err
    assert done.value.code == 2 and not output.exists()
    assert err.count("\n") == 1 and "tc-export.bench/1" in err


def _dump_dom(page: Path, profile: Path) -> str:
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
        f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", page.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs Debian's chromium package)")
def test_report_renders_in_headless_chromium(tmp_path, report_page):
    document = synthetic_results()
    page = report_page
    dom = _dump_dom(page, tmp_path / "profile")
    body = re.search(r"<body([^>]*)>", dom)
    assert body is not None
    assert 'data-plots="ok"' in body.group(1), body.group(1)
    assert 'data-images-decoded="3/3"' in body.group(1)
    rows = re.findall(r'<tr class="result [a-z]+" data-label="([^"]+)" data-batch="(\d+)"', dom)
    expected = [(r["label"] + (" int8" if r.get("precision") == "int8" else ""), str(r["batch"]))
                for r in document["rows"]]
    assert rows == expected

    # The check is real: a page whose image data is corrupt is reported broken by the same script.
    broken = tmp_path / "broken.html"
    broken.write_text(re.sub(r"base64,[A-Za-z0-9+/]{40}", "base64,AAAA", page.read_text(), count=1))
    dom = _dump_dom(broken, tmp_path / "profile2")
    assert 'data-plots="broken"' in dom and 'data-images-decoded="2/3"' in dom
