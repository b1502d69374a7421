"""Random numbers drawn in a forward: an export would freeze one draw, so such a model is refused by name."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import ConfigError

# ATen ops that draw from a random generator (dropout only dispatches these in training mode).
RANDOM_OPS = frozenset({
    "bernoulli", "bernoulli_", "cauchy_", "exponential_", "geometric_", "log_normal_", "multinomial", "native_dropout",
    "normal", "normal_", "poisson", "rand", "rand_like", "randint", "randint_like", "randn", "randn_like", "randperm",
    "random_", "uniform_", "rrelu_with_noise", "_fused_dropout", "_standard_gamma", "_sample_dirichlet",
})


class _RandomOpRecorder(TorchDispatchMode):
    """Notes the first random ATen op dispatched and the module running at that moment."""

    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack = stack
        self.found: tuple[str, str] | None = None

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if self.found is None and func.overloadpacket.__name__ in RANDOM_OPS:
            self.found = (f"aten.{func.overloadpacket.__name__}", self.stack[-1] if self.stack else "")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def refuse_random_ops(model: nn.Module, name: str) -> Iterator[None]:
    """Run the body (a forward of ``model``); raise a one-line ``ConfigError`` naming the op and the module if
    it drew random numbers."""
    stack: list[str] = []
    kinds = {path: type(module).__name__ for path, module in model.named_modules()}

    def enter(path: str) -> Callable[..., None]:
        return lambda *_: stack.append(path) and None

    def leave(*_: Any) -> None:
        stack.pop()

    handles = []
    for path, module in model.named_modules():
        handles += [module.register_forward_pre_hook(enter(path)), module.register_forward_hook(leave)]
    recorder = _RandomOpRecorder(stack)
    try:
        with recorder:
            yield
    finally:
        for handle in handles:
            handle.remove()
    if recorder.found is not None:
        op, path = recorder.found
        where = f"{path} ({kinds[path]})" if path else f"{type(model).__name__}'s own forward"
        takes_noise = "noise" in inspect.signature(model.forward).parameters
        argument = " (its forward argument 'noise' would fix the draw; tc-export builds no input for it)" \
            if takes_noise else ""
        raise ConfigError(f"{name}: {type(model).__name__} draws random numbers in its forward: {op} in {where}"
                          f"{argument}; an export would freeze one draw, so it is refused (random masking and "
                          "training-mode dropout belong to pretraining: export an inference model)")

