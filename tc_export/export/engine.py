"""TensorRT engines. TensorRT is imported lazily: where it (or a GPU) is missing, the ONNX is kept and the user
is told the exact command that finishes the build on the target."""

from __future__ import annotations

import shlex
from pathlib import Path

from ..errors import BackendUnavailableError
from .files import atomic_output


def finish_command(onnx_path: Path, engine_path: Path, fp16: bool) -> str:
    """The command to build the engine on the target device (trtexec ships with TensorRT, JetPack included)."""
    parts = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}"]
    if fp16:
        parts.append("--fp16")
    return " ".join(shlex.quote(p) for p in parts)


def tensorrt_missing_reason() -> str | None:
    """None when TensorRT is importable and a CUDA device answers; else why not."""
    try:
        import tensorrt as trt  # noqa: F401
    except Exception:  # noqa: BLE001 - the stub wheels raise on import in many ways
        return "TensorRT is not installed here"
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU is visible here"
    except Exception:  # noqa: BLE001
        return "no CUDA GPU is visible here"
    return None


def build_engine(onnx_path: Path, engine_path: Path, fp16: bool = False) -> None:
    """Build and save a TensorRT engine from ``onnx_path``; raise ``BackendUnavailableError`` where impossible."""
    reason = tensorrt_missing_reason()
    if reason is not None:
        raise BackendUnavailableError(
            f"{reason}; a TensorRT engine needs TensorRT and an NVIDIA GPU. The ONNX is written to {onnx_path}; "
            f"finish on the target with: {finish_command(onnx_path, engine_path, fp16)}"
        )
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, SaveEngine

    with atomic_output(engine_path) as tmp:
        SaveEngine(EngineFromNetwork(NetworkFromOnnxPath(str(onnx_path)), config=CreateConfig(fp16=fp16)), str(tmp))()
