"""Benchmark suites: a declared matrix of model preset x resolution x steps x batch x backend x precision."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

from diffkiln.errors import DiffkilnError


@dataclass(frozen=True)
class Case:
    """One measured configuration. `batch` is images per call; CFG doubles the transformer batch."""

    preset: str
    backend: str  # onnxruntime | tensorrt | aoti
    precision: str  # engine precision; eager runs the same dtype
    height: int
    width: int
    steps: int
    batch: int = 1
    guidance: float = 4.5
    device: str = "cpu"  # where eager (and aoti) run
    frames: int | None = None  # video models: frames per video (None: an image model)

    @property
    def engine_key(self) -> str:
        return f"{self.preset}-{self.backend}-{self.device}-{self.precision}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    presets: tuple[str, ...]
    backends: tuple[tuple[str, str, str], ...]  # (backend, precision, device)
    resolutions: tuple[tuple[int, int], ...]
    steps: tuple[int, ...]
    batches: tuple[int, ...] = (1,)
    repeats: int = 5
    warmup: int = 1
    needs_gpu: bool = False
    notes: str = ""
    # video suites: preset -> (height, width, frames), used instead of `resolutions`
    video_sizes: tuple[tuple[str, tuple[int, int, int]], ...] = ()

    def cases(self) -> list[Case]:
        sizes = dict(self.video_sizes)
        per_preset = {p: [sizes[p]] if p in sizes else [(h, w, None) for h, w in self.resolutions] for p in self.presets}
        return [Case(p, b, prec, h, w, s, n, device=dev, frames=f)
                for p, (b, prec, dev), s, n in itertools.product(self.presets, self.backends, self.steps, self.batches)
                for h, w, f in per_preset[p]]


SUITES: dict[str, Suite] = {s.name: s for s in [
    Suite("cpu-smoke", "tiny-sana on CPU, seconds: every number present (CI)", ("tiny-sana",),
          (("onnxruntime", "fp32", "cpu"),), ((64, 64),), (4,), repeats=3),
    Suite("cpu-small", "a mid-size Sana (sana-small-256) on 2 CPU cores, a few minutes", ("sana-small-256",),
          (("onnxruntime", "fp32", "cpu"), ("aoti", "fp32", "cpu")), ((256, 256),), (10,), repeats=3),
    Suite("gpu-sana", "Sana 0.6B / 1.6B at 1024 and 2048 px on one GPU, 20 steps", ("sana-600m-1024", "sana-1600m-1024"),
          (("aoti", "bf16", "cuda"),), ((1024, 1024), (2048, 2048)), (20,), repeats=3, needs_gpu=True,
          notes="AOTInductor only: TensorRT-RTX has no SM90 target and full TensorRT does not install; ONNX Runtime "
                "would need onnxruntime-gpu. The one prepared H100/H200 run is scripts/device_run.sh "
                "(diffkiln.benchmarks.device)"),
    Suite("cpu-video-smoke", "the tiny video models on CPU, seconds: every number present (CI)",
          ("tiny-t2v-ms", "tiny-cogvideox", "tiny-sana-video", "tiny-videocrafter2", "tiny-open-sora-v2"),
          (("onnxruntime", "fp32", "cpu"),), (), (2,), repeats=2,
          video_sizes=(("tiny-t2v-ms", (32, 32, 8)), ("tiny-cogvideox", (32, 32, 9)), ("tiny-sana-video", (32, 32, 9)),
                       ("tiny-videocrafter2", (32, 32, 8)), ("tiny-open-sora-v2", (32, 32, 9)))),
    Suite("gpu-video", "real video architectures (random weights) at their native sizes on one GPU, 20 steps",
          ("text-to-video-ms-1.7b", "cogvideox-2b", "sana-video-2b", "videocrafter2", "open-sora-v2"),
          (("aoti", "bf16", "cuda"), ("tensorrt", "fp16", "cuda")), (), (20,), repeats=3, needs_gpu=True,
          # open-sora-v2: 256 px, 65 frames (17 latent frames x 16 x 16 patches = 4352 tokens + 512 text tokens);
          # its 11.9 B transformer is 23.8 GB in bf16 and T5-XXL 9.5 GB: one H200 (139 GiB) holds both
          video_sizes=(("text-to-video-ms-1.7b", (256, 256, 16)), ("cogvideox-2b", (480, 720, 49)),
                       ("sana-video-2b", (480, 832, 81)), ("videocrafter2", (320, 512, 16)),
                       ("open-sora-v2", (256, 256, 65))),
          notes="TensorRT-RTX has no SM90 target: on H100/H200 only full TensorRT builds there"),
]}


def get_suite(name: str) -> Suite:
    try:
        return SUITES[name]
    except KeyError:
        raise DiffkilnError(f"Unknown benchmark suite {name!r}; available: {', '.join(SUITES)}") from None
