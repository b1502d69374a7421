"""The exporter's own output, kept out of the CLI's: its loggers and prints silenced, its errors in one line.

Shared by the ONNX writer (``onnx_export``) and the local-function planner (``functions``), which both run the
exporter, so neither imports the other for it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings


def summary(error: BaseException) -> str:
    """The line of an exporter error that says what went wrong (at most 300 characters)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "Error" in line or "error" in line:
            return line[:300]
    return (lines[0] if lines else type(error).__name__)[:300]


@contextlib.contextmanager
def quiet():
    """The exporter and graphsurgeon print progress; keep the CLI output ours."""
    sink = io.StringIO()
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "torch.export", "torch._export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
