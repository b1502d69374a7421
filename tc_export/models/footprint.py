"""Too big is said before the work: the export's peak memory estimated from the parameter count, before loading.

The count comes without building the weights: a timm model is built on the meta device; ``hf:DIR`` reads its
safetensors headers (or its index file's total size, or the size of a PyTorch checkpoint), else builds its
config on the meta device. The peak is ``PEAK_PER_WEIGHT_BYTE`` times the fp32 weights (the model loads in fp32),
measured by ``benchmarks/export_memory.py`` (README, "Big towers"); with ``--dtype fp16`` the fp32 weights are
freed once cast, and the export and parity then hold the half-precision copies.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from .registry import ModelOptions

# Peak resident memory of an export (load, compress, export, parity, fidelity) per byte of fp32 weights: the
# at-most-3x target the export-memory benchmark checks on ViT-H/14 and DINOv2-g (README, "Big towers").
PEAK_PER_WEIGHT_BYTE = 3.0
# The rest of the process (Python, torch, ONNX Runtime libraries, activations of one small batch).
OVERHEAD_BYTES = 1 << 30


@dataclass(frozen=True)
class Footprint:
    parameters: int

    def peak_bytes(self, dtype: str = "fp32") -> int:
        fp32 = 4 * self.parameters
        if dtype == "fp32":
            return int(PEAK_PER_WEIGHT_BYTE * fp32) + OVERHEAD_BYTES
        # loading holds the fp32 weights (and the cast one tensor at a time); then 3x the half-precision weights
        return int(max(1.0 * fp32, PEAK_PER_WEIGHT_BYTE * fp32 / 2)) + OVERHEAD_BYTES


def machine_memory() -> int:
    """Bytes of memory this process may use: physical memory, or the cgroup's limit where that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def parameter_count(name: str, options: ModelOptions) -> int | None:
    """Parameters of model ``name`` without building its weights; None where that cannot be known cheaply."""
    prefix, sep, rest = name.partition(":")
    if sep and prefix == "timm":
        return _timm_count(rest, options)
    if sep and prefix == "hf":
        return _hf_count(Path(rest))
    from .timm_models import SHORT_NAMES

    if name in SHORT_NAMES:
        return _timm_count(SHORT_NAMES[name], options)
    return None  # the built-in small models


def check_fits(name: str, options: ModelOptions, dtype: str = "fp32") -> Footprint | None:
    """Raise a one-line ``ConfigError`` when the export of ``name`` cannot fit in this machine's memory."""
    count = parameter_count(name, options)
    if count is None:
        return None
    footprint = Footprint(count)
    memory = machine_memory()
    peak = footprint.peak_bytes(dtype)
    if peak <= memory:
        return footprint
    other = [d for d in ("fp16",) if d != dtype and footprint.peak_bytes(d) <= memory]
    fix = (f"--dtype {other[0]} would need about {_gb(footprint.peak_bytes(other[0]))}" if other else
           f"no --dtype fits (fp16 would need about {_gb(footprint.peak_bytes('fp16'))}): export on a machine "
           f"with at least {_gb(min(peak, footprint.peak_bytes('fp16')))} of memory")
    raise ConfigError(f"{name} has {count / 1e9:.2f} B parameters ({_gb(4 * count)} in fp32): exporting it in "
                      f"{dtype} needs about {_gb(peak)} of memory, this machine has {_gb(memory)}; {fix}")


def _gb(value: int) -> str:
    return f"{value / 1e9:.1f} GB"


def _timm_count(arch: str, options: ModelOptions) -> int | None:
    import timm

    if not timm.is_model(arch):
        return None  # the loader names the problem
    kwargs = {"img_size": options.img_size} if options.img_size else {}
    try:
        with torch.device("meta"):
            module = timm.create_model(arch, pretrained=False, **kwargs)
    except Exception:  # noqa: BLE001 - an architecture that cannot build on meta is simply not estimated
        return None
    return sum(p.numel() for p in module.parameters())


def _hf_count(folder: Path) -> int | None:
    """From the weights' headers, else the index file's total size, else a checkpoint's size, else the config."""
    if not folder.is_dir():
        return None
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        try:
            return sum(_safetensors_count(path) for path in shards)
        except (OSError, ValueError, KeyError, struct.error):
            return None
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            try:
                return int(json.loads((folder / index).read_text())["metadata"]["total_size"]) // 4
            except (OSError, ValueError, KeyError, TypeError):
                return None
    if (folder / "pytorch_model.bin").is_file():
        return (folder / "pytorch_model.bin").stat().st_size // 4
    return _hf_config_count(folder)


def _safetensors_count(path: Path) -> int:
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    count = 0
    for key, entry in header.items():
        if key != "__metadata__":
            numel = 1
            for dim in entry["shape"]:
                numel *= int(dim)
            count += numel
    return count


def _hf_config_count(folder: Path) -> int | None:
    from .hf_auto import choose_class, read_config

    try:
        choice = choose_class(read_config(folder, f"hf:{folder}"), f"hf:{folder}")
        with torch.device("meta"):
            module = choice.cls(choice.config)
    except Exception:  # noqa: BLE001 - the loader reports a bad directory in its own words
        return None
    return sum(p.numel() for p in module.parameters())
