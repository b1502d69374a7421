"""Model loading: the registry of short names, ``timm:ARCH``, weights files."""

from .base import InputSpec, LoadedModel
from .registry import MODELS, ModelOptions, RandomWeightsWarning, load_model

__all__ = ["MODELS", "InputSpec", "LoadedModel", "ModelOptions", "RandomWeightsWarning", "load_model"]
