"""Files: output paths checked before work starts, written under a temporary name and renamed when complete;
ONNX files the user names, read with a one-line error when they are not ONNX."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    import onnx

OUTPUT_SUFFIXES = (".onnx", ".engine", ".plan")


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
