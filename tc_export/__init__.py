"""tc-export: export token-compressed transformers to static-shape ONNX and TensorRT.

Python API::

    import tc_export as tc
    loaded = tc.load_model("vit_b")                       # or any nn.Module with example inputs
    compressed = tc.compress(loaded, tc.ToMeConfig(r=16))
    tc.export_onnx(compressed.module, loaded.example_inputs(), Path("model.onnx"), tc.ExportConfig())
"""

from __future__ import annotations

from .job.compress import CompressedModel, compress
from .errors import TCExportError
from .export.onnx_export import ExportConfig, export_onnx
from .export.checks.parity import ParityConfig, check_parity
from .models import ModelOptions, load_model
from .passes import ToMeConfig
from .job.pipeline import JobConfig, run_job

__all__ = [
    "CompressedModel",
    "ExportConfig",
    "JobConfig",
    "ModelOptions",
    "ParityConfig",
    "TCExportError",
    "ToMeConfig",
    "check_parity",
    "compress",
    "export_onnx",
    "load_model",
    "run_job",
]
