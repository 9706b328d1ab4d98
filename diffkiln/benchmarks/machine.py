"""What a benchmark ran on: CPU, threads, GPU and driver, library versions; and peak host and device memory."""

from __future__ import annotations

import os
import platform


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


def _hwm_bytes() -> int | None:
    """The kernel's own peak-RSS counter (VmHWM), or None where /proc has none."""
    try:
        with open("/proc/self/status") as f:
            line = next((x for x in f if x.startswith("VmHWM:")), None)
    except OSError:
        return None
    return None if line is None else int(line.split()[1]) * 1024


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def driver_used_bytes() -> int | None:
    """Device memory in use on GPU 0 as the driver counts it (every allocation of every allocator: PyTorch's
    cache, AOTInductor's constants, the CUDA context), or None without a GPU."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return total - free


class PeakMemory:
    """Peak memory while the block runs, read from counters before and after it: nothing runs beside the timed
    code (no sampling thread).

    host_peak: the kernel's peak-RSS counter (VmHWM, reset on entry) or, where it cannot be reset, the larger
    of the RSS before and after (host_source says which). cuda_peak: PyTorch's max allocated bytes;
    cuda_reserved_peak: its max reserved (cached) bytes. driver_used_before/after: the driver's used bytes
    (torch.cuda.mem_get_info) on entry and exit. device_peak: the driver-level peak estimate
    driver_used_after - reserved_after + reserved_peak, which counts memory PyTorch's allocator never sees
    (AOTInductor's weights, cuBLAS workspaces, the context) as well as the allocator's peak."""

    def __enter__(self):
        self._cuda = self._cuda_module()
        self.cuda_peak = self.cuda_reserved_peak = self.device_peak = None
        self.driver_used_before = self.driver_used_after = None
        if self._cuda:
            self._cuda.synchronize()
            self._cuda.reset_peak_memory_stats()
            self.driver_used_before = driver_used_bytes()
        self._rss_before = _rss_bytes()
        self.host_source = "VmHWM" if _reset_hwm() and _hwm_bytes() is not None else "rss before/after"
        self.host_peak = self._rss_before
        return self

    @staticmethod
    def _cuda_module():
        try:
            import torch
        except ImportError:
            return None
        return torch.cuda if torch.cuda.is_available() else None

    def __exit__(self, *exc):
        rss = _rss_bytes()
        hwm = _hwm_bytes() if self.host_source == "VmHWM" else None
        self.host_peak = max(self._rss_before, rss, hwm or 0)
        if self._cuda:
            self._cuda.synchronize()
            self.cuda_peak = self._cuda.max_memory_allocated()
            self.cuda_reserved_peak = self._cuda.max_memory_reserved()
            self.driver_used_after = driver_used_bytes()
            self.device_peak = self.driver_used_after - self._cuda.memory_reserved() + self.cuda_reserved_peak
        return False

    def as_dict(self) -> dict:
        gib = lambda b: None if b is None else round(b / 2**30, 3)  # noqa: E731
        return {"host_peak_gib": gib(self.host_peak), "host_source": self.host_source,
                "torch_peak_allocated_gib": gib(self.cuda_peak), "torch_peak_reserved_gib": gib(self.cuda_reserved_peak),
                "driver_used_before_gib": gib(self.driver_used_before), "driver_used_after_gib": gib(self.driver_used_after),
                "device_peak_gib": gib(self.device_peak)}
