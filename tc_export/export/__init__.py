"""Writing ONNX (``onnx_export``, ``functions``: token ops as local functions, ``files``, ``precision``,
``quantize``, ``macs``), the checks of an exported file (``checks/``: parity, decisions, fidelity, verify) and
TensorRT (``tensorrt/``: lint, engines, the plugins' registration, parity bundles)."""
