"""Parity bundle and ``tc-export verify``: a fresh bundle of a tiny ViT verifies, a tampered one does not."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tc_export.cli.main import main
from tc_export.cli.trt_commands import EngineFlags, export_target
from tc_export.errors import ConfigError
from tc_export.export.tensorrt.bundle import (
    ENGINE_TOLERANCES,
    check_bundle_dir,
    is_bundle_output,
    staging_dir,
)
from tc_export.export.tensorrt.engine import EngineConfig
from tc_export.export.checks.compare import compare_elementwise
from tc_export.models.base import InputSpec, LoadedModel
from tc_export.export.tensorrt.lint import lint_model
from tc_export.passes import ToMeConfig
from tc_export.job.pipeline import JobConfig, run_job

from .conftest import tiny_timm_vit

FILES = {"model.onnx", "inputs.json", "outputs.json", "manifest.json", "build_and_verify.sh", "fp32_layers.py",
         "sites.json", "verify_outputs.py"}


def input_name(directory):
    """The ONNX input name (pixel_values; the pipeline decides it)."""
    return ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"]).get_inputs()[0].name


def tiny_loaded():
    return LoadedModel(name="tiny_vit", module=tiny_timm_vit(img_size=32, depth=2),
                       inputs=[InputSpec("x", (3, 32, 32), onnx_name="pixel_values")], output_names=["logits"])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    lines = []
    config = JobConfig(model="tiny_vit", output=root / "b", methods=(ToMeConfig(r=1),), fidelity_samples=0,
                       engine=EngineConfig.for_target("jetson-orin-nano"), bundle=True)
    result = run_job(config, say=lines.append, loaded=tiny_loaded())
    return root / "b", result, lines


def test_bundle_files_and_manifest(bundle):
    directory, result, lines = bundle
    assert {p.name for p in directory.iterdir()} == FILES
    assert [p.name for p in directory.parent.iterdir()] == ["b"]  # no staging directory left behind
    assert result.onnx_path == directory / "model.onnx"
    assert any("wrote parity bundle" in line for line in lines) and any("lint" in line for line in lines)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["model"] == "tiny_vit" and manifest["tokens_per_layer"] == result.compressed.token_counts()
    assert manifest["tokens_per_layer"] == [5, 4, 3]
    assert len(manifest["methods"]) == 1 and "ToMeConfig" in manifest["methods"][0]
    assert manifest["inputs"] == [{"name": input_name(directory), "shape": [1, 3, 32, 32], "dtype": "float32"}]
    assert manifest["outputs"][0]["name"] == "logits" and manifest["outputs"][0]["shape"] == [1, 1000]
    assert manifest["tolerances"]["onnxruntime"] == {"atol": 1e-4, "rtol": 1e-3}
    assert manifest["tolerances"]["engine"]["precision"] == "fp16"
    assert manifest["target"]["name"] == "jetson-orin-nano" and manifest["target"]["compute_capability"] == "8.7"
    assert manifest["engine"]["uses"] == "function bodies" and manifest["engine"]["plugins"] is False
    for package in ("torch", "onnx", "onnxruntime", "tc-export"):
        assert manifest["versions"][package]
    assert manifest["parity_pytorch_vs_onnxruntime"]["passed"] is True


@pytest.mark.parametrize("trt_version", ["10.3", "10.9"])
def test_bundle_onnx_of_every_method_lints_clean(bundle, trt_version):
    directory, _, _ = bundle
    report = lint_model(directory / "model.onnx", trt_version)
    assert not report.problems, report.describe()


def test_script_builds_and_runs_the_polygraphy_check(bundle):
    directory, _, _ = bundle
    script = directory / "build_and_verify.sh"
    assert script.stat().st_mode & 0o111
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "polygraphy convert model.onnx --convert-to trt" in text and "--trt-network-postprocess-script" in text
    assert ("polygraphy run \"$ENGINE\" --model-type engine --trt --load-inputs inputs.json "
            "--load-outputs outputs.json") in text
    assert "set -euo pipefail" in text and "fp16) DEFAULT_ATOL=0.05" in text
    compile(Path(directory / "fp32_layers.py").read_text(), "fp32_layers.py", "exec")


def test_reference_io_is_onnxruntime_on_the_seeded_inputs(bundle):
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    directory, _, _ = bundle
    feeds = load_json(str(directory / "inputs.json"))
    assert len(feeds) == 2
    name = input_name(directory)
    session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    reference = RunResults.load(str(directory / "outputs.json"))[0][1]
    for seed, (feed, iteration) in enumerate(zip(feeds, reference)):
        want_input = torch.randn((1, 3, 32, 32), generator=torch.Generator().manual_seed(seed)).numpy()
        np.testing.assert_array_equal(feed[name], want_input)
        np.testing.assert_array_equal(iteration["logits"], session.run(["logits"], {name: want_input})[0])


def test_polygraphy_cli_reads_the_bundle(bundle):
    """The device's command, with ONNX Runtime standing in for TensorRT."""
    directory, _, _ = bundle
    polygraphy = Path(sys.executable).with_name("polygraphy")
    run = subprocess.run([str(polygraphy), "run", "model.onnx", "--onnxrt", "--load-inputs", "inputs.json",
                          "--load-outputs", "outputs.json", "--atol", "1e-5", "--rtol", "1e-5",
                          "--check-error-stat", "elemwise"], cwd=directory, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "PASSED" in run.stdout + run.stderr


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_verify_passes_on_a_fresh_bundle(bundle, capsys):
    directory, _, _ = bundle
    code, out, err = run_cli(["verify", directory / "model.onnx", "--against", directory], capsys)
    assert code == 0, err
    assert "logits: max abs 0.000e+00" in out and "verify passed" in out


def test_verify_fails_on_a_tampered_outputs_file(bundle, tmp_path, capsys):
    from polygraphy.comparator import RunResults

    directory, _, _ = bundle
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    results = RunResults.load(str(copy / "outputs.json"))
    logits = results[0][1][1]["logits"]
    logits[0, 7] += 1.0
    results[0][1][1]["logits"] = logits
    results.save(str(copy / "outputs.json"))
    code, out, err = run_cli(["verify", copy / "model.onnx", "--against", copy], capsys)
    assert code == 1
    assert "logits" in out and "FAILED (1 elements)" in out
    assert len(err.strip().splitlines()) == 1 and "verify failed" in err and "logits" in err
    # a looser tolerance given on the command line accepts it
    code, _, _ = run_cli(["verify", copy / "model.onnx", "--against", copy, "--atol", "2"], capsys)
    assert code == 0


def test_verify_engine_without_tensorrt_exits_3(bundle, tmp_path, capsys):
    directory, _, _ = bundle
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not an engine")
    code, _, err = run_cli(["verify", engine, "--against", directory], capsys)
    assert code == 3 and "polygraphy run" in err and "--load-outputs" in err


def test_verify_bad_arguments(bundle, tmp_path, capsys):
    directory, _, _ = bundle
    code, _, err = run_cli(["verify", directory / "model.onnx", "--against", tmp_path / "nope"], capsys)
    assert code == 2 and "no such directory" in err
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(directory / "manifest.json", partial)
    code, _, err = run_cli(["verify", directory / "model.onnx", "--against", partial], capsys)
    assert code == 2 and "not a tc-export bundle" in err


def test_compare_elementwise_matches_a_per_element_rule():
    rng = np.random.default_rng(0)
    reference = rng.standard_normal(200).astype(np.float32)
    candidate = reference + rng.standard_normal(200).astype(np.float32) * 1e-3
    atol, rtol = 1e-3, 1e-3
    failed = sum(1 for r, c in zip(reference.tolist(), candidate.tolist())
                 if abs(c - r) > atol and abs(c - r) / abs(r) > rtol)
    check = compare_elementwise(reference, candidate, atol, rtol)
    assert check.failed_elements == failed and check.passed == (failed == 0)
    assert check.max_abs == pytest.approx(max(abs(c - r) for r, c in zip(reference.tolist(), candidate.tolist())))
    assert not compare_elementwise(reference, reference[:10], atol, rtol).passed


def test_bundle_output_detection_and_flags(tmp_path):
    assert is_bundle_output("out/") and is_bundle_output(str(tmp_path)) and not is_bundle_output("m.onnx")
    path, config, bundle = export_target(f"{tmp_path}/new/", EngineFlags(target="datacenter"), fp16=False)
    assert bundle and path == tmp_path / "new" and config.plugins and config.target == "datacenter"
    with pytest.raises(ConfigError, match="--target"):
        export_target(f"{tmp_path}/new/", EngineFlags(), fp16=False)
    with pytest.raises(ConfigError, match="applies to a TensorRT engine"):
        export_target("m.onnx", EngineFlags(precision="fp16"), fp16=False)
    path, config, bundle = export_target("m.engine", EngineFlags(), fp16=True)
    assert not bundle and config.precision == "fp16"
    with pytest.raises(ConfigError, match="disagree"):
        export_target("m.engine", EngineFlags(precision="bf16"), fp16=True)
    assert ENGINE_TOLERANCES["fp32"][0] < ENGINE_TOLERANCES["fp16"][0]


def test_bundle_directory_checks_and_atomic_replace(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a tc-export bundle"):
        check_bundle_dir(other)
    with pytest.raises(ConfigError, match="does not exist"):
        check_bundle_dir(tmp_path / "missing" / "b")
    final = tmp_path / "b"
    with pytest.raises(RuntimeError):
        with staging_dir(final) as staging:
            (staging / "model.onnx").write_text("half")
            raise RuntimeError("export failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]
    for content in ("first", "second"):
        with staging_dir(final) as staging:
            (staging / "manifest.json").write_text(content)
    assert (final / "manifest.json").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "other"]


def test_export_cli_refuses_engine_flags_for_onnx_and_bundles_without_target(tmp_path, capsys):
    tiny = ["timm:vit_tiny_patch16_224", "--img-size", "32", "--method", "tome", "--r", "1"]
    code, _, err = run_cli([*tiny, "--target", "datacenter", "-o", tmp_path / "m.onnx"], capsys)
    assert code == 2 and "-o model.engine or -o DIR/" in err
    code, _, err = run_cli([*tiny, "-o", f"{tmp_path}/b/"], capsys)
    assert code == 2 and "--target" in err
    assert list(tmp_path.iterdir()) == []


def test_bundle_functions_follow_the_plugin_conventions(bundle):
    import onnx

    directory, _, _ = bundle
    proto = onnx.load(str(directory / "model.onnx"))
    calls = [n for n in proto.graph.node if n.domain == "tc_export"]
    if not calls:
        pytest.skip("this export has no tc_export functions (flat graph)")
    assert {n.op_type for n in calls} <= {f.name for f in proto.functions if f.domain == "tc_export"}
    assert all(any(a.name == "plugin_namespace" for a in n.attribute) for n in calls)


def test_bundle_names_its_final_path_and_a_parity_failure_writes_nothing(tmp_path):
    from tc_export.errors import ParityError
    from tc_export.export.checks.parity import ParityConfig

    lines = []
    config = JobConfig(model="tiny_vit", output=tmp_path / "b", methods=(ToMeConfig(r=1),), fidelity_samples=0,
                       engine=EngineConfig.for_target("jetson-orin-nano"), bundle=True)
    run_job(config, say=lines.append, loaded=tiny_loaded())
    exported = next(line for line in lines if line.startswith("exported "))
    assert exported.startswith(f"exported {tmp_path / 'b' / 'model.onnx'} "), exported  # not the staging name
    strict = JobConfig(model="tiny_vit", output=tmp_path / "c", methods=(ToMeConfig(r=1),), fidelity_samples=0,
                       engine=EngineConfig.for_target("jetson-orin-nano"), bundle=True,
                       parity=ParityConfig(atol=0.0, rtol=0.0))  # float rounding differs between the runtimes
    with pytest.raises(ParityError) as failure:
        run_job(strict, say=lambda _: None, loaded=tiny_loaded())
    assert "kept" not in str(failure.value) and "no bundle written" in str(failure.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_verify_of_a_model_that_cannot_run_is_one_line(bundle, tmp_path, capsys):
    from tc_export import ExportConfig, export_onnx

    directory, _, _ = bundle
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf")
    code, out, err = run_cli(["verify", garbage, "--against", directory], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cannot run" in err
    other = tmp_path / "other.onnx"  # takes 48 px images; the bundle holds 32 px ones
    export_onnx(tiny_timm_vit(img_size=48, depth=1), {"x": torch.randn(1, 3, 48, 48)}, other, ExportConfig(),
                input_names=[input_name(directory)])
    code, out, err = run_cli(["verify", other, "--against", directory], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "incompatible shape" in err
    assert "[!]" not in out + err  # no Polygraphy log lines around it
