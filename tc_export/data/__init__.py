"""Real English text that ships offline: sentences from the Python standard library's docstrings.

Used where real sentences matter (MiniLM's fidelity under compression); deterministic for a given Python.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re

_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions",
    "ftplib", "functools", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "imaplib",
    "inspect", "ipaddress", "itertools", "json", "locale", "logging", "mailbox", "multiprocessing", "numbers",
    "operator", "optparse", "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "sched", "secrets",
    "selectors", "shelve", "shlex", "shutil", "smtplib", "socket", "sqlite3", "ssl", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback", "turtle",
    "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom",
    "zipfile", "zoneinfo",
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PLAIN = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'()\-]+[.!?]$")


def _docstrings(module_name: str) -> list[str]:
    try:
        module = importlib.import_module(module_name)
    except Exception:  # noqa: BLE001 - a module missing from this Python just contributes nothing
        return []
    docs = [inspect.getdoc(module) or ""]
    for name in sorted(vars(module)):
        value = getattr(module, name)
        if not name.startswith("_") and (inspect.isfunction(value) or inspect.isclass(value)):
            docs.append(inspect.getdoc(value) or "")
    return docs


@functools.lru_cache(maxsize=1)
def sentences(min_words: int = 6, max_words: int = 40) -> tuple[str, ...]:
    """Distinct plain-prose sentences (6-40 words) from standard-library docstrings, in a fixed order."""
    seen: dict[str, None] = {}
    for module_name in _MODULES:
        for doc in _docstrings(module_name):
            for paragraph in doc.split("\n\n"):
                text = " ".join(paragraph.split())
                for sentence in _SENTENCE_END.split(text):
                    if _PLAIN.match(sentence) and min_words <= len(sentence.split()) <= max_words:
                        seen.setdefault(sentence, None)
    return tuple(seen)
