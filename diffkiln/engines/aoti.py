"""AOTInductor engines: `torch.export` with the declared dynamic ranges -> `aoti_compile_and_package` -> `.pt2`.

A `.pt2` package holds a compiled shared library (C++ on CPU, Triton kernels on CUDA) and the
weights; it runs without the Python model code. It is tied to the device type, the CPU ISA it
was compiled for, and the torch version: all three are checked before a package is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from diffkiln.engines.base import Engine
from diffkiln.engines.registry import Backend, register
from diffkiln.errors import DiffkilnError
from diffkiln.manifest import PRECISION_DTYPE as PRECISIONS
from diffkiln.manifest import EngineEntry, SubmodelSpec, path_of
from diffkiln.progress import log, progress

DEVICES = ("cpu", "cuda")
ENGINE_DIR = "aoti"


@dataclass
class AotiBuildConfig:
    """How to compile. Validated on creation and recorded in the manifest."""

    device: str = "cpu"
    precision: str = "fp32"
    max_autotune: bool = False  # inductor's autotuned kernels: slower builds, faster engines (mostly CUDA)
    fused_linear_attention: bool = False  # diffkiln::relu_linear_attention (Triton on CUDA, torch reference on CPU)
    version: int = 1

    def __post_init__(self):
        if self.device not in DEVICES:
            raise DiffkilnError(f"AOTInductor device {self.device!r}; expected one of {DEVICES}")
        if self.precision not in PRECISIONS:
            raise DiffkilnError(f"AOTInductor precision {self.precision!r}; expected one of {tuple(PRECISIONS)}")
        if self.device == "cpu" and self.precision != "fp32":
            raise DiffkilnError(f"AOTInductor on CPU builds fp32 engines; {self.precision} needs --device cuda")

    @property
    def export_dtype(self) -> str:
        return PRECISIONS[self.precision]

    def to_dict(self) -> dict:
        return asdict(self)


def package_metadata(path: Path) -> dict:
    """The AOTI_* facts inductor writes into a package (device, platform, CPU ISA, compute capability)."""
    try:
        with zipfile.ZipFile(path) as z:
            name = next(n for n in z.namelist() if n.endswith("wrapper_metadata.json"))
            return json.loads(z.read(name))
    except (zipfile.BadZipFile, StopIteration, json.JSONDecodeError, KeyError) as e:
        raise DiffkilnError(f"{path}: not an AOTInductor package ({type(e).__name__}: {e})") from e


def check_loadable(path: Path, built_with_torch: str) -> dict:
    """Refuse, before loading, a package this machine cannot run: other device, CPU ISA or torch version."""
    import torch

    meta = package_metadata(path)
    if built_with_torch != torch.__version__:
        raise DiffkilnError(f"{path.name} was compiled by torch {built_with_torch}, but torch {torch.__version__} is "
                            "installed; AOTInductor packages load only in the torch that built them. Rebuild.")
    device = meta.get("AOTI_DEVICE_KEY")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise DiffkilnError(f"{path.name} was compiled for CUDA (compute capability "
                                f"{meta.get('AOTI_COMPUTE_CAPABILITY') or '?'}), and torch.cuda sees no GPU here")
        major, minor = torch.cuda.get_device_capability()
        want = str(meta.get("AOTI_COMPUTE_CAPABILITY", "")).replace(".", "")
        if want and want != f"{major}{minor}":
            raise DiffkilnError(f"{path.name} was compiled for compute capability {want}; this GPU is {major}{minor}")
    elif device == "cpu":
        isa = meta.get("AOTI_CPU_ISA", "")
        here = torch.backends.cpu.get_cpu_capability()
        if "AVX512" in isa and "AVX512" not in here:
            raise DiffkilnError(f"{path.name} was compiled for a CPU with {isa}; this CPU offers {here}. Rebuild here.")
    else:
        raise DiffkilnError(f"{path.name}: unknown AOTInductor device {device!r}")
    return meta


def dynamic_shapes(spec: SubmodelSpec) -> tuple:
    """torch.export dynamic_shapes from the declared dim ranges: one `Dim` per name, shared across inputs;
    a dim that must be a multiple of m is m x a `Dim` (latent sides of a patch-size-2 transformer)."""
    from torch.export import Dim

    dims = {}
    for d, (lo, hi) in spec.dims.items():
        m = spec.multiples.get(d, 1)
        dims[d] = Dim(d, min=lo, max=hi) if m == 1 else m * Dim(f"{d}_over_{m}", min=-(-lo // m), max=hi // m)
    return tuple({ax: dims[d] for ax, d in enumerate(t.shape) if isinstance(d, str)} or None for t in spec.inputs)


def compile_submodel(sub, path: Path, config: AotiBuildConfig) -> dict:
    """Export `sub` with dynamic shapes and compile it into the package `path`; returns facts for the manifest."""
    import torch

    feeds = sub.sample(sub.shapes[0], 0)
    args = tuple(torch.from_numpy(feeds[t.name]).to(config.device) for t in sub.spec.inputs)
    module = sub.module.to(config.device)
    start = time.perf_counter()
    with torch.inference_mode(False), torch.no_grad():
        try:
            program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes(sub.spec), strict=False)
        except Exception as e:  # torch raises UserError / ConstraintViolationError / TorchRuntimeError ...
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise DiffkilnError(f"torch.export cannot export {sub.name} over its dynamic ranges {sub.spec.dims}: "
                                f"{first.strip()}") from e
    exported = time.perf_counter() - start
    options = {"max_autotune": config.max_autotune}
    torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=options)
    return {"export_seconds": round(exported, 3), "compile_seconds": round(time.perf_counter() - start - exported, 3),
            "bytes": path.stat().st_size, "package": package_metadata(path)}


def parity_split(sub, device: str, fused: bool):
    """(reference module, submodel to compile, fused module count or None), both modules on `device`.

    The parity reference is the unmodified diffusers module; with `fused` the compiled submodel is a deep copy
    with the fused linear-attention op swapped in. Both run on the package's device: a reference left on the
    CPU would be fed CUDA tensors (or compared at another precision) after the whole compile."""
    if not fused:
        module = sub.module.to(device)
        return module, dataclasses.replace(sub, module=module), None
    import copy

    from diffkiln.plugins.linear_attention import use_fused_linear_attention

    reference = sub.module.to(device)
    compiled = dataclasses.replace(sub, module=copy.deepcopy(reference))
    return reference, compiled, use_fused_linear_attention(compiled.module)


def build_aoti(model, root: Path, config: AotiBuildConfig, names=None) -> EngineEntry:
    """Compile each submodel of `model` into `root/aoti/<device>-<precision>/`, with parity vs eager."""
    import torch

    from diffkiln.engines.eager import EagerEngine
    from diffkiln.export.parity import check_parity, require_parity
    subs = model.submodels(names)
    entry = EngineEntry("aoti", config.precision, config.device, files={},
                        options={"build_config": config.to_dict(), "torch": torch.__version__,
                                 "fused_linear_attention": config.fused_linear_attention},
                        tool_versions={"torch": torch.__version__})
    folder = root / ENGINE_DIR / f"{config.device}-{config.precision}"
    folder.mkdir(parents=True, exist_ok=True)
    for name, sub in progress(subs.items(), total=len(subs), desc="aoti compile"):
        path = folder / f"{name}.pt2"
        reference_module, sub, fused = parity_split(sub, config.device, config.fused_linear_attention)
        if fused is not None:
            entry.options.setdefault("fused_modules", {})[name] = fused
        facts = compile_submodel(sub, path, config)
        rel = str(path.relative_to(root))
        engine = AotiEngine(path, sub.spec, torch.__version__)
        # parity against the unmodified diffusers modules, whatever was swapped in
        entry.parity[name] = check_parity(sub, EagerEngine(reference_module, sub.spec, device=config.device), engine)
        require_parity("the AOTInductor package", name, entry.parity[name])
        entry.files[name] = [rel]
        entry.options[name] = facts
        entry.build_seconds[name] = round(facts["export_seconds"] + facts["compile_seconds"], 3)
        worst = max(r["max_abs"] for r in entry.parity[name])
        log(f"{name}: compiled in {entry.build_seconds[name]:.1f}s, {facts['bytes'] / 1e6:.1f} MB, "
            f"AOTI vs eager max abs err {worst:.2e}")
    return entry


class AotiEngine(Engine):
    """A loaded `.pt2` package. Feeds: numpy arrays or torch tensors; outputs numpy (or torch with return_torch)."""

    backend = "aoti"

    def __init__(self, path: str | Path, spec: SubmodelSpec, built_with_torch: str, return_torch: bool = False):
        super().__init__(spec)
        import torch

        self.torch, self.path, self.return_torch = torch, Path(path), return_torch
        meta = check_loadable(self.path, built_with_torch)
        self.device = torch.device(meta["AOTI_DEVICE_KEY"])
        from diffkiln.plugins.ops import register_all

        register_all()  # a package calling diffkiln:: ops opens only where they are registered (a new process too)
        try:
            self.runner = torch._inductor.aoti_load_package(str(self.path))
        except Exception as e:  # torch raises RuntimeError/OSError variants for bad archives
            raise DiffkilnError(f"AOTInductor could not load {self.path}: {type(e).__name__}: {e}") from e

    def _run(self, feeds: dict) -> dict:
        torch = self.torch
        args = []
        for t in self.spec.inputs:
            x = feeds[t.name]
            x = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
            args.append(x.to(self.device))
        with torch.no_grad():
            out = self.runner(*args)
        out = out[0] if isinstance(out, (list, tuple)) else out
        name = self.spec.outputs[0].name
        return {name: out if self.return_torch else out.float().cpu().numpy()}


class AotiBackend(Backend):
    name = "aoti"
    config_type = AotiBuildConfig
    preference = 20
    needs_onnx = False  # compiled from the torch modules
    engine_options = ("return_torch",)
    config_options = ("device", "precision", "max_autotune", "fused_linear_attention")

    def check(self, config) -> None:
        if config.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise DiffkilnError("--device cuda: torch.cuda sees no GPU here (or this torch has no CUDA); "
                                    "build with --device cpu or on a machine with a GPU")

    def open(self, root, manifest, entry, **options):
        return {name: AotiEngine(path_of(root, files[0], manifest), manifest.submodels[name], entry.options["torch"], **options)
                for name, files in entry.files.items()}

    def runnable_here(self, entry=None):
        import importlib.metadata as md
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            return False, "torch is not installed"
        built = entry.options.get("torch") if entry is not None else None
        if built is not None and built != md.version("torch"):
            return False, f"compiled by torch {built}, torch {md.version('torch')} is installed"
        device = entry.target if entry is not None else "cpu"
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                return False, "compiled for CUDA and torch.cuda sees no GPU"
        return True, f"torch {md.version('torch')} runs {device} packages"

    def config(self, options):
        return AotiBuildConfig(**{k: options[k] for k in self.config_options if options.get(k) is not None})

    def config_here(self, device, precision):
        return AotiBuildConfig(device=device, precision=precision)

    def build(self, root, manifest, model, config, names=None):
        return [build_aoti(model, root, config, names)]

    def eager_device(self, entry):
        return entry.target


register(AotiBackend())
