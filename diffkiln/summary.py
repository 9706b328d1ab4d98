"""`diffkiln inspect`: a readable summary of an engine directory's manifest."""

from __future__ import annotations

from pathlib import Path

from diffkiln.manifest import read_manifest


def summary(root: str | Path) -> str:
    m = read_manifest(root, verify=False)
    lines = [
        f"engine directory {root}",
        f"  model {m.model['name']} ({m.model['family']}, config {m.model['config_hash']}, from {m.model['source']})",
        f"  built {m.created} by diffkiln {m.diffkiln_version}",
        "  submodels:",
    ]
    for name, spec in m.submodels.items():
        ins = ", ".join(f"{t.name}{list(t.shape)}:{t.dtype}" for t in spec.inputs)
        dims = ", ".join(f"{k}∈[{lo},{hi}]" for k, (lo, hi) in spec.dims.items())
        lines.append(f"    {name}: {ins}  |  {dims}")
    for e in m.engines:
        lines.append(f"  engines {e.key}  ({', '.join(f'{k} {v}' for k, v in e.tool_versions.items())})")
        if "build_config" in e.options:
            c = e.options["build_config"]
            opts = ", ".join(f"{k}={v}" for k, v in c.items() if k not in ("skus", "precision", "version") and v is not None)
            hits = e.options.get("cache_hits")
            lines.append(f"    {opts}" + ("" if hits is None else f"; from cache: {', '.join(hits) or 'none'}"))
        for name, files in e.files.items():
            size = sum(m.files[f]["bytes"] for f in files if f in m.files) / 1e6
            worst = max(e.parity.get(name, [{}]), key=lambda r: r.get("max_abs", 0), default={})
            if worst:
                par = f"max abs err {worst['max_abs']:.2e}, cosine {worst['cosine']:.7f}"
            elif name in e.unchecked:
                par = f"NOT CHECKED: {e.unchecked[name]}"
            else:
                par = e.options.get("parity", "no parity recorded")
                if name in e.options.get("onnx_parity", {}):
                    par += f"; its ONNX: max abs err {e.options['onnx_parity'][name]:.2e}"
            lines.append(f"    {name}: {files[0]} {size:.1f} MB, built in {e.build_seconds.get(name, 0):.1f}s, vs eager: {par}")
            prof = e.options.get("profiles", {}).get(name)
            if prof:
                lines.append("      profile " + ", ".join(f"{d} {lo}/{opt}/{hi}" for d, (lo, opt, hi) in prof.items()))
    return "\n".join(lines)
