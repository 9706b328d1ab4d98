"""What a benchmark ran on: CPU, threads, GPU and driver, library versions; and peak host memory."""

from __future__ import annotations

import os
import platform
import threading
import time


def describe_machine() -> dict:
    from diffkiln.export.pipeline import tool_versions

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    out = {"cpu": cpu, "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
           "versions": tool_versions("diffkiln", "torch", "diffusers", "transformers", "onnxruntime", "onnxruntime-gpu",
                                     "tensorrt", "tensorrt-rtx", "numpy")}
    try:
        import torch

        out["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            out["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1),
                          "cuda": torch.version.cuda}
            try:
                import pynvml

                pynvml.nvmlInit()
                out["gpu"]["driver"] = pynvml.nvmlSystemGetDriverVersion()
            except Exception:  # NVML missing or unusable: the driver version is simply not reported
                pass
    except ImportError:
        pass
    return out


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak host RSS (sampled every 2 ms on Linux) and CUDA max allocated while the block runs."""

    def __enter__(self):
        self.host_peak = self._start = _rss_bytes()
        self.cuda_peak = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._cuda = self._cuda_module()
        if self._cuda:
            self._cuda.reset_peak_memory_stats()
        return self

    @staticmethod
    def _cuda_module():
        try:
            import torch
        except ImportError:
            return None
        return torch.cuda if torch.cuda.is_available() else None

    def _sample(self):
        while not self._stop.is_set():
            self.host_peak = max(self.host_peak, _rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.host_peak = max(self.host_peak, _rss_bytes())
        if self._cuda:
            self._cuda.synchronize()
            self.cuda_peak = self._cuda.max_memory_allocated()
        return False
