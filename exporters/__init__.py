"""Exporters: PyTorch ATS model -> ONNX graph -> TensorRT engine, and their checks."""
