"""A method config's field with its command-line help (``setting``), apart from the method registry so that the
shared field helpers (``passes/layers.py``) and the registry (``passes/methods.py``) import it one way."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


def setting(default: Any = dataclasses.MISSING, help: str = "", parse: Callable[[str], Any] | None = None,
            flag: str | None = None, metavar: str | None = None) -> Any:
    """A config field with its command-line help; ``parse`` turns the flag's text into the value."""
    metadata = {"help": help, "parse": parse, "flag": flag, "metavar": metavar}
    return dataclasses.field(default=default, metadata=metadata)
