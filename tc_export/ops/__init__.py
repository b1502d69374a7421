"""Compressed ops: self-contained units with a plain tensor interface.

Each op is a function plus an ``nn.Module`` wrapper holding its static settings. Graph passes insert the module
as a leaf call, so the exporter sees one unit per site (the unit a TensorRT plugin can later replace).
"""

from .attention import proportional_bias
from .tome import ToMeMerge, tome_merge

__all__ = ["ToMeMerge", "proportional_bias", "tome_merge"]
