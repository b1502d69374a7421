"""The command line: the main job on a tiny timm model, the engine fallback, and every kind of bad input."""

import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tc_export.cli.main import main

TINY = ["timm:vit_tiny_patch16_224", "--img-size", "64"]


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_tome_export_end_to_end(tmp_path, capsys):
    code, out, err = run_cli([*TINY, "--method", "tome", "--r", "4", "-o", tmp_path / "m.onnx"], capsys)
    assert code == 0, err
    assert (tmp_path / "m.onnx").is_file()
    assert "tokens per layer: 17 13 9 5 3" in out
    assert "random weights" in out
    assert "parity PyTorch vs ONNX Runtime" in out and "passed" in out
    assert "fidelity vs uncompressed: cosine" in out
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_engine_without_tensorrt_keeps_onnx(tmp_path, capsys):
    code, out, err = run_cli([*TINY, "--method", "tome", "--r", "2", "-o", tmp_path / "m.engine"], capsys)
    assert code == 3
    assert (tmp_path / "m.onnx").is_file() and not (tmp_path / "m.engine").exists()
    assert len(err.strip().splitlines()) == 1
    assert f"trtexec --onnx={tmp_path / 'm.onnx'} --saveEngine={tmp_path / 'm.engine'}" in err


def test_parity_failure_exits_nonzero_and_names_the_output(tmp_path, capsys):
    code, out, err = run_cli([*TINY, "--method", "tome", "--r", "2", "--atol", "0", "--rtol", "0",
                              "-o", tmp_path / "m.onnx"], capsys)
    assert code == 1
    assert "parity failed: output 'logits' differs by max abs" in err


@pytest.fixture
def corrupt_weights(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"not a pickle at all")
    return path


BAD = {
    "unknown model": (["vit_q", "--method", "tome"], "unknown model 'vit_q'"),
    "unknown timm arch": (["timm:not_a_model"], "timm has no architecture"),
    "unknown method": ([*TINY, "--method", "tomato"], "unknown method 'tomato'"),
    "negative r": ([*TINY, "--method", "tome", "--r", "-1"], "--r must be >= 0"),
    "fractional r": ([*TINY, "--method", "tome", "--r", "1.5"], "--r must be a whole number"),
    "r too large": ([*TINY, "--method", "tome", "--r", "9"], "r can be at most 8"),
    "missing weights": ([*TINY, "--weights", "/nonexistent/w.pt"], "does not exist"),
    "corrupt weights": ([*TINY, "--weights", "CORRUPT"], "is not a readable PyTorch state dict"),
    "missing directory": ([*TINY, "-o", "/nonexistent/dir/m.onnx"], "does not exist"),
    "unwritable directory": ([*TINY, "-o", "/proc/m.onnx"], "is not writable"),
    "unknown suffix": ([*TINY, "-o", "OUT/m.txt"], "unknown output suffix '.txt'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_leaves_nothing(case, tmp_path, capsys, corrupt_weights, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args, message = BAD[case]
    args = [str(corrupt_weights) if a == "CORRUPT" else a.replace("OUT", str(tmp_path)) for a in args]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "out.onnx")]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run_cli(args, capsys)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tc-export: error:"), err
    assert message in lines[0]
    assert "Traceback" not in out + err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_pretrained_without_cache_is_clear(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code, out, err = run_cli([*TINY, "--pretrained", "-o", tmp_path / "m.onnx"], capsys)
    assert code == 3
    assert "no pretrained weights for vit_tiny_patch16_224" in err and "--weights FILE" in err


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_file_is_loaded(tmp_path, capsys, suffix):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(7)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64).eval()
    weights = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights)) if suffix == ".safetensors" else torch.save(state, weights)
    code, out, err = run_cli([*TINY, "--weights", weights, "-o", tmp_path / "m.onnx"], capsys)
    assert code == 0, err
    assert "random weights" not in out
    images = torch.randn(1, 3, 64, 64)
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"pixel_values": images.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(images).numpy(), rtol=1e-4, atol=1e-4)


def test_mismatched_weights(tmp_path, capsys):
    torch.save({"head.weight": torch.zeros(3, 3)}, tmp_path / "w.pt")
    code, out, err = run_cli([*TINY, "--weights", tmp_path / "w.pt", "-o", tmp_path / "m.onnx"], capsys)
    assert code == 2 and "does not fit the model" in err


def test_list(capsys):
    code, out, err = run_cli(["list"], capsys)
    assert code == 0
    for name in ("vit_t", "vit_b", "vit_l", "deit_s", "timm:ARCH", "tome"):
        assert name in out


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "tc_export.cli.main", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "tc-export vit_b --method tome --r 16" in result.stdout
