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


def test_projector_job_says_why_fidelity_is_not_shown(tmp_path, capsys):
    code, out, err = run_cli([*TINY, "--method", "pool", "--stride", "2", "-o", tmp_path / "m.onnx"], capsys)
    assert code == 0, err
    assert "fidelity not shown: the compressed model outputs tokens" in out and "fidelity vs" not in out


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
    assert f"ONNX kept at {tmp_path / 'm.onnx'}" in err and (tmp_path / "m.onnx").is_file()


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


def save_shards(state: dict, folder) -> None:
    """``state`` as two safetensors shards with their index file (the Hugging Face sharded layout)."""
    import json

    from safetensors.torch import save_file

    folder.mkdir()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(folder / file))
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", "shards"])
def test_weights_file_is_loaded(tmp_path, capsys, suffix, monkeypatch):
    import timm
    from safetensors.torch import save_file

    from tc_export.models import weights as weights_module

    torch.manual_seed(7)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64).eval()
    weights = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if suffix == "shards":
        save_shards(state, weights)
    else:
        save_file(state, str(weights)) if suffix == ".safetensors" else torch.save(state, weights)
    if suffix != ".pt":  # safetensors that fit the model exactly are read into it in place, never as a whole dict
        def whole(path):
            raise AssertionError(f"{path} was read whole")
        monkeypatch.setattr(weights_module, "read_state_dict", whole)
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


# --- bad input as a new user meets it: every path one line on stderr, non-zero, no traceback, nothing written ---


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """Broken inputs of every kind a new user produces (made once for the module)."""
    import transformers

    root = tmp_path_factory.mktemp("in")

    def directory(name, text):
        (root / name).mkdir()
        (root / name / "config.json").write_text(text)

    directory("badjson", '{"model_type": "vit",\n "hidden_size": 32,,}')
    directory("unknown_type", '{"model_type": "frobnicator"}')
    directory("unknown_arch", '{"model_type": "vit", "architectures": ["ViTForFrobnication"]}')
    directory("no_type", '{"hidden_size": 32}')
    directory("json_list", "[1, 2]")
    config = transformers.ViTConfig(image_size=32, patch_size=16, num_labels=3, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32)
    for name in ("empty_weights", "bin_not_state_dict"):
        config.save_pretrained(root / name)
    (root / "empty_weights" / "model.safetensors").write_bytes(b"")
    torch.save([1, 2, 3], root / "bin_not_state_dict" / "pytorch_model.bin")
    model = transformers.ViTForImageClassification(config)
    with torch.no_grad():
        model.classifier.weight[1, 2] = float("nan")
    model.save_pretrained(root / "nan_weights")
    (root / "empty.pt").write_bytes(b"")
    torch.save(torch.nn.Linear(2, 2), root / "whole_model.pt")
    (root / "a_directory").mkdir()
    import timm

    state = timm.create_model("vit_tiny_patch16_224", img_size=64).state_dict()
    state["blocks.0.attn.qkv.weight"][0, 0] = float("inf")
    torch.save(state, root / "inf.pt")
    return root


