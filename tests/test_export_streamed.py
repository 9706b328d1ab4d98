"""The streamed exporter (diffkiln/export/streamed.py): a module on the meta device, traced on stand-ins, its weights
written one tensor at a time from a source. On the tiny presets' denoisers, with the real module's weights read
tensor by tensor from a safetensors file, the ONNX Runtime output equals eager PyTorch's and the in-memory export's."""

from __future__ import annotations

import itertools

import pytest

from diffkiln.errors import DiffkilnError

TOL = 1e-5

CASES = {"open-sora": ("tiny-open-sora-v2", "transformer"), "videocrafter2": ("tiny-videocrafter2", "unet")}


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory):
    """(real submodel, meta submodel, streamed graph path, in-memory graph path, export facts)."""
    from safetensors.torch import save_file

    from diffkiln.export.onnx import export_onnx
    from diffkiln.export.streamed import SafetensorsSource, meta_submodel
    from diffkiln.models.registry import load_model

    preset, name = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    model = load_model(preset, [name])
    real = model.submodels([name])[name]
    save_file(getattr(model, name).state_dict(), str(tmp / "weights.safetensors"))
    meta = meta_submodel(preset, name)
    assert all(p.is_meta for p in meta.module.parameters())
    (tmp / "streamed").mkdir()
    (tmp / "memory").mkdir()
    # export_onnx hands a meta module and its weight source to export_streamed
    facts = export_onnx(meta, tmp / "streamed" / f"{name}.onnx",
                        weights=SafetensorsSource(tmp / "weights.safetensors", prefix=f"{name}."))
    assert facts["streamed"] and facts["files"] == [f"{name}.onnx", f"{name}.onnx.data"]
    export_onnx(real, tmp / "memory" / f"{name}.onnx")
    return real, meta, tmp / "streamed" / f"{name}.onnx", tmp / "memory" / f"{name}.onnx", facts


def test_streamed_matches_eager_and_in_memory_export(exported):
    from diffkiln.engines.eager import EagerEngine
    from diffkiln.engines.onnxruntime import OnnxRuntimeEngine
    from diffkiln.export.parity import check_parity, compare

    real, _, streamed, memory, _ = exported
    engine = OnnxRuntimeEngine(streamed, real.spec)
    for record in check_parity(real, EagerEngine(real.module, real.spec), engine):  # both parity shapes
        assert record["finite"] and record["max_abs"] <= TOL, record
    reference = OnnxRuntimeEngine(memory, real.spec)
    out = real.spec.outputs[0].name
    for dims in real.shapes:
        feeds = real.sample(dims, 3)
        assert compare(reference(feeds)[out], engine(feeds)[out])["max_abs"] <= TOL


def test_streamed_graph_layout(exported):
    """Weights are initializers in one data file (offsets page-aligned, no overlaps, file no longer than needed),
    not graph inputs; onnx.checker passes on the path; every parameter was written once."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    from diffkiln.export.streamed import ALIGN, TRANSPOSED, graph_summary

    real, _, streamed, _, facts = exported
    summary = graph_summary(streamed)
    model = onnx.load(str(streamed), load_external_data=False)
    assert [i.name for i in model.graph.input] == [t.name for t in real.spec.inputs]
    extents = sorted((ExternalDataInfo(t).offset, ExternalDataInfo(t).length) for t in model.graph.initializer
                     if t.data_location == onnx.TensorProto.EXTERNAL)
    assert all(off % ALIGN == 0 for off, _ in extents)
    assert all(a + n <= b for (a, n), (b, _) in itertools.pairwise(extents))
    assert summary["data_bytes"] == summary["data_end"] == extents[-1][0] + extents[-1][1]
    state = real.module.state_dict()
    names = {t.name.removesuffix(TRANSPOSED) for t in model.graph.initializer}
    assert set(state) <= names and facts["parameters"] == sum(t.numel() for t in state.values())
    assert facts["transposed"] > 0 and not any(n.op_type == "Transpose" and n.input[0] in state for n in model.graph.node)


def test_seeded_source_is_per_name_and_deterministic(exported):
    import torch

    from diffkiln.export.streamed import SeededSource

    _, meta, _, _, _ = exported
    names = [n for n, _ in meta.module.named_parameters()]
    a, b = SeededSource(meta.module, 7), SeededSource(meta.module, 7)
    first = {n: a(n) for n in names}
    for n in reversed(names):  # the order asked does not change a value
        assert torch.equal(b(n), first[n]) and b(n).shape == dict(meta.module.named_parameters())[n].shape
    other = SeededSource(meta.module, 8)
    linear = next(n for n, m in meta.module.named_modules() if isinstance(m, torch.nn.Linear))
    w = first[f"{linear}.weight"]
    assert not torch.equal(other(f"{linear}.weight"), w)
    assert w.abs().max() <= 1 / w.shape[1] ** 0.5  # torch's Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))


def test_source_mismatches_are_named(tmp_path):
    """A source whose tensor has another shape, or lacks one, is refused naming the weight; nothing is left behind."""
    import torch

    from diffkiln.export.streamed import SeededSource, StateDictSource, export_streamed, meta_submodel

    meta = meta_submodel("tiny-open-sora-v2", "transformer")
    seeded = SeededSource(meta.module)
    state = {n: seeded(n) for n in meta.module.state_dict()}
    victim = next(iter(state))
    with pytest.raises(DiffkilnError, match=f"weight {victim}: shape"):
        export_streamed(meta, tmp_path / "bad.onnx", StateDictSource(dict(state, **{victim: torch.zeros(3, 5)})))
    with pytest.raises(DiffkilnError, match="missing from the state dict"):
        export_streamed(meta, tmp_path / "bad.onnx", StateDictSource({k: v for k, v in state.items() if k != victim}))
    assert not [p for p in tmp_path.iterdir()]  # nothing half-written stays


def test_real_size_open_sora_on_meta():
    """The real 11.9 B Open-Sora 2.0 transformer's submodel builds on the meta device: no memory, no weights."""
    from diffkiln.export.streamed import meta_submodel

    sub = meta_submodel("open-sora-v2", "transformer", "bfloat16")
    params = list(sub.module.parameters())
    assert all(p.is_meta for p in params)
    assert 11.8e9 < sum(p.numel() for p in params) < 12.0e9
    with pytest.raises(DiffkilnError, match="no submodel 'unet'"):
        meta_submodel("open-sora-v2", "unet")


def test_in_memory_modules_stream_too(tmp_path):
    """A module in memory (export_onnx sends those over 1 GiB here, from their own tensors): tiny-sana's Gemma2 text
    encoder (its rotary buffer is not saved: traced as a constant) and linear-attention transformer match eager."""
    from diffkiln.engines.eager import EagerEngine
    from diffkiln.engines.onnxruntime import OnnxRuntimeEngine
    from diffkiln.export.parity import check_parity
    from diffkiln.export.streamed import export_streamed
    from diffkiln.models.registry import load_model

    model = load_model("tiny-sana", ["text_encoder", "transformer"])
    for name, sub in model.submodels().items():
        export_streamed(sub, tmp_path / f"{name}.onnx")
        records = check_parity(sub, EagerEngine(sub.module, sub.spec), OnnxRuntimeEngine(tmp_path / f"{name}.onnx", sub.spec))
        assert all(r["finite"] and r["max_abs"] <= TOL for r in records), (name, records)
