"""Export to ONNX, check parity with Polygraphy, build TensorRT engines, count MACs."""
