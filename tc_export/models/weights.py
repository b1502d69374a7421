"""Reading weights files (safetensors or a PyTorch state dict) into a model, with one-line errors.

A safetensors file (or a folder of shards with their ``*.safetensors.index.json``) whose names, shapes and dtypes
are exactly the model's is read straight into the model's own tensors, one tensor at a time: the weights are never
held twice. Anything else (a PyTorch file, a checkpoint that needs timm's filter or another layout) is read whole,
PyTorch files memory-mapped.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ..errors import ConfigError

_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module")
StateDict = dict[str, torch.Tensor]


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


class TensorEntry(NamedTuple):
    """Where one tensor sits in a safetensors file."""

    file: Path
    offset: int  # absolute byte offset of its data
    length: int  # bytes
    dtype: str  # safetensors' dtype name
    shape: tuple[int, ...]


def safetensors_files(path: Path) -> list[Path] | None:
    """The safetensors files behind ``path``: the file itself, or a folder's shards (by its index file, else its one
    ``*.safetensors``); None when ``path`` is not safetensors."""
    if path.is_file():
        return [path] if path.suffix == ".safetensors" else None
    if not path.is_dir():
        return None
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"weights folder {path}: {indexes[0].name} is not a safetensors index (no weight_map)"
                              ) from None
        shards = [path / name for name in dict.fromkeys(weight_map.values())]
        absent = [s.name for s in shards if not s.is_file()]
        if absent:
            raise ConfigError(f"weights folder {path}: shard {absent[0]} named by {indexes[0].name} is missing")
        return shards
    files = sorted(path.glob("*.safetensors"))
    return files if len(files) == 1 and not indexes else None


def safetensors_entries(files: list[Path]) -> dict[str, TensorEntry]:
    """Every tensor's place in ``files``, from their headers alone (nothing else is read)."""
    entries: dict[str, TensorEntry] = {}
    for file in files:
        try:
            with file.open("rb") as handle:
                (size,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(size))
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                start, end = info["data_offsets"]
                entries[name] = TensorEntry(file, 8 + size + start, end - start, info["dtype"], tuple(info["shape"]))
        except (OSError, ValueError, KeyError, TypeError, struct.error) as error:
            raise ConfigError(f"weights file {file} is not a readable safetensors file ({first_line(error)})") from None
    return entries


def read_in_place(model: nn.Module, path: Path) -> bool:
    """Read ``path`` (safetensors) straight into ``model``'s tensors when names, shapes and dtypes all match
    exactly; False (nothing read) otherwise. Peak memory: the model plus nothing."""
    files = safetensors_files(path)
    if not files:
        return False
    entries = safetensors_entries(files)
    targets = model.state_dict(keep_vars=True)
    if set(entries) != set(targets):
        return False
    for name, entry in entries.items():
        tensor = targets[name]
        if (_SAFETENSORS_DTYPES.get(entry.dtype) != tensor.dtype or entry.shape != tuple(tensor.shape)
                or not tensor.is_contiguous() or tensor.device.type != "cpu"
                or entry.length != tensor.numel() * tensor.element_size()):
            return False
    with torch.no_grad():
        for name, (file, offset, length, _, _) in entries.items():
            target = targets[name].detach()
            if length == 0:
                continue
            view = target.reshape(-1).view(torch.uint8).numpy()
            with file.open("rb") as handle:
                handle.seek(offset)
                if handle.readinto(view) != length:
                    raise ConfigError(f"weights file {file} is truncated: tensor {name!r} ends past the file")
    return True


def read_state_dict(path: str | Path) -> StateDict:
    path = Path(path)
    if path.is_dir():
        files = safetensors_files(path)
        if not files:
            raise ConfigError(f"weights folder {path} holds no safetensors checkpoint (one *.safetensors file, or "
                              "shards with their *.safetensors.index.json): pass a .safetensors or PyTorch .pt/.pth "
                              "file (for a Hugging Face model directory use hf:PATH)")
        state: dict = {}
        for file in files:
            state.update(read_state_dict(file))
        return state
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
            state = _torch_load(path)
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


def _torch_load(path: Path) -> object:
    """``torch.load`` memory-mapped (the zip format), else read whole (the legacy format cannot be mapped)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


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
    path = Path(path)
    if read_in_place(model, path):
        check_finite(model.state_dict().items(), f"weights file {path}")
        return
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
