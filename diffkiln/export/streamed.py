"""Export a submodel whose weights need not (and may not) fit in host memory.

The module is built on the meta device (no storage), the TorchScript exporter (opset 17, as `export_onnx`) traces it
with `export_params=False`, so every parameter is a graph input, and each of those inputs then becomes an initializer
whose bytes are written into `<name>.onnx.data` one tensor at a time, read from a weight source: a safetensors
file read tensor by tensor (`SafetensorsSource`, real checkpoints), a state dict (`StateDictSource`) or seeded random
values (`SeededSource`, real-size presets): any callable name -> tensor. Peak host memory is the traced graph plus the largest single tensor.

The trace runs on zero-stride stand-ins for the weights (`stand_ins`: a few bytes per tensor; one forward pass at
the traced shape). The exporter's initializer deduplication is skipped (it compares values). A parameter used only
through a 2-D Transpose (Linear weights on 3-D inputs) is stored transposed and the Transpose dropped, as constant
folding does in the in-memory export, so runtimes do not hold a second, transposed copy while loading.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

from diffkiln.errors import DiffkilnError
from diffkiln.export.tracing import OPSET, trace_to_onnx
from diffkiln.fileio import temp_file
from diffkiln.models.submodels import Submodel

ALIGN = 4096  # page-aligned offsets: ONNX Runtime may map external data instead of copying it
TRANSPOSED = ".transposed"  # suffix of an initializer stored as its parameter's transpose


def _onnx_dtype(dtype) -> int:
    import onnx
    import torch

    table = {torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16,
             torch.bfloat16: onnx.TensorProto.BFLOAT16, torch.float64: onnx.TensorProto.DOUBLE,
             torch.int64: onnx.TensorProto.INT64, torch.int32: onnx.TensorProto.INT32, torch.bool: onnx.TensorProto.BOOL}
    if dtype not in table:
        raise DiffkilnError(f"parameter dtype {dtype} cannot be streamed; expected one of {sorted(map(str, table))}")
    return table[dtype]


# -- where weights come from -----------------------------------------------------------------------------------------
class StateDictSource:
    """Weights from a mapping of names (as the exported module names them, or with `prefix` stripped) to tensors."""

    def __init__(self, state_dict: dict, prefix: str = ""):
        self.state_dict, self.prefix = state_dict, prefix

    def __call__(self, name: str):
        key = name[len(self.prefix):] if self.prefix and name.startswith(self.prefix) else name
        if key not in self.state_dict:
            raise DiffkilnError(f"weight {key!r} is missing from the state dict ({len(self.state_dict)} tensors)")
        return self.state_dict[key]


class SafetensorsSource:
    """Weights read one tensor at a time from safetensors files (a diffusers subfolder's shards, or one file);
    `prefix` (the export wrapper's attribute, e.g. "transformer.") is stripped from the exported names."""

    def __init__(self, paths, prefix: str = ""):
        from safetensors import safe_open

        paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
        files = [f for p in paths for f in (sorted(p.glob("*.safetensors")) if p.is_dir() else [p])]
        if not files:
            raise DiffkilnError(f"no .safetensors files in {', '.join(map(str, paths))}")
        self.prefix, self.where = prefix, {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                self.where.update(dict.fromkeys(h.keys(), f))

    def __call__(self, name: str):
        from safetensors import safe_open

        key = name[len(self.prefix):] if self.prefix and name.startswith(self.prefix) else name
        if key not in self.where:
            raise DiffkilnError(f"weight {key!r} is in none of the safetensors files ({len(self.where)} tensors)")
        with safe_open(str(self.where[key]), framework="pt") as h:
            return h.get_tensor(key)


class SeededSource:
    """Seeded random weights for a module built on the meta device, one layer at a time: the layer that owns a
    parameter is materialized on the CPU alone and initialized by its own `reset_parameters` (torch's default init,
    what a freshly built preset has) under the seed `seed + crc32(layer path)`; a layer without one gets ones for
    a norm's weight, zeros for biases and N(0, 0.02) otherwise. Every value depends only on (seed, name), not on
    the order parameters are asked for. The last layer is cached, so a weight and its bias share one init."""

    def __init__(self, module, seed: int = 0):
        self.module, self.seed, self._cached = module, seed, (None, {})

    def layer_of(self, name: str) -> str:
        return name.rsplit(".", 1)[0] if "." in name else ""

    def __call__(self, name: str):
        path = self.layer_of(name)
        if self._cached[0] != path:
            self._cached = (path, self._materialize(path))
        return self._cached[1][name.rsplit(".", 1)[-1]]

    def _materialize(self, path: str) -> dict:
        import copy

        import torch

        layer = self.module.get_submodule(path) if path else self.module
        own = dict(layer.named_parameters(recurse=False))
        shell = copy.copy(layer)  # a shallow copy owning fresh CPU storage for its own parameters only
        shell._parameters = {k: None if p is None else torch.nn.Parameter(torch.empty(p.shape, dtype=torch.float32),
                                                                          requires_grad=False)
                             for k, p in layer._parameters.items()}
        gen = torch.Generator().manual_seed((self.seed + zlib.crc32(path.encode())) % 2**63)
        with torch.no_grad():
            if hasattr(layer, "reset_parameters") and not list(layer.children()):
                state = torch.random.get_rng_state()
                torch.manual_seed((self.seed + zlib.crc32(path.encode())) % 2**63)
                try:
                    shell.reset_parameters()
                finally:
                    torch.random.set_rng_state(state)
            else:
                norm = "norm" in type(layer).__name__.lower()
                for k, p in shell._parameters.items():
                    if p is None:
                        continue
                    if k == "bias":
                        p.zero_()
                    elif norm and p.dim() == 1:
                        p.fill_(1.0)
                    else:
                        p.normal_(0.0, 0.02, generator=gen)
        return {k: p.detach().to(own[k].dtype) for k, p in shell._parameters.items() if p is not None}


# -- the graph ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def stand_ins(module):
    """Every parameter and saved buffer of `module` (on the meta device, or anywhere) replaced by a zero-stride CPU
    view of one zero of its dtype for the duration of a trace, restored after. The trace then runs real CPU kernels
    (torch's meta kernels for convolutions fail under the tracer) at the cost of one forward pass at the traced
    shape, holding a few bytes per tensor; values never reach the graph (parameters are its inputs)."""
    import torch

    saved, made = [], {}
    for m in module.modules():
        for store in (m._parameters, m._buffers):
            for k, t in store.items():
                if t is None or (store is m._buffers and k in m._non_persistent_buffers_set):
                    continue
                if id(t) not in made:  # tied weights stay tied
                    view = torch.zeros((), dtype=t.dtype).expand(t.shape)
                    made[id(t)] = torch.nn.Parameter(view, requires_grad=False) if store is m._parameters else view
                saved.append((store, k, t))
                store[k] = made[id(t)]
    # After tracing, the exporter takes the parameter values from `torch.jit._unique_state_dict(model)` for its ONNX
    # shape inference, which copies every constant it can compute (a transposed weight: the full tensor). Values on
    # the meta device cost nothing there; the tracer's own call (keep_vars=True) still gets the stand-ins.
    unique = torch.jit._unique_state_dict

    def meta_values(m, keep_vars=False):
        state = unique(m, keep_vars=keep_vars)
        return state if keep_vars else {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}

    torch.jit._unique_state_dict = meta_values
    try:
        yield
    finally:
        torch.jit._unique_state_dict = unique
        for store, k, t in saved:
            store[k] = t


def trace_graph(sub: Submodel, path: Path, opset: int = OPSET, dims: dict | None = None):
    """Trace `sub` (parameters on the meta device, or anywhere; see `stand_ins`) at its first parity shape into an
    ONNX graph whose parameters are inputs named as in `sub.module.state_dict()`; returns the graph (no weights).
    `dims`: another traced shape (a smaller one costs less; keep dynamic dims above 1, or the exporter may
    specialize them). `keep_initializers_as_inputs` also skips the exporter's initializer deduplication (it compares values)."""
    import onnx

    trace_to_onnx(sub, path, opset, dims, stand_ins(sub.module), do_constant_folding=False, export_params=False,
                  keep_initializers_as_inputs=True)
    return onnx.load(str(path), load_external_data=False)


def _transposed_only(graph, names: set) -> set:
    """Parameters whose every use is a 2-D Transpose(perm=[1, 0]): stored transposed, the Transposes dropped."""
    uses: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            if i in names:
                uses.setdefault(i, []).append(node)
    out = set()
    for name, nodes in uses.items():
        if all(n.op_type == "Transpose" and [list(a.ints) for a in n.attribute if a.name == "perm"] == [[1, 0]]
               for n in nodes):
            out.add(name)
    return out


def _drop_transposes(graph, names: set) -> None:
    """Replace Transpose(P) by the initializer `P + TRANSPOSED` for each P in `names`."""
    renamed = {}
    keep = []
    for node in graph.node:
        if node.op_type == "Transpose" and node.input[0] in names:
            renamed[node.output[0]] = node.input[0] + TRANSPOSED
        else:
            keep.append(node)
    for node in keep:
        for j, i in enumerate(node.input):
            if i in renamed:
                node.input[j] = renamed[i]
    for out in graph.output:
        if out.name in renamed:
            raise DiffkilnError(f"graph output {out.name} is a transposed weight; cannot stream it")
    del graph.node[:]
    graph.node.extend(keep)


def stream_weights(model, params: dict, source, data_path: Path, location: str, progress=None) -> dict:
    """Turn the graph inputs named in `params` ({name: meta tensor}) into initializers whose bytes `source(name)`
    gives, written one at a time into `data_path` (offsets aligned to ALIGN), which the graph will find as
    `location` beside it. Returns counts."""
    import onnx
    import torch

    graph = model.graph
    names = [i.name for i in graph.input if i.name in params]
    flip = _transposed_only(graph, set(names))
    _drop_transposes(graph, flip)
    kept = [i for i in graph.input if i.name not in params]
    del graph.input[:]
    graph.input.extend(kept)
    count = written = 0
    start = time.perf_counter()
    with open(data_path, "wb") as out:
        for k, name in enumerate(names):
            want = params[name]
            t = source(name)
            if tuple(t.shape) != tuple(want.shape):
                raise DiffkilnError(f"weight {name}: shape {tuple(t.shape)} from the source, the module expects "
                                    f"{tuple(want.shape)}")
            t = t.detach().to("cpu", want.dtype)
            init_name = name
            if name in flip:
                t, init_name = t.t(), name + TRANSPOSED
            t = t.contiguous()
            out.write(b"\0" * (-out.tell() % ALIGN))
            offset = out.tell()
            blob = t.view(torch.uint8).numpy() if t.numel() else b""
            out.write(memoryview(blob))
            tensor = onnx.TensorProto(name=init_name, data_type=_onnx_dtype(want.dtype), dims=list(t.shape))
            for key, value in (("location", location), ("offset", offset), ("length", t.numel() * t.element_size())):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            graph.initializer.append(tensor)
            count += t.numel()
            written += t.numel() * t.element_size()
            del t, blob
            if progress and (k + 1) % max(1, len(names) // 20) == 0:
                progress(f"  weights {k + 1}/{len(names)}: {written / 2**30:.2f} GiB, "
                         f"{time.perf_counter() - start:.0f} s")
    return {"parameters": count, "initializers": len(names), "transposed": len(flip), "weight_bytes": written}


def export_streamed(sub: Submodel, path: Path, source=None, opset: int = OPSET, progress=None,
                    trace_dims: dict | None = None) -> dict:
    """Export `sub` to `path` + `path.data` with its weights from `source` (default: the module's own state dict,
    which must then hold real tensors). The data file is renamed into place before the graph that references it.
    Returns the same facts as `export_onnx` plus the parameter count, the graph's size and its op counts."""
    import onnx

    path = Path(path)
    module = sub.module
    saved = module.state_dict(keep_vars=True)
    buffers = [n for n, b in module.named_buffers() if n not in saved and b.is_meta]
    if buffers:  # (real ones are traced as constants of the graph, as the in-memory export does)
        raise DiffkilnError(f"{sub.name}: non-persistent buffers {buffers[:3]} are on the meta device and in no "
                            "checkpoint; build the module with them materialized (they are computed at construction)")
    params = dict(saved)
    if source is None:
        if any(p.is_meta for p in params.values()):
            raise DiffkilnError(f"{sub.name}: the module is on the meta device; give a weight source")
        source = StateDictSource(params)
    data_name = f"{path.name}.data"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.export-") as tmp:
        model = trace_graph(sub, Path(tmp) / path.name, opset, trace_dims)
        trace_s = time.perf_counter() - start
        nodes_exported = len(model.graph.node)
        if progress:
            progress(f"{sub.name}: traced {nodes_exported} nodes in {trace_s:.1f} s; streaming weights")
        tmp_data, tmp_graph = temp_file(path.parent / data_name), temp_file(path)
        try:
            facts = stream_weights(model, params, source, tmp_data, data_name, progress)
            onnx.save_model(model, str(tmp_graph))
            os.replace(tmp_data, path.parent / data_name)
            os.replace(tmp_graph, path)
        except BaseException:
            tmp_graph.unlink(missing_ok=True)
            tmp_data.unlink(missing_ok=True)
            raise
    from diffkiln.lora.onnx_map import onnx_weight_map

    return {
        "files": [path.name, data_name],
        "export_seconds": round(time.perf_counter() - start, 3),
        "trace_seconds": round(trace_s, 3),
        "nodes_exported": nodes_exported,
        "nodes": len(model.graph.node),
        "constant_folding": False,
        "external_data": True,
        "streamed": True,
        "opset": opset,
        "bytes": path.stat().st_size + (path.parent / data_name).stat().st_size,
        "graph_bytes": path.stat().st_size,
        "ops": dict(Counter(n.op_type for n in model.graph.node).most_common()),
        **facts,
        "lora_weights": onnx_weight_map(model, None, strict=False),
    }


# -- a real-size preset's submodel on the meta device ------------------------------------------------------------------
def meta_submodel(preset: str, name: str, dtype: str = "float32", overrides: dict | None = None) -> Submodel:
    """A preset's submodel (export wrapper and I/O spec) with its module built on the meta device: no memory, no
    weights (`check_size` does not apply: nothing is materialized). `overrides`: config keys of that module to
    change (e.g. fewer layers at the real width, for a check that fits in memory twice)."""
    import torch

    from diffkiln.models.loading import torch_dtype
    from diffkiln.models.registry import adapter_for

    adapter = adapter_for(preset)
    p = adapter.get_preset(preset)
    comps = [c for c in adapter.model_cls.COMPONENTS if c.submodel == name]
    if not comps:
        raise DiffkilnError(f"{preset} has no submodel {name!r}; expected one of {list(adapter.SUBMODELS)}")
    model = adapter._new(p.name, "preset", adapter.family_of(p), p,
                         {c.attr: dict(getattr(p, c.attr)) for c in adapter.model_cls.COMPONENTS},
                         dict(p.scheduler), adapter.model_cls.preset_tokenizer(p), {})
    if overrides:
        unknown = set(overrides) - set(model.configs[comps[0].attr])
        if unknown:
            raise DiffkilnError(f"{preset} {comps[0].attr} config has no key(s) {sorted(unknown)}")
        model.configs[comps[0].attr].update(overrides)
    model.check_config(f"preset {p.name}")
    with torch.device("meta"):
        module = comps[0].build(model.config(comps[0].attr))
    setattr(model, comps[0].attr, module.to(torch_dtype(dtype)).eval())
    return model.submodels([name])[name]


def graph_summary(path: Path) -> dict:
    """onnx.checker on the path (external data checked for presence, never loaded) and the graph alone: strict ONNX
    shape inference (the outputs' inferred types and shapes), node and op counts, initializers by type, the data
    file's size against the initializers' extents."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    path = Path(path)
    onnx.checker.check_model(str(path))
    model = onnx.load(str(path), load_external_data=False)
    end = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = ExternalDataInfo(t)
            end = max(end, (info.offset or 0) + (info.length or 0))
    data = path.parent / f"{path.name}.data"
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    outputs = {o.name: [onnx.TensorProto.DataType.Name(o.type.tensor_type.elem_type),
                        [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]] for o in inferred.graph.output}
    types = Counter(onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer)
    return {"checker": "ok", "inferred_outputs": outputs, "initializer_types": dict(types), "nodes": len(model.graph.node), "initializers": len(model.graph.initializer),
            "ops": dict(Counter(n.op_type for n in model.graph.node).most_common()),
            "graph_bytes": path.stat().st_size, "data_bytes": data.stat().st_size if data.exists() else 0,
            "data_end": end}
