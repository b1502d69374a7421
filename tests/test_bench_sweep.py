"""``tc-export bench`` sweeps: configuration parsing, fidelity numbers, int8, reference ToMe, JSON/Markdown/PNG."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from tc_export.measure.bench_job import SweepConfig, compare_outputs, run_sweep
from tc_export.measure.bench_report import SCHEMA_ID, document, markdown_table, validate, write_json, write_plots
from tc_export.cli.main import main
from tc_export.errors import BackendUnavailableError, ConfigError
from tc_export.export.quantize import quantize_int8
from tc_export.models.base import InputSpec, LoadedModel
from tc_export.passes import ToMeConfig
from tc_export.measure.reference_tome import apply_reference_tome
from tc_export.measure.sweep import candidate_from_configs, expand, parse_config_spec, parse_sweep

from .conftest import tiny_timm_vit
from .reference import reference_tome_timm_vit


def tiny_loaded(name: str = "tiny_vit") -> LoadedModel:
    module = tiny_timm_vit(img_size=32, depth=2)
    return LoadedModel(name, module, [InputSpec("x", (3, 32, 32), onnx_name="pixel_values")])


# --- configurations ---------------------------------------------------------------------------------------------

def test_sweep_replaces_the_field_on_every_candidate_that_has_it():
    candidates = [candidate_from_configs([ToMeConfig(r=16)]), parse_config_spec("topk keep=0.7 layers=3,6,9")]
    out = expand(candidates, [parse_sweep("r=0,4,8")])
    assert [c.label for c in out] == ["tome r=0", "tome r=4", "tome r=8", "topk keep=0.7 layers=3,6,9"]
    assert [c.configs[0].r for c in out[:3]] == [0, 4, 8]
    assert out[3].configs[0].layers == (3, 6, 9)
    keep = expand([candidates[1]], [parse_sweep("keep=0.5,1.0")])
    assert [c.configs[0].keep for c in keep] == [0.5, 1.0]


def test_sweep_and_config_errors_are_one_line_config_errors():
    tome = candidate_from_configs([ToMeConfig(r=16)])
    with pytest.raises(ConfigError, match="no configured method has a field 'keep'"):
        expand([tome], [parse_sweep("keep=0.5")])
    with pytest.raises(ConfigError, match=r"--sweep r=-1: r must be >= 0"):
        expand([tome], [parse_sweep("r=-1")])
    with pytest.raises(ConfigError, match="NAME=V1,V2"):
        parse_sweep("r")
    with pytest.raises(ConfigError, match="unknown key 'rr'"):
        parse_config_spec("tome rr=8")
    with pytest.raises(ConfigError, match="given twice"):
        expand([tome, parse_config_spec("tome r=16")], [])


def test_per_layer_sweep_value_stays_whole():
    axis = parse_sweep("r=[8,8,4],16")
    assert axis.values == ((8, 8, 4), 16)


# --- fidelity numbers against a plain per-sample computation ---------------------------------------------------

def _per_sample(reference: np.ndarray, got: np.ndarray) -> tuple[float, float, float]:
    cosines, agree, kls = [], [], []
    for a, b in zip(reference.astype(float).tolist(), got.astype(float).tolist()):
        dot = sum(x * y for x, y in zip(a, b))
        cosines.append(dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b)))
        agree.append(a.index(max(a)) == b.index(max(b)))
        pa = [math.exp(x - max(a)) for x in a]
        pb = [math.exp(y - max(b)) for y in b]
        pa = [v / sum(pa) for v in pa]
        pb = [v / sum(pb) for v in pb]
        kls.append(sum(p * math.log(p / q) for p, q in zip(pa, pb)))
    return sum(cosines) / len(cosines), sum(agree) / len(agree), sum(kls) / len(kls)


def test_compare_outputs_matches_per_sample_definitions():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(6, 10)).astype(np.float32)
    got = reference + rng.normal(scale=0.7, size=(6, 10)).astype(np.float32)
    result = compare_outputs([reference[:4], reference[4:]], [got[:4], got[4:]], classes=True, samples=6)
    cosine, agreement, kl = _per_sample(reference, got)
    assert result["cosine"] == pytest.approx(cosine, abs=1e-6)
    assert result["top1_agreement"] == pytest.approx(agreement)
    assert result["kl"] == pytest.approx(kl, rel=1e-6)
    same = compare_outputs([reference], [reference.copy()], classes=True, samples=6)
    assert (same["cosine"], same["top1_agreement"], same["kl"]) == (1.0, 1.0, 0.0)


# --- reference eager ToMe ----------------------------------------------------------------------------------------

def test_reference_tome_matches_the_per_sample_reference():
    model = tiny_timm_vit(img_size=64, depth=4)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    schedule = [4, 3, 2, 2]
    with torch.no_grad():
        got = apply_reference_tome(model, schedule)(images)
        expected, counts = reference_tome_timm_vit(model, images, schedule)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert counts == [17, 13, 10, 8, 6]
    assert counts == [17, 13, 10, 8, 6]
    with torch.no_grad():  # r=0 everywhere is the model itself, and the original model is left untouched
        torch.testing.assert_close(apply_reference_tome(model, [0, 0, 0, 0])(images), model(images))


# --- int8 --------------------------------------------------------------------------------------------------------

def _model_with_local_function() -> onnx.ModelProto:
    """y = tc_export.Scale(x) @ W, with Scale a local function (x * 2) in the tc_export domain."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(16, 8)).astype(np.float32), "W")
    two = helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.array(2.0, np.float32)))
    scale = helper.make_function("tc_export", "Scale", ["a"], ["b"],
                                 [two, helper.make_node("Mul", ["a", "two"], ["b"])],
                                 [helper.make_opsetid("", 18)])
    graph = helper.make_graph(
        [helper.make_node("Scale", ["x"], ["s"], domain="tc_export"), helper.make_node("MatMul", ["s", "W"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("tc_export", 1)],
                              functions=[scale])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def test_int8_survives_local_functions(tmp_path):
    source = tmp_path / "f.onnx"
    onnx.save_model(_model_with_local_function(), str(source))
    result = quantize_int8(source, tmp_path / "f-int8.onnx")
    quantized = onnx.load(str(result.path))
    assert result.inlined_functions == 1 and not quantized.functions
    assert any(node.op_type == "MatMulInteger" for node in quantized.graph.node)
    x = np.random.default_rng(1).normal(size=(4, 16)).astype(np.float32)
    fp32 = ort.InferenceSession(str(source)).run(None, {"x": x})[0]
    int8 = ort.InferenceSession(str(result.path)).run(None, {"x": x})[0]
    expected = (x * 2) @ numpy_helper.to_array(_model_with_local_function().graph.initializer[0])
    np.testing.assert_allclose(fp32, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(int8, expected, atol=0.03 * np.abs(expected).max())  # int8 error, no saturation


# --- the sweep end to end ----------------------------------------------------------------------------------------

def test_sweep_rows_speedups_fidelity_int8_baselines_and_reports(tmp_path, monkeypatch):
    loaded = tiny_loaded("tiny_with_eval")
    labels_images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        labels = loaded.module(labels_images).argmax(1)

    def accuracy(module: torch.nn.Module) -> float:  # the uncompressed model is 100% by construction
        with torch.no_grad():
            return float((module(labels_images).argmax(1) == labels).float().mean())

    import tc_export.measure.bench_job as bench_job

    monkeypatch.setitem(bench_job.EVALUATORS, "tiny_with_eval", accuracy)
    candidates = expand([candidate_from_configs([ToMeConfig(r=0)])], [parse_sweep("r=0,1")])
    config = SweepConfig(batches=(1,), runs=3, warmup=0, threads=1, int8=True, baselines=True, samples=4)
    rows = run_sweep(loaded, candidates, config, say=lambda text: None)

    doc = document(rows, config.as_dict())
    assert doc["schema"] == SCHEMA_ID and validate(doc) == []
    for row in rows:
        assert row["speedup"] == pytest.approx(row["baseline_ms"] / row["latency_ms"]["median"])
        assert row["latency_ms"]["p90"] >= row["latency_ms"]["median"] > 0
        assert row["throughput"] == pytest.approx(row["batch"] * 1000 / row["latency_ms"]["median"])
    keyed = {(r["label"], r["precision"], r["kind"], r["batch"]): r for r in rows}
    for batch in (1,):
        identity = keyed[("tome r=0", "fp32", "compressed", batch)]
        assert identity["fidelity"]["cosine"] == 1.0 and identity["fidelity"]["top1_agreement"] == 1.0
        assert identity["fidelity"]["kl"] == 0.0 and identity["accuracy"] == 1.0
        assert identity["tokens_per_layer"] == [5, 5, 5] and identity["mac_ratio"] == pytest.approx(1.0)
        merged = keyed[("tome r=1", "fp32", "compressed", batch)]
        assert merged["tokens_per_layer"] == [5, 4, 3] and merged["mac_ratio"] > 1.0
        assert ("tome r=1", "int8", "compressed", batch) in keyed
        assert ("uncompressed", "int8", "uncompressed", batch) in keyed
        tuned = keyed[("uncompressed (ORT transformer optimizer)", "fp32", "baseline-tuned", batch)]
        assert tuned["fidelity"]["cosine"] > 0.999 and "speedup_vs_tuned" in merged
        reference = keyed[("tome r=1 (reference eager)", "fp32", "reference", batch)]
        assert reference["backend"] == "torch" and reference["fidelity"]["cosine"] > 0.9
        assert reference["tokens_per_layer"] == merged["tokens_per_layer"]

    write_json(doc, tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text())["rows"][0]["model"] == "tiny_with_eval"
    table = markdown_table(rows)
    assert table.count("\n") == len(rows) + 1 and "tome r=1 int8" in table
    plots = write_plots(rows, tmp_path / "plots")
    assert {p.name for p in plots} == {"speedup_vs_accuracy_b1.png", "tokens_per_layer.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)


def test_cli_sweep_torch_backend_writes_json_markdown_and_plots(tmp_path, capsys):
    out = tmp_path / "out.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "timm:vit_tiny_patch16_224", "--img-size", "32", "--method", "tome", "--sweep", "r=0,1",
              "--config", "topk keep=0.5 layers=2", "--backend", "torch", "--batch", "1", "--batch", "2",
              "--threads", "1", "--runs", "3",
              "--samples", "2", "--json", str(out), "--markdown", str(tmp_path / "out.md"),
              "--plot", str(tmp_path / "plots")])
    stdout, stderr = capsys.readouterr()
    assert exit_info.value.code == 0, stderr
    doc = json.loads(out.read_text())
    assert validate(doc) == []
    labels = ["uncompressed", "tome r=0", "tome r=1", "topk keep=0.5 layers=2"]
    assert [(r["label"], r["batch"]) for r in doc["rows"]] == [(label, b) for b in (1, 2) for label in labels]
    for row in doc["rows"]:
        assert row["speedup"] == pytest.approx(row["baseline_ms"] / row["latency_ms"]["median"])
    assert {r["backend"] for r in doc["rows"]} == {"torch"} and doc["machine"]["cores"] >= 1
    assert doc["rows"][1]["fidelity"]["cosine"] == 1.0 and doc["rows"][1]["accuracy"] is None
    assert "topk keep=0.5 layers=2" in (tmp_path / "out.md").read_text()
    assert (tmp_path / "plots" / "speedup_vs_cosine_b2.png").is_file()
    assert (tmp_path / "plots" / "tokens_per_layer.png").is_file()


@pytest.mark.parametrize("args, message, code", [
    pytest.param(["--backend", "trt"], "TensorRT missing", 3, marks=pytest.mark.skipif(
        importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")),
    (["--sweep", "keep=0.5"], "no configured method has a field 'keep'", 2),
    (["--int8", "--backend", "torch"], "--int8 quantizes the ONNX models", 2),
])
def test_cli_bench_user_errors(args, message, code, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "timm:vit_tiny_patch16_224", "--img-size", "32", "--method", "tome", *args])
    _, stderr = capsys.readouterr()
    assert exit_info.value.code == code
    assert message in stderr and len(stderr.strip().splitlines()) == 1


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_trt_backend_missing_raises_backend_error():
    from tc_export.measure.bench_job import check_backend

    with pytest.raises(BackendUnavailableError, match="TensorRT missing"):
        check_backend("trt")


def test_cli_bench_projector_recipe_says_why_fidelity_is_not_shown(tmp_path, capsys):
    """A projector outputs tokens, not the model's logits: as the export job does, no fidelity against them."""
    recipe = tmp_path / "pool.yaml"
    recipe.write_text("stages:\n  - {method: pool, stride: 2}\n")
    out = tmp_path / "out.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "timm:vit_tiny_patch16_224", "--img-size", "64", "--recipe", str(recipe),
              "--config", "tome r=1", "--backend", "torch", "--batch", "2", "--threads", "1", "--runs", "3",
              "--warmup", "0", "--samples", "2", "--json", str(out), "--markdown", str(tmp_path / "out.md")])
    stdout, stderr = capsys.readouterr()
    assert exit_info.value.code == 0, stderr
    doc = json.loads(out.read_text())
    assert validate(doc) == []
    rows = {row["label"]: row for row in doc["rows"]}
    assert list(rows) == ["uncompressed", "recipe pool", "tome r=1"]
    projector = rows["recipe pool"]["fidelity"]
    assert projector["cosine"] is None and projector["top1_agreement"] is None and projector["kl"] is None
    assert "outputs tokens" in projector["note"]
    assert "recipe pool: fidelity not shown" in stdout
    assert rows["uncompressed"]["fidelity"]["cosine"] == 1.0
    assert rows["tome r=1"]["fidelity"]["top1_agreement"] is not None and -1 <= rows["tome r=1"]["fidelity"]["cosine"] <= 1
    table = (tmp_path / "out.md").read_text()
    assert next(line for line in table.splitlines() if "recipe pool" in line).endswith("| - | - | - | - |")
