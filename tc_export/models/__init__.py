"""Model loading: the registry of short names, ``timm:ARCH``, weights files."""

from __future__ import annotations

from typing import Any

from . import registry
from .base import InputSpec, LoadedModel
from .registry import MODELS, ModelOptions, RandomWeightsWarning

__all__ = ["MODELS", "InputSpec", "LoadedModel", "ModelOptions", "RandomWeightsWarning", "load_model"]


def load_model(name: str, options: ModelOptions | None = None, **kwargs: Any) -> LoadedModel:
    """Build a registered model (``vit_b``), a prefixed one (``timm:NAME``, ``hf:PATH``) in eval mode
    (``registry.load_model``), once the modules whose entries register themselves are imported. They are imported
    here, on first use, rather than by the registry they register with (heavy: timm, transformers)."""
    from . import hf_models, mnist, timm_models, towers  # noqa: F401 - registers their entries

    return registry.load_model(name, options, **kwargs)
