"""Plugins: custom kernels (Triton), their torch custom ops, ONNX custom-op schemas and lowerings.

Nothing lands here yet: the fused linear-attention and NVFP4/FP8 ops are tracked in their own issue.
"""
