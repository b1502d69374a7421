"""User-facing errors.

Every error the user can cause (bad flags, missing files, a model whose structure a pass cannot find) is a
``TCExportError``: the CLI prints its one-line message and exits non-zero without a traceback.
"""

from __future__ import annotations

from pathlib import Path


class TCExportError(Exception):
    """An error with a one-line message that says what is wrong and how to fix it."""

    exit_code: int = 2


class ConfigError(TCExportError):
    """A configuration value is invalid."""


class StructureNotFoundError(TCExportError):
    """A graph pass could not find the structure it needs (attention, residual add, ...)."""


class ParityError(TCExportError):
    """Two runtimes disagree beyond the tolerances. ``failure`` says which output and by how much; ``kept`` is
    the ONNX file left for inspection (None: none was kept)."""

    exit_code = 1

    def __init__(self, failure: str, kept: Path | None = None) -> None:
        super().__init__(failure if kept is None else f"{failure}; ONNX kept at {kept}")
        self.failure = failure


class BackendUnavailableError(TCExportError):
    """An optional backend (TensorRT, a GPU, transformers) is missing."""

    exit_code = 3


class InternalError(TCExportError):
    """A bug in tc-export itself (a pass broke an invariant it promises), not something the user did."""

    exit_code = 70

    def __init__(self, message: str) -> None:
        super().__init__(f"internal error: {message} (this is a tc-export bug: please report it with the command)")
