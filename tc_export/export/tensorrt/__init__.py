"""TensorRT: the operator-support lint (``lint``, rules in ``trt_support.yaml``), engines and target presets
(``engine``), the registration of the plugins (``plugins``) and the parity bundle for a device (``bundle``).

TensorRT itself is imported lazily everywhere: nothing here needs it to be importable.
"""

from __future__ import annotations

import importlib
import importlib.util


def load_trt_plugins() -> bool:
    """Register the TensorRT plugins (``tc_export::ToMeMerge``, ``tc_export::TopKSelect``) if TensorRT is present.

    Returns False, registering nothing, where ``tensorrt`` cannot be imported. Registering twice is a no-op.
    """
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        import tensorrt.plugin  # noqa: F401  (needs the TensorRT libraries, not only the bindings wheel)
    except (ImportError, OSError):
        return False
    importlib.import_module(f"{__name__}.plugins")
    return True
