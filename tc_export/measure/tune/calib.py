"""``--calib PATH``: the user's own inputs for ranking schedules.

A folder of images goes through the model's own preprocessing (timm's data config; mnist_vit's normalisation);
images in subfolders named by a class index carry that label. A text file gives one sentence per line, tokenized
and padded as the model's tokenizer does. A tensor file (.pt, .npy, .npz, .safetensors) holds the inputs
themselves: one tensor, or a mapping by input name, plus optional ``labels``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
TENSOR_SUFFIXES = (".pt", ".pth", ".npy", ".npz", ".safetensors")


@dataclass(frozen=True)
class CalibData:
    """Inputs keyed by forward-argument name (first dimension: samples), optional labels, and where from."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor | None
    source: str
    seeded: bool = False  # True: made up from seeds, not the user's data

    def __len__(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])


def seeded_calib(loaded: Any, samples: int, seed: int = 1000) -> CalibData:
    """The model's own example inputs (seeded); random for most models, which ranks schedules poorly."""
    return CalibData(loaded.example_inputs(batch=samples, seed=seed), None, f"{samples} seeded inputs", seeded=True)


def load_calib(path: Path, loaded: Any, limit: int | None = None) -> CalibData:
    """Read ``path`` (image folder, text file or tensor file) into inputs for ``loaded``."""
    if not path.exists():
        raise ConfigError(f"--calib {path} does not exist: give a folder of images, a text file or a tensor file")
    if path.is_dir():
        data = _images(path, loaded)
    elif path.suffix.lower() in TENSOR_SUFFIXES:
        data = _tensors(path, loaded)
    elif path.suffix.lower() in (".txt", ".text", ""):
        data = _sentences(path, loaded)
    else:
        raise ConfigError(f"--calib {path}: unknown kind {path.suffix!r}; give a folder of images, a .txt file of "
                          f"sentences or a tensor file ({', '.join(TENSOR_SUFFIXES)})")
    if limit is not None and len(data) > limit:
        labels = None if data.labels is None else data.labels[:limit]
        data = CalibData({k: v[:limit] for k, v in data.inputs.items()}, labels, data.source)
    return data


def _check_inputs(inputs: dict[str, torch.Tensor], loaded: Any, source: str) -> None:
    for spec in loaded.inputs:
        if spec.name not in inputs:
            raise ConfigError(f"--calib {source}: no input {spec.name!r} (the model takes "
                              f"{', '.join(s.name for s in loaded.inputs)})")
        shape = tuple(inputs[spec.name].shape[1:])
        if shape != tuple(spec.shape):
            raise ConfigError(f"--calib {source}: input {spec.name!r} has per-sample shape {shape}, the model "
                              f"takes {tuple(spec.shape)}")
    sizes = {int(v.shape[0]) for v in inputs.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise ConfigError(f"--calib {source}: inputs must have the same, non-zero number of samples, got {sorted(sizes)}")


def _tensors(path: Path, loaded: Any) -> CalibData:
    import numpy as np

    suffix = path.suffix.lower()
    try:
        if suffix in (".pt", ".pth"):
            raw: Any = torch.load(path, map_location="cpu", weights_only=True)
        elif suffix == ".npy":
            raw = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                raw = {k: archive[k] for k in archive.files}
        else:
            from safetensors.torch import load_file

            raw = load_file(str(path))
    except Exception as error:  # noqa: BLE001 - any reader failure is the file's problem
        raise ConfigError(f"--calib {path}: cannot read it as {suffix} ({type(error).__name__})") from None
    if not isinstance(raw, dict):
        if len(loaded.inputs) != 1:
            raise ConfigError(f"--calib {path}: one tensor, but the model takes "
                              f"{', '.join(s.name for s in loaded.inputs)}: save a mapping by input name")
        raw = {loaded.inputs[0].name: raw}
    tensors = {k: torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v for k, v in raw.items()}
    labels = tensors.pop("labels", None)
    by_name = {spec.export_name: spec.name for spec in loaded.inputs}
    tensors = {by_name.get(k, k): v.to(spec_dtype(loaded, by_name.get(k, k))) for k, v in tensors.items()}
    _check_inputs(tensors, loaded, str(path))
    return CalibData(tensors, None if labels is None else labels.long(), f"{path} ({len(next(iter(tensors.values())))} samples)")


def spec_dtype(loaded: Any, name: str) -> torch.dtype:
    return next((spec.dtype for spec in loaded.inputs if spec.name == name), torch.float32)


def _sentences(path: Path, loaded: Any) -> CalibData:
    tokenizer = getattr(loaded, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError(f"--calib {path}: {loaded.name} has no tokenizer here; give a tensor file of "
                          f"{', '.join(s.name for s in loaded.inputs)} instead")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise ConfigError(f"--calib {path}: not UTF-8 text (one sentence per line)") from None
    if not lines:
        raise ConfigError(f"--calib {path}: no sentences (one per line)")
    from ...models.hf_models import tokenize

    length = next(spec.shape[-1] for spec in loaded.inputs if spec.name == "input_ids")
    return CalibData(tokenize(tokenizer, lines, length), None, f"{path} ({len(lines)} sentences)")


def _images(folder: Path, loaded: Any) -> CalibData:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"--calib {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    transform = _image_transform(loaded, folder)
    from PIL import Image

    images, labels = [], []
    for file in files:
        with Image.open(file) as image:
            images.append(transform(image))
        parent = file.parent.name
        labels.append(int(parent) if file.parent != folder and parent.isdigit() else -1)
    name = loaded.inputs[0].name
    tensor = torch.stack(images)
    _check_inputs({name: tensor}, loaded, str(folder))
    known = all(label >= 0 for label in labels)
    return CalibData({name: tensor}, torch.tensor(labels) if known else None,
                     f"{folder} ({len(files)} images{', labelled by folder' if known else ''})")


def _image_transform(loaded: Any, folder: Path) -> Any:
    """The model's preprocessing: mnist_vit's digits, else timm's data config of the module."""
    if loaded.name == "mnist_vit":
        import numpy as np

        from ...data.mnist import IMAGE_SHAPE, MEAN, STD

        def digits(image: Any) -> torch.Tensor:
            gray = np.asarray(image.convert("L").resize(IMAGE_SHAPE[1:]), dtype=np.float32) / 255.0
            return ((torch.from_numpy(gray) - MEAN) / STD).unsqueeze(0)

        return digits
    try:
        import timm.data

        config = timm.data.resolve_data_config({}, model=loaded.module)
        config["input_size"] = tuple(loaded.inputs[0].shape)  # the size this model was built at, not its default
        transform = timm.data.create_transform(**config)
    except Exception:  # noqa: BLE001 - not a timm model
        raise ConfigError(f"--calib {folder}: no image preprocessing known for {loaded.name} (timm models and "
                          "mnist_vit have one); give a tensor file of preprocessed inputs instead") from None
    return lambda image: transform(image.convert("RGB"))
