"""`diffkiln build --backend tensorrt --ray`: tiny-sana for two SKUs as Ray tasks on a local Ray (2 CPUs) equals the
threaded build: the same manifest entries (files, profiles, build config), engine cache keys and engine sizes
(TensorRT-RTX builds are not byte-deterministic). Ray is shut down at the end.
Skipped without the `serve` extra or TensorRT-RTX."""

import json
import time

import pytest

pytest.importorskip("ray", reason="Ray is the optional `serve` extra: pip install 'diffkiln[serve]'")
pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX is part of diffkiln[full]; not installed")

from diffkiln.errors import DiffkilnError

SKUS = ["sm86", "sm89"]


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    from diffkiln.engines.build import build

    out = tmp_path_factory.mktemp("ray-build") / "onnx16"
    build("tiny-sana", out, dtype="float16")
    return out


def tensorrt_entries(root):
    m = json.loads((root / "manifest.json").read_text())
    return {e["target"]: e for e in m["engines"] if e["backend"] == "tensorrt"}, m["files"]


def test_ray_build_equals_threaded_build(local_ray, export, tmp_path, capsys):
    from diffkiln.cli import main
    from diffkiln.engines.build import build
    from diffkiln.engines.tensorrt_build import TensorRTBuildConfig

    start = time.perf_counter()
    build(export, tmp_path / "threads", config=TensorRTBuildConfig(SKUS, cache_dir=str(tmp_path / "c1")))
    threaded = time.perf_counter() - start
    start = time.perf_counter()
    assert main(["build", "--backend", "tensorrt", "--sku", ",".join(SKUS), "--ray", "--cache-dir",
                 str(tmp_path / "c2"), str(export), str(tmp_path / "ray")]) == 0
    on_ray = time.perf_counter() - start
    with capsys.disabled():
        print(f"tiny-sana {'+'.join(SKUS)} fp16: threaded {threaded:.1f}s, Ray tasks {on_ray:.1f}s")
    assert "engines tensorrt/sm89/fp16" in capsys.readouterr().out

    a, files_a = tensorrt_entries(tmp_path / "threads")
    b, files_b = tensorrt_entries(tmp_path / "ray")
    assert sorted(a) == sorted(b) == SKUS
    for sku in SKUS:
        assert a[sku]["files"] == b[sku]["files"]
        assert a[sku]["options"]["cache_hits"] == b[sku]["options"]["cache_hits"] == []
        for e in (a[sku], b[sku]):  # the two builds used two caches (to compare the engines each wrote there)
            e.pop("build_seconds")
            e["options"]["build_config"].pop("cache_dir")
        assert a[sku] == b[sku]  # files, profiles, build config, source set, parity records
        assert "ray" not in b[sku]["options"]["build_config"]
        for rel in (f for fs in a[sku]["files"].values() for f in fs):
            # Not byte-identical: measured with TensorRT-RTX 1.7.1, two builds of one engine in one process already
            # differ (Myelin's generated names carry process-wide counters), at the same size. Running the engines
            # needs a GPU; here the sizes are compared (1%).
            size_a, size_b = (tmp_path / "threads" / rel).stat().st_size, (tmp_path / "ray" / rel).stat().st_size
            assert size_a == files_a[rel]["bytes"] and size_b == files_b[rel]["bytes"]
            assert abs(size_a - size_b) <= 0.01 * size_a, (rel, size_a, size_b)
            assert (tmp_path / "ray" / rel).read_bytes()[:4] == b"vtrt"  # a TensorRT-RTX serialized engine
    # the engine cache keys are unchanged: both builds filled their caches under the same names
    c1, c2 = ({p.name: p.stat().st_size for p in (tmp_path / c).glob("*.engine")} for c in ("c1", "c2"))
    assert len(c1) == 2 * 3 and sorted(c1) == sorted(c2)

    # a rebuild on Ray from the filled cache submits nothing and copies every engine
    m = build(export, tmp_path / "again", config=TensorRTBuildConfig(SKUS, cache_dir=str(tmp_path / "c2"), ray=True))
    for e in (x for x in m.engines if x.backend == "tensorrt"):
        assert sorted(e.options["cache_hits"]) == sorted(e.files)
    assert local_ray.is_initialized()  # a Ray the build did not start is left running


def test_address_without_ray_refused():
    from diffkiln.engines.tensorrt_build import TensorRTBuildConfig

    with pytest.raises(DiffkilnError, match=r"address='auto' applies to Ray builds \(ray=True / --ray\)"):
        TensorRTBuildConfig(["sm89"], address="auto")


def test_cli_ray_refused_for_other_backends(tmp_path, capsys):
    from diffkiln.cli import main

    assert main(["build", "--ray", "tiny-sana", str(tmp_path / "x")]) == 2
    assert "--ray / --address apply to --backend tensorrt" in capsys.readouterr().err
