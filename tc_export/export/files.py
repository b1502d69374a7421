"""Files: output paths checked before work starts, written under a temporary name and renamed when complete;
ONNX files the user names, read with a one-line error when they are not ONNX."""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    import onnx

OUTPUT_SUFFIXES = (".onnx", ".engine", ".plan")


def created_timestamp() -> str:
    """When a manifest or sidecar was written (UTC, seconds): now, or ``SOURCE_DATE_EPOCH`` when set, so a rebuild
    can give the same bytes (https://reproducible-builds.org/specs/source-date-epoch/)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    try:
        moment = datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc) if epoch else None
    except (ValueError, OverflowError, OSError):
        raise ConfigError(f"SOURCE_DATE_EPOCH must be a whole number of seconds since 1970, got {epoch!r}") from None
    return (moment or datetime.datetime.now(datetime.timezone.utc)).isoformat(timespec="seconds")


def check_output_path(path: Path) -> Path:
    """Fail early (before any export work) on an unknown suffix or a directory that cannot be written."""
    if path.suffix not in OUTPUT_SUFFIXES:
        raise ConfigError(f"unknown output suffix {path.suffix or '(none)'!r} in {path}: use .onnx or .engine (.plan)")
    parent = path.resolve().parent
    if not parent.is_dir():
        raise ConfigError(f"cannot write {path}: directory {parent} does not exist")
    if path.is_dir():
        raise ConfigError(f"cannot write {path}: it is a directory")
    try:  # a real probe: permission bits say nothing for root or on read-only mounts
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{path.name}.probe-"):
            pass
    except OSError as error:
        raise ConfigError(f"cannot write {path}: directory {parent} is not writable ({error.strerror})") from None
    return path


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it to ``path`` only if the block succeeds, else remove it."""
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_outputs(*paths: Path) -> Iterator[tuple[Path, ...]]:
    """``atomic_output`` for files written together (an ONNX and its data file): yield the same names inside a
    temporary sibling directory (so the ONNX names its data file by its final name); rename them all into place
    only if the block succeeds, the first named last (the ONNX appears only once its data file is there)."""
    parent = paths[0].resolve().parent
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{paths[0].name}.partial-"))
    try:
        temporaries = tuple(staging / path.name for path in paths)
        yield temporaries
        for tmp, path in reversed(list(zip(temporaries, paths))):
            os.replace(tmp, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def data_file_name(onnx_path: Path) -> Path:
    """The external-data file written beside ``onnx_path`` (``model.onnx`` -> ``model.onnx.data``)."""
    return onnx_path.with_name(f"{onnx_path.name}.data")


def external_data_files(onnx_path: Path) -> list[Path]:
    """The data files ``onnx_path``'s initializers name (none for an ONNX holding its weights), in order."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    locations: dict[str, None] = {}
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations.update({entry.value: None for entry in tensor.external_data if entry.key == "location"})
    return [onnx_path.parent / location for location in locations]


def read_onnx(path: str | Path, action: str) -> onnx.ModelProto:
    """The ONNX model at ``path`` without external weights; ``action`` names what the user asked for ("lint")."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"cannot {action} {path}: no such file")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as error:  # noqa: BLE001 - any parse failure means: not an ONNX file
        raise ConfigError(f"cannot {action} {path}: not a readable ONNX model ({type(error).__name__})") from None
