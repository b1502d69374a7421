"""The exporter's own output, kept out of the CLI's: its loggers and prints silenced, its errors in one line.

Shared by the ONNX writer (``onnx_export``) and the local-function planner (``functions``), which both run the
exporter, so neither imports the other for it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from pathlib import Path


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None and error.__cause__ is not error:
        error = error.__cause__
    return error


_EXECUTING = re.compile(r"While executing %(\S+)")
_SOURCE = re.compile(r'File "([^"]+)", line (\d+)')


def summary(error: BaseException) -> str:
    """One line: the root cause's message, and for a failure inside the exporter the graph node it was executing
    and the model source line that node came from (the exporter's own text is a request to file an issue)."""
    root = _root_cause(error)
    text = str(root)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    message = lines[0] if lines else type(root).__name__
    if root is error:
        for line in lines:
            if "Error" in line or "error" in line:
                message = line
                break
    node = _EXECUTING.search(text)
    if node is None:
        return message[:300]
    where = f"at node {node.group(1)}"
    sources = _SOURCE.findall(text[node.end():])
    if sources:
        path, line = sources[-1]
        source_lines = text[node.end():].splitlines()
        code = next((source_lines[i + 1].strip() for i, s in enumerate(source_lines[:-1])
                     if f'"{path}", line {line}' in s), "")
        where += f" ({'/'.join(Path(path).parts[-3:])}:{line}" + (f": {code}" if code else "") + ")"
    return f"{where}: {type(root).__name__}: {message}"[:400]


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
