"""TensorRT engine builds as Ray tasks (`diffkiln build --backend tensorrt --ray [--address ADDR]`).

TensorRT-RTX builds ahead of time without a GPU, so any CPU node of a Ray cluster can build an engine. Each
(SKU, submodel) engine is one task; the driver (tensorrt_build.add_tensorrt_engines) keeps the engine cache,
writes the engines and the manifest exactly as the threaded build does, so cache keys and files are the same.
The source ONNX files go to the tasks through Ray's object store (put once per file, shared by all SKUs): no
shared storage is needed, and the object store must hold the largest submodel's ONNX (weights included).
Separate worker processes also keep concurrent builds for different SKUs out of each other's builder state.
Ray is the optional `serve` extra: imported here only, lazily.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

_remote = None


def _build_task(flavor_name: str, files: dict, onnx_name: str, input_shapes: dict, profile: dict, sku: str,
                config) -> tuple[bytes, float]:
    """In a Ray worker: write the shipped ONNX files into a temp dir, build one engine; (engine bytes, seconds)."""
    import ray

    from diffkiln.engines.tensorrt import load_flavor
    from diffkiln.engines.tensorrt_compile import build_engine

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="diffkiln-ray-build-") as tmp:
        for name, ref in files.items():  # the .onnx and its external-data file, if any
            Path(tmp, name).write_bytes(ray.get(ref))
        data = build_engine(load_flavor(flavor_name), Path(tmp) / onnx_name, input_shapes, profile, sku, config)
    return data, time.perf_counter() - start


class RayBuilds:
    """Submit one build task per engine; `result(sku, name)` waits for it. Connects to `address` (a running
    cluster) or starts a local Ray, and shuts down only a Ray it started."""

    def __init__(self, address: str | None, memory_per_build: int):
        from diffkiln.errors import DiffkilnError
        from diffkiln.serve import require_ray

        global _remote
        self.ray = ray = require_ray()
        self.own = not ray.is_initialized()
        if self.own:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        if _remote is None:
            _remote = ray.remote(_build_task)
        self.refs = {}
        self.shipped = {}  # source file -> its bytes in the object store
        total = ray.cluster_resources().get("memory", 0)
        # a task asking for more memory than any node has would wait for ever: refuse instead
        self.memory = memory_per_build if memory_per_build <= total else None
        if self.memory is None:
            self.shutdown()
            raise DiffkilnError(f"a TensorRT build of this model needs about {memory_per_build / 2**30:.1f} GiB of host "
                                f"memory; the Ray cluster has {total / 2**30:.1f} GiB for tasks")

    def submit(self, key, flavor_name: str, root: Path, files: list[str], input_shapes: dict, profile: dict, sku: str,
               config) -> None:
        """Queue the build of one engine from `files` (relative to `root`; the first is the .onnx)."""
        shipped = {}
        for f in files:
            for path in (root / f, root / f"{f}.data"):
                if path.is_file():
                    if path not in self.shipped:
                        self.shipped[path] = self.ray.put(path.read_bytes())
                    shipped[path.name] = self.shipped[path]
        self.refs[key] = _remote.options(num_cpus=1, memory=self.memory, max_retries=0).remote(
            flavor_name, shipped, Path(files[0]).name, input_shapes, profile, sku, config)

    def result(self, key) -> tuple[bytes, float]:
        return self.ray.get(self.refs.pop(key))

    def shutdown(self) -> None:
        self.refs.clear()
        self.shipped.clear()
        if self.own:
            self.ray.shutdown()
