"""Benchmarks: latency, memory and quality of compiled engines against eager PyTorch in the same run."""
