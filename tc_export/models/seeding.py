"""Random weights from a fixed seed: the same command builds the same model, every run.

Every random weight tc-export creates (a model built without ``--weights``/``--pretrained``, missing tensors a
library initialises, a projector without ``--projector-weights``) is drawn inside ``seeded_weights(seed)``: the
global RNGs (torch, Python's ``random``, NumPy) are seeded on entry and restored on exit, so the caller's random
state is untouched and the weights do not depend on what ran before. ``load_model`` wraps the builder in it and
``compress`` the passes (a projector re-enters it with the same seed, so its weights do not depend on the order
of the ops either). The seed is ``ModelOptions.weights_seed`` (``--weights-seed``); 0 unless given.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from contextvars import ContextVar

import numpy
import torch

DEFAULT_WEIGHTS_SEED = 0
MAX_WEIGHTS_SEED = 2**63 - 1  # torch.manual_seed takes a 64-bit seed

_SEED: ContextVar[int] = ContextVar("tc_export_weights_seed", default=DEFAULT_WEIGHTS_SEED)


def current_weights_seed() -> int:
    """The seed of the ``seeded_weights`` block around the caller (``DEFAULT_WEIGHTS_SEED`` outside any)."""
    return _SEED.get()


@contextlib.contextmanager
def seeded_weights(seed: int | None = None) -> Iterator[int]:
    """Seed torch, ``random`` and NumPy with ``seed`` (None: the enclosing block's) for the body; restore them after."""
    seed = current_weights_seed() if seed is None else seed
    token = _SEED.set(seed)
    python_state, numpy_state = random.getstate(), numpy.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            numpy.random.seed(seed % 2**32)  # NumPy's legacy seed is 32 bits
            yield seed
    finally:
        random.setstate(python_state)
        numpy.random.set_state(numpy_state)
        _SEED.reset(token)
