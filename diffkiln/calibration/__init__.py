"""Calibration: activation statistics over a prompt set -> FP8 / NVFP4 scales.

Nothing lands here yet: calibration and quantized engines are tracked in their own issue.
"""