USER_ERRORS = {
    "config not JSON": (["hf:IN/badjson"], "IN/badjson/config.json is not valid JSON: Expecting property name "
                                           "enclosed in double quotes at line 2, column 20"),
    "unknown model_type": (["hf:IN/unknown_type"], "names model_type 'frobnicator'"),
    "unknown architecture": (["hf:IN/unknown_arch"], "names architecture 'ViTForFrobnication'"),
    "config without model_type": (["hf:IN/no_type"], 'has no "model_type"'),
    "config not an object": (["hf:IN/json_list"], "holds a JSON list"),
    "hf: a file": (["hf:IN/empty.pt"], "is a file; hf:PATH takes a model directory"),
    "hf: empty weights": (["hf:IN/empty_weights"], "model.safetensors is empty"),
    "hf: .bin not a state dict": (["hf:IN/bin_not_state_dict"], "does not hold a state dict"),
    "hf: NaN weights": (["hf:IN/nan_weights"], "tensor 'classifier.weight' holds non-finite values (1 NaN, 0 Inf"),
    "Inf in --weights": ([*TINY, "--weights", "IN/inf.pt"],
                         "tensor 'blocks.0.attn.qkv.weight' holds non-finite values (0 NaN, 1 Inf"),
    "empty --weights": ([*TINY, "--weights", "IN/empty.pt"], "is empty"),
    "--weights a directory": ([*TINY, "--weights", "IN/a_directory"], "holds no safetensors checkpoint"),
    "--weights a pickled model": ([*TINY, "--weights", "IN/whole_model.pt"], "pickles torch.nn.modules.linear.Linear"),
    "unknown flag": ([*TINY, "--frobnicate"], "No such option '--frobnicate'"),
    "wrong type": ([*TINY, "--batch", "two"], "Invalid value for '--batch': 'two' is not a valid integer"),
    "missing model": (["export"], "Missing argument 'MODEL'"),
    "bad pooling": ([*TINY, "--pooling", "avg"], "--pooling must be one of logits, pooler, cls, mean, tokens"),
    "pooling on timm": ([*TINY, "--pooling", "cls"], "--pooling applies to transformers models"),
}


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_new_user_errors_are_one_line(case, user_files, tmp_path, capsys):
    args, message = USER_ERRORS[case]
    args = [a.replace("IN", str(user_files)) for a in args]
    if "-o" not in args and args != ["export"]:
        args += ["-o", str(tmp_path / "out.onnx")]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run_cli(args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tc-export: error:"), err
    assert message.replace("IN", str(user_files)) in lines[0]
    assert "Traceback" not in out + err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("raised,code,message", [
    (OSError(28, "No space left on device"), 2, "tc-export: error: [Errno 28] No space left on device"),
    (RuntimeError("boom\nsecond line"), 70, "tc-export: internal error (a bug in tc-export, not your input): "
                                           "RuntimeError: boom; rerun with TC_EXPORT_TRACEBACK=1"),
])
def test_unexpected_failures_are_one_line(raised, code, message, tmp_path, capsys, monkeypatch):
    """The file system saying no, and a bug, still end in one line (the traceback on request)."""
    import tc_export.job.pipeline

    def fail(*args, **kwargs):
        raise raised

    monkeypatch.delenv("TC_EXPORT_TRACEBACK", raising=False)
    monkeypatch.setattr(tc_export.job.pipeline, "run_job", fail)
    got, out, err = run_cli([*TINY, "-o", tmp_path / "m.onnx"], capsys)
    assert got == code and len(err.strip().splitlines()) == 1 and err.startswith(message), err


def test_no_arguments_prints_help(capsys):
    code, out, err = run_cli([], capsys)
    assert code == 0 and "tc-export vit_b --method tome --r 16" in out and not err


def test_atomic_write_leaves_nothing_when_the_write_fails(tmp_path, monkeypatch):
    """A failure inside the atomic write, after the temporary file exists, leaves neither file."""
    from tc_export import ExportConfig, export_onnx
    from tc_export.export import onnx_export

    written = []

    def save_then_fail(model, weights, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(model.SerializeToString()[:100])
        written.append(path)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx_export, "_save_with_weights", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        export_onnx(torch.nn.Linear(4, 3), {"input": torch.randn(1, 4)}, tmp_path / "m.onnx", ExportConfig())
    assert written and ".m.onnx.partial-" in str(written[0])  # the temporary file did exist
    assert list(tmp_path.iterdir()) == []


def test_non_finite_outputs_are_named_not_measured(tmp_path):
    """NaN outputs (here: a NaN put into the head after loading) fail parity as non-finite, per runtime, instead
    of 'differs by max abs 0.000e+00'."""
    from tc_export.errors import ParityError
    from tc_export.models import ModelOptions, load_model
    from tc_export.job.pipeline import JobConfig, run_job

    loaded = load_model("timm:vit_tiny_patch16_224", ModelOptions(img_size=32), warn_random=False)
    with torch.no_grad():
        loaded.module.head.weight[3, 0] = float("nan")
    config = JobConfig(model="unused", output=tmp_path / "m.onnx", fidelity_samples=0)
    with pytest.raises(ParityError) as error:
        run_job(config, say=lambda line: None, loaded=loaded)
    message = str(error.value)
    assert "output 'logits' is non-finite (PyTorch 2 NaN, 0 Inf of 2000; ONNX Runtime 2 NaN, 0 Inf of 2000" in message
    assert "the model itself produces them" in message and "max abs" not in message
