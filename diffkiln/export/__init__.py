"""Export: each submodel to ONNX, checked against eager PyTorch in ONNX Runtime."""
