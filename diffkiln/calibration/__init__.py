"""Calibration: activation statistics over a prompt set -> per-layer amax for FP8 / NVFP4 scales."""
