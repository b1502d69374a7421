"""Reading weights files (safetensors or a PyTorch state dict) into a model, with one-line errors."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError

_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module")
StateDict = dict[str, torch.Tensor]


def read_state_dict(path: str | Path) -> StateDict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"weights file {path} is a directory: pass a .safetensors or PyTorch .pt/.pth file "
                          "(for a Hugging Face model directory use hf:PATH)")
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist: pass a .safetensors or PyTorch .pt/.pth state dict")
    if path.stat().st_size == 0:
        raise ConfigError(f"weights file {path} is empty: pass a .safetensors or PyTorch .pt/.pth state dict")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            state = load_file(str(path))
        except Exception as error:  # noqa: BLE001 - any reader failure means a bad file
            raise ConfigError(f"weights file {path} is not a readable safetensors file ({first_line(error)})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001
            raise ConfigError(
                f"weights file {path} is not a readable PyTorch state dict ({_torch_load_reason(error)}); "
                "save one with torch.save(model.state_dict(), path) or use safetensors"
            ) from None
    for key in _NESTED_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"weights file {path} does not hold a state dict (a mapping of names to tensors)")
    check_finite(state.items(), f"weights file {path}")
    return state


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    """Raise a one-line error naming the first floating tensor holding NaN or Inf (and how many)."""
    for name, tensor in tensors:
        if not isinstance(tensor, torch.Tensor) or not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        finite = torch.isfinite(tensor)
        if bool(finite.all()):
            continue
        nan = int(torch.isnan(tensor).sum())
        inf = int(tensor.numel() - int(finite.sum()) - nan)
        raise ConfigError(f"{source}: tensor {name!r} holds non-finite values ({nan} NaN, {inf} Inf of "
                          f"{tensor.numel()}); the checkpoint is corrupt or was saved after training diverged")


def load_weights(model: nn.Module, path: str | Path, filter_fn: Callable[[StateDict, nn.Module], StateDict] | None = None) -> None:
    """Load ``path`` into ``model`` strictly; a mismatch names the counts and the first offending keys."""
    state = read_state_dict(path)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as error:  # noqa: BLE001
            raise ConfigError(f"weights file {path} does not fit {type(model).__name__}: {first_line(error)}") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
        detail = lines[0] if lines else first_line(error)
        raise ConfigError(f"weights file {path} does not fit the model: {detail}") from None
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise ConfigError(f"weights file {path} does not fit the model: {', '.join(parts)} keys")


def timm_checkpoint_filter(model: nn.Module) -> Callable[[StateDict, nn.Module], StateDict] | None:
    """timm's own checkpoint filter for the model's family (e.g. resamples ViT position embeddings)."""
    return getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)


def _torch_load_reason(error: BaseException) -> str:
    """torch.load's safe-unpickler errors are paragraphs; keep the part that says what the file holds."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker not in text:
        return first_line(error)
    detail = " ".join(text.split(marker, 1)[1].split())
    if detail.startswith("Unsupported global:"):
        name = detail.split("GLOBAL", 1)[-1].split()[0] if "GLOBAL" in detail else "an object"
        return f"it pickles {name}, not only tensors: a whole model or custom classes"
    return detail.split(". ")[0].split(" Check the documentation")[0][:160] or first_line(error)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
