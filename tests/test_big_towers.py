"""Big towers: external-data ONNX (export, bundle, verify), too big refused before loading, half-precision files."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import tc_export.job.pipeline
from tc_export import ExportConfig, ToMeConfig, compress
from tc_export.errors import TCExportError
from tc_export.export.files import external_data_files
from tc_export.export.onnx_export import EXTERNAL_ALIGNMENT, write_onnx
from tc_export.export.checks.parity import ParityConfig
from tc_export.models import footprint

from .conftest import tiny_timm_vit
from .reference import reference_tome_timm_vit
from .test_cli import TINY, run_cli

TINY32 = [TINY[0], "--img-size", "32"]


@pytest.fixture(scope="module")
def tiny_tome():
    model = tiny_timm_vit(img_size=32, depth=2)
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    return model, images, compress(model, ToMeConfig(r=2), {"x": images})


def _external(path):
    model = onnx.load(str(path), load_external_data=False)
    return [init for init in model.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL]


@pytest.mark.parametrize("how", ["flag", "over the limit"])
def test_external_data_export_matches_the_reference(tiny_tome, tmp_path, monkeypatch, how):
    model, images, compressed = tiny_tome
    if how == "over the limit":  # the automatic switch, without writing 2 GB
        monkeypatch.setattr(onnx.checker, "MAXIMUM_PROTOBUF", 100_000)
    path = tmp_path / "m.onnx"
    write_onnx(compressed.module, {"x": images}, path, ExportConfig(external_data=how == "flag"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]  # nothing staged left
    assert external_data_files(path) == [tmp_path / "m.onnx.data"]
    external = _external(path)
    assert external and path.stat().st_size < 200_000 < (tmp_path / "m.onnx.data").stat().st_size
    for init in external:
        entries = {e.key: e.value for e in init.external_data}
        assert entries["location"] == "m.onnx.data" and int(entries["offset"]) % EXTERNAL_ALIGNMENT == 0
    onnx.checker.check_model(str(path), full_check=True)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": images.numpy()})[0]
    want, _ = reference_tome_timm_vit(model, images, [2, 2])
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=5e-5)


def test_external_data_failure_leaves_neither_file(tiny_tome, tmp_path, monkeypatch):
    _, images, compressed = tiny_tome

    def broken(*args, **kwargs):
        raise ValueError("checker says no")

    monkeypatch.setattr(onnx.checker, "check_model", broken)
    with pytest.raises(TCExportError, match="fails the ONNX checker: checker says no"):
        write_onnx(compressed.module, {"x": images}, tmp_path / "m.onnx", ExportConfig(external_data=True))
    assert list(tmp_path.iterdir()) == []


def test_cli_bundle_with_external_data_verifies(tmp_path, capsys):
    directory = tmp_path / "b"
    code, out, err = run_cli([*TINY32, "--method", "tome", "--r", "2", "--external-data", "--target",
                              "jetson-orin-nano", "-o", f"{directory}/"], capsys)
    assert code == 0, err
    assert "weights in model.onnx.data" in out and "parity PyTorch vs ONNX Runtime" in out
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["external_data"] == ["model.onnx.data"] and "model.onnx.data" in manifest["files"]
    assert {p.name for p in directory.iterdir()} == set(manifest["files"])
    code, out, err = run_cli(["verify", directory / "model.onnx", "--against", directory], capsys)
    assert code == 0 and "verify passed" in out, err
    (directory / "model.onnx.data").unlink()  # the ONNX alone cannot run: one line, non-zero
    code, out, err = run_cli(["verify", directory / "model.onnx", "--against", directory], capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1


def test_too_big_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(footprint, "machine_memory", lambda: 24 * 10**9)

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(tc_export.job.pipeline, "load_model", no_loading)
    code, out, err = run_cli(["timm:vit_7b_patch16_dinov3", "--method", "tome", "--r", "8", "-o",
                              tmp_path / "d.onnx"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "6.72 B parameters (26.9 GB in fp32)" in err and "needs about 81.7 GB" in err
    assert "this machine has 24.0 GB" in err and "no --dtype fits" in err
    assert list(tmp_path.iterdir()) == []


def test_too_big_names_the_dtype_that_fits(tmp_path, capsys, monkeypatch):
    params = footprint.parameter_count("vit_b", footprint.ModelOptions())
    assert params == 86_567_656  # timm's ViT-B/16, counted on the meta device
    fp32, fp16 = footprint.Footprint(params).peak_bytes("fp32"), footprint.Footprint(params).peak_bytes("fp16")
    assert fp16 < fp32
    monkeypatch.setattr(footprint, "machine_memory", lambda: (fp16 + fp32) // 2)
    monkeypatch.setattr(tc_export.job.pipeline, "load_model", lambda *a, **k: pytest.fail("loaded"))
    code, out, err = run_cli(["vit_b", "-o", tmp_path / "b.onnx"], capsys)
    assert code == 2 and "--dtype fp16 would need about" in err


def test_hf_parameter_count_from_safetensors_headers(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(3, 5), "b": torch.zeros(7, dtype=torch.float16)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    assert footprint.parameter_count(f"hf:{tmp_path}", footprint.ModelOptions()) == 22


def test_fp16_file_is_half_and_scores_in_fp32(tmp_path, capsys):
    path = tmp_path / "h.onnx"
    code, out, err = run_cli([*TINY32, "--method", "tome", "--r", "2", "--dtype", "fp16", "-o", path], capsys)
    assert code == 0, err
    assert "atol 0.02, rtol 0.02): passed" in out and "fidelity vs uncompressed" in out
    params = footprint.parameter_count(TINY[0], footprint.ModelOptions(img_size=32))
    assert 1.9 * params < path.stat().st_size < 2.2 * params  # 2 bytes a weight (fp32: 4)
    model = onnx.load(str(path))
    assert {i.type.tensor_type.elem_type for i in [*model.graph.input, *model.graph.output]} == {onnx.TensorProto.FLOAT}
    weights = [i for i in model.graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
               and np.prod(i.dims) >= 1024]
    assert weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)
    (function,) = [f for f in model.functions if f.domain == "tc_export"]
    casts = [onnx.helper.get_attribute_value(a) for n in function.node if n.op_type == "Cast" for a in n.attribute]
    assert onnx.TensorProto.FLOAT in casts  # the metric goes to fp32 before the scores and the TopK


@pytest.mark.parametrize("output", ["b/", "b.engine"])
def test_bf16_bundle_or_engine_is_refused_with_the_reason(output, tmp_path, capsys):
    """A bf16 file runs nowhere here (docs/half-precision.md#bf16): no reference outputs for a bundle, no engine."""
    code, out, err = run_cli([*TINY32, "--dtype", "bf16", "--target", "jetson-orin-nano", "-o",
                              f"{tmp_path}/{output}"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no bf16 kernels" in err
    assert "bundle or build the fp32 file" in err and list(tmp_path.iterdir()) == []


def test_parity_tolerances_follow_the_dtype():
    assert (ParityConfig.for_dtype("fp32").atol, ParityConfig.for_dtype("fp32").rtol) == (1e-4, 1e-3)
    assert ParityConfig.for_dtype("fp16").atol > 1e-3
    assert ParityConfig.for_dtype("fp16", atol=1e-3).atol == 1e-3


@pytest.mark.parametrize(("op_type", "tokens", "warned"), [
    ("ToMeMerge", 577, False), ("ToMeMerge", 4096, False), ("ToMeMerge_padded0_protected1", 4097, True),
    ("TopKSelect", 4096, False), ("TopKSelect", 4097, True),
])
def test_lint_states_the_plugin_token_limits(op_type, tokens, warned):
    from onnx import helper

    from tc_export.export.tensorrt.lint import lint_model

    from .test_lint import model, vi

    function = helper.make_function("tc_export", op_type, ["x"], ["y"], [helper.make_node("Identity", ["x"], ["y"])],
                                    [helper.make_opsetid("", 18)])
    call = helper.make_node(op_type, ["a"], ["b"], name="op0", domain="tc_export", plugin_namespace="tc_export",
                            plugin_version="1")
    report = lint_model(model([call], [vi("a", [1, tokens, 8])], [vi("b", [1, tokens, 8])], functions=[function],
                              extra_opsets=["tc_export"]))
    limits = [p for p in report.problems if p.rule == "plugin-token-limit"]
    assert bool(limits) == warned and report.ok
    if warned:
        assert f"{tokens} tokens" in limits[0].message and "--plugins off" in limits[0].suggestion
