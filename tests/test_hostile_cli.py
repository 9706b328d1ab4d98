"""Hostile-but-fair use of the command line (and the API calls behind it): every verb with wrong, missing or
absurd values, damaged engine directories and misused outputs.

Table-driven: each case names the expected error text; the CLI must exit 2 with one `diffkiln: error:` line
(no traceback, no "internal error"), and the case's working directory (engine directories included) must be
byte-for-byte unchanged afterwards. One tiny-sana and one tiny-t2v-ms engine build are shared by the module;
a case that damages an engine directory damages its own copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from diffkiln.cli import main
from diffkiln.errors import DiffkilnError


@pytest.fixture(scope="module")
def built(built_engines):
    """The shared tiny-sana and tiny-t2v-ms engine directories (conftest; read-only)."""
    return {"sana": built_engines("tiny-sana"), "t2v": built_engines("tiny-t2v-ms")}


def snapshot(root: Path) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return out


def rehash(d: Path, rel: str) -> None:
    """Record a changed runtime file's hash in the manifest (a damaged file the hash check cannot catch)."""
    m = json.loads((d / "manifest.json").read_text())
    data = (d / rel).read_bytes()
    m["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (d / "manifest.json").write_text(json.dumps(m))


def set_json(rel: str, **changes):
    def damage(d: Path):
        j = json.loads((d / rel).read_text())
        for k, v in changes.items():
            if "." in k:
                outer, inner = k.split(".")
                j[outer][inner] = v
            else:
                j[k] = v
        (d / rel).write_text(json.dumps(j))
        if rel != "manifest.json":
            rehash(d, rel)
    return damage


def write(rel: str, data: bytes | str, listed: bool = True):
    def damage(d: Path):
        (d / rel).write_bytes(data if isinstance(data, bytes) else data.encode())
        if listed:
            rehash(d, rel)
    return damage


def user_dir(w: Path):
    (w / "u").mkdir()
    (w / "u" / "precious.txt").write_text("keep me")


def a_file(w: Path):
    (w / "f").write_text("x")


SANA_GEN = ["generate", "--engines", "{sana}", "--prompt", "a red circle", "--steps", "1"]
T2V_GEN = ["generate", "--engines", "{t2v}", "--prompt", "a cat", "--steps", "1", "--frames", "2"]

# (id, argv, setup of the working dir (or None), damage of the sana copy (or None), expected error fragment)
CASES = [
    # generate: request values (0 is an error, not "the default"; upper bounds; non-finite numbers)
    ("gen-steps-0", SANA_GEN + ["--steps", "0"], None, None, "num_inference_steps=0; expected a positive integer"),
    ("gen-steps-neg", SANA_GEN + ["--steps", "-3"], None, None, "num_inference_steps=-3; expected a positive integer"),
    ("gen-steps-1001", SANA_GEN + ["--steps", "1001"], None, None, "this scheduler takes at most 1000"),
    ("gen-steps-huge", SANA_GEN + ["--steps", "99999999999999999999"], None, None, "takes at most 1000"),
    ("gen-steps-str", SANA_GEN + ["--steps", "abc"], None, None, "argument --steps: invalid int value: 'abc'"),
    ("gen-height-0", SANA_GEN + ["--height", "0"], None, None, "height=0; expected a positive integer"),
    ("gen-height-neg", SANA_GEN + ["--height", "-16"], None, None, "height=-16; expected a positive integer"),
    ("gen-height-stride", SANA_GEN + ["--height", "17"], None, None, "height=17 is not a multiple of 16"),
    ("gen-height-huge", SANA_GEN + ["--height", "100000"], None, None, "outside the range these engines were built for"),
    ("gen-width-nan", SANA_GEN + ["--width", "nan"], None, None, "argument --width: invalid int value: 'nan'"),
    ("gen-guidance-nan", SANA_GEN + ["--guidance", "nan"], None, None, "guidance_scale=nan; expected a finite number"),
    ("gen-guidance-inf", SANA_GEN + ["--guidance", "inf"], None, None, "guidance_scale=inf; expected a finite number"),
    ("gen-guidance-overflow", SANA_GEN + ["--guidance", "1e400"], None, None, "guidance_scale=inf"),
    ("gen-seed-neg", SANA_GEN + ["--seed", "-1"], None, None, "seed=-1; expected an integer in [0, 2**63)"),
    ("gen-seed-huge", SANA_GEN + ["--seed", str(2**70)], None, None, "expected an integer in [0, 2**63)"),
    ("gen-num-images-0", SANA_GEN + ["--num-images", "0"], None, None, "num_images_per_prompt=0"),
    ("gen-num-images-huge", SANA_GEN + ["--num-images", "10000000"], None, None, "for the decoded pixels alone"),
    ("gen-prompt-surrogate", ["generate", "--engines", "{sana}", "--prompt", "a\udcff"], None, None,
     "prompt 0 is not valid text"),
    ("gen-negative-surrogate", SANA_GEN + ["--negative-prompt", "\udcff"], None, None, "negative_prompt 0 is not valid text"),
    ("gen-frames-on-image", SANA_GEN + ["--frames", "4"], None, None, "holds an image model"),
    ("gen-lora-on-image", SANA_GEN + ["--lora", "x.safetensors"], None, None, "holds an image model"),
    # a path that is no engine directory is that error, not "an image model"
    ("gen-frames-no-engine-dir", ["generate", "--engines", "nowhere", "--prompt", "x", "--frames", "4"], None, None,
     "nowhere is not an engine directory: manifest.json is missing"),
    ("gen-image-no-engine-dir", ["generate", "--engines", "nowhere", "--prompt", "x", "--image", "a.png"], None, None,
     "nowhere is not an engine directory: manifest.json is missing"),
    ("gen-scheduler-unknown", SANA_GEN + ["--scheduler", "Nope"], None, None, "--scheduler 'Nope'; expected one of"),
    ("gen-scheduler-vp-on-flow", SANA_GEN + ["--scheduler", "DDIMScheduler"], None, None, "does not sample this flow model"),
    ("gen-backend-absent", SANA_GEN + ["--backend", "tensorrt"], None, None, "has no TensorRT engines"),
    ("gen-target-absent", SANA_GEN + ["--target", "sm90"], None, None, "No engine set */sm90/*"),
    ("gen-precision-absent", SANA_GEN + ["--precision", "fp8"], None, None, "No engine set */*/fp8"),
    ("gen-providers-bogus", SANA_GEN + ["--providers", "BogusProvider"], None, None, "are not available here"),
    ("gen-binning-unrunnable", SANA_GEN + ["--resolution-binning", "--height", "64", "--width", "128"], None, None,
     "which these engines cannot run"),
    # generate: output paths
    ("gen-out-bmp", SANA_GEN + ["-o", "out.bmp"], None, None, "suffix '.bmp' is not a image format"),
    ("gen-out-noext", SANA_GEN + ["-o", "noext"], None, None, "suffix '(none)'"),
    ("gen-out-dir", SANA_GEN + ["-o", "d.png"], lambda w: (w / "d.png").mkdir(), None, "is a directory"),
    ("gen-out-under-file", SANA_GEN + ["-o", "f/x.png"], a_file, None, "is not a directory"),
    ("gen-out-engine-file", SANA_GEN + ["-o", "{sana}/transformer.onnx"], None, None, "suffix '.onnx'"),
    ("gen-out-proc", SANA_GEN + ["-o", "/proc/x.png"], None, None, "/proc"),
    # generate: engine directories missing or damaged (each case damages its own copy)
    ("gen-engines-missing", ["generate", "--engines", "nope", "--prompt", "a"], None, None, "manifest.json is missing"),
    ("gen-engines-file", ["generate", "--engines", "f", "--prompt", "a"], a_file, None, "manifest.json is missing"),
    ("dmg-rm-denoiser", SANA_GEN, None, lambda d: (d / "transformer.onnx").unlink(), "transformer.onnx listed in the manifest is missing"),
    ("dmg-rm-pipeline", SANA_GEN, None, lambda d: (d / "pipeline.json").unlink(), "pipeline.json listed in the manifest is missing"),
    ("dmg-rm-tokenizer", SANA_GEN, None, lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json listed in the manifest is missing"),
    ("dmg-truncate", SANA_GEN, None, lambda d: os.truncate(d / "transformer.onnx", 1000), "truncated or replaced"),
    ("dmg-swap", SANA_GEN, None, lambda d: (os.rename(d / "text_encoder.onnx", d / "t"),
                                            os.rename(d / "vae_decoder.onnx", d / "text_encoder.onnx"),
                                            os.rename(d / "t", d / "vae_decoder.onnx")), "truncated or replaced"),
    ("dmg-symlink-out", SANA_GEN, None, lambda d: ((d / "scheduler.json").unlink(),
                                                   (d / "scheduler.json").symlink_to("/etc/hostname")),
     "outside the engine directory"),
    ("dmg-manifest-dup-key", SANA_GEN, None,
     lambda d: (d / "manifest.json").write_text((d / "manifest.json").read_text().rstrip()[:-1] + ', "files": {}}'),
     "duplicate key 'files'"),
    ("dmg-manifest-abs", SANA_GEN, None, lambda d: set_json("manifest.json", files={
        **json.loads((d / "manifest.json").read_text())["files"], "/etc/passwd": {"sha256": "0" * 64, "bytes": 1}})(d),
     "'/etc/passwd' is absolute"),
    ("dmg-manifest-engines-dict", SANA_GEN, None, set_json("manifest.json", engines={}), "engines is dict"),
    ("dmg-manifest-schema", SANA_GEN, None, set_json("manifest.json", schema_version=99), "schema_version 99"),
    ("dmg-manifest-empty", SANA_GEN, None, write("manifest.json", "", listed=False), "not valid JSON"),
    ("dmg-manifest-dir", SANA_GEN, None, lambda d: ((d / "manifest.json").unlink(), (d / "manifest.json").mkdir()),
     "is a directory; expected a regular file"),
    ("dmg-pipeline-family", SANA_GEN, None, set_json("pipeline.json", family="bogus"), "family='bogus'"),
    ("dmg-pipeline-seq-str", SANA_GEN, None, set_json("pipeline.json", max_sequence_length="64"), "max_sequence_length='64'"),
    ("dmg-pipeline-vae-scale-0", SANA_GEN, None, set_json("pipeline.json", vae_scale_factor=0), "vae_scale_factor=0"),
    ("dmg-pipeline-scaling-0", SANA_GEN, None, set_json("pipeline.json", vae_scaling_factor=0), "vae_scaling_factor=0"),
    ("dmg-pipeline-bins", SANA_GEN, None, set_json("pipeline.json", resolution_bins={"x": [1]}), "resolution_bins['x']"),
    ("dmg-pipeline-steps-0", SANA_GEN, None, set_json("pipeline.json", **{"defaults.num_inference_steps": 0}),
     "defaults.num_inference_steps=0"),
    ("dmg-pipeline-list", SANA_GEN, None, write("pipeline.json", "[]"), "expected a JSON object, got list"),
    ("dmg-scheduler-class", SANA_GEN, None, set_json("scheduler.json", _class_name="Bogus"), "_class_name='Bogus'"),
    ("dmg-scheduler-train-0", SANA_GEN, None, set_json("scheduler.json", num_train_timesteps=0), "num_train_timesteps=0"),
    ("dmg-scheduler-shift-str", SANA_GEN, None, set_json("scheduler.json", shift="3"), "shift='3'"),
    ("dmg-scheduler-string", SANA_GEN, None, write("scheduler.json", '"x"'), "scheduler.json: expected a JSON object"),
    ("dmg-tokenizer-no-model", SANA_GEN, None, write("tokenizer.json", '{"version": "1.0"}'), "not a tokenizers tokenizer.json"),
    ("dmg-onnx-garbage", SANA_GEN, None, write("transformer.onnx", b"\0" * 100), "ONNX Runtime could not load"),
    ("dmg-onnx-swapped", SANA_GEN, None, lambda d: write("transformer.onnx", (d / "vae_decoder.onnx").read_bytes())(d),
     "do not match the manifest's"),
    ("inspect-dmg", ["inspect", "{sana}"], None, write("manifest.json", "{", listed=False), "not valid JSON"),
    ("verify-dmg", ["verify", "{sana}"], None, lambda d: os.truncate(d / "transformer.onnx", 10), "truncated or replaced"),
    ("verify-absent-backend", ["verify", "{sana}", "--backend", "aoti"], None, None, "No engine set aoti/*/*"),
    ("inspect-file", ["inspect", "f"], a_file, None, "manifest.json is missing"),
    # generate: video
    ("vgen-frames-0", T2V_GEN + ["--frames", "0"], None, None, "num_frames=0; expected a positive integer"),
    ("vgen-frames-huge", T2V_GEN + ["--frames", "100000"], None, None, "take a frame count in [1, 16]"),
    ("vgen-fps-0", T2V_GEN + ["--fps", "0"], None, None, "fps=0; expected a finite number in (0, 240]"),
    ("vgen-fps-neg", T2V_GEN + ["--fps", "-5"], None, None, "fps=-5"),
    ("vgen-codec", T2V_GEN + ["--codec", "nonsense"], None, None, "codec 'nonsense'; expected one of"),
    ("vgen-out-png", T2V_GEN + ["-o", "x.png"], None, None, "suffix '.png' is not a video format"),
    ("vgen-lora-missing", T2V_GEN + ["--lora", "missing.safetensors"], None, None, "Could not read LoRA file"),
    ("vgen-binning", T2V_GEN + ["--resolution-binning"], None, None, "holds a video model"),
    ("vgen-scheduler-flow", T2V_GEN + ["--scheduler", "FlowMatchEulerDiscreteScheduler"], None, None,
     "does not sample this noise-prediction model"),
    # build / export: shape ranges, options, outputs
    ("build-min-size-0", ["build", "tiny-sana", "o", "--min-size", "0"], None, None, "min_size=0"),
    ("build-max-size-stride", ["build", "tiny-sana", "o", "--max-size", "17"], None, None, "not a multiple of 16"),
    ("build-max-size-huge", ["build", "tiny-sana", "o", "--max-size", "100000000"], None, None, "expected at most 16384"),
    ("build-sizes-crossed", ["build", "tiny-sana", "o", "--min-size", "128", "--max-size", "32"], None, None,
     "--min-size 128 is larger than --max-size 32"),
    ("build-max-batch-0", ["build", "tiny-sana", "o", "--max-batch", "0"], None, None, "max_batch=0"),
    ("build-max-batch-huge", ["build", "tiny-sana", "o", "--max-batch", "100000"], None, None, "expected at most 256"),
    ("build-frames-on-image", ["build", "tiny-sana", "o", "--min-frames", "4"], None, None, "applies to video models"),
    ("build-submodel-bogus", ["build", "tiny-sana", "o", "--submodels", "bogus"], None, None, "Unknown submodel(s) ['bogus']"),
    ("build-fp8-no-calibration", ["build", "tiny-sana", "o", "--precision", "fp8"], None, None, "need calibration scales"),
    ("build-calibration-missing", ["build", "tiny-sana", "o", "--precision", "nvfp4", "--calibration", "nope"], None, None,
     "nope is not a calibration directory"),
    ("build-calibration-unused", ["build", "tiny-sana", "o", "--calibration", "nope"], None, None,
     "--calibration applies to fp8 / nvfp4 builds"),
    ("build-plan-unused", ["build", "tiny-sana", "o", "--plan", "p.json"], None, None, "applies to fp8 / nvfp4 builds"),
    ("build-sku-wrong-backend", ["build", "tiny-sana", "o", "--sku", "sm75"], None, None, "--sku applies to --backend tensorrt"),
    ("build-sku-unknown", ["build", "--backend", "tensorrt", "tiny-sana", "o", "--sku", "sm999"], None, None,
     "Unknown GPU SKU 'sm999'"),
    ("build-trt-no-sku", ["build", "--backend", "tensorrt", "tiny-sana", "o"], None, None, "needs --sku"),
    ("build-aoti-no-cuda", ["build", "--backend", "aoti", "tiny-sana", "o", "--device", "cuda"], None, None,
     "--device cuda: torch.cuda sees no GPU"),
    ("build-preset-unknown", ["build", "nope-model", "o"], None, None, "Unknown preset 'nope-model'"),
    ("build-source-emptydir", ["build", "e", "o"], lambda w: (w / "e").mkdir(), None, "model_index.json is missing"),
    ("build-out-file", ["build", "tiny-sana", "f"], a_file, None, "exists and is not a directory"),
    ("build-out-user-dir", ["build", "tiny-sana", "u"], user_dir, None, "exists and is not empty; pass --overwrite"),
    ("build-overwrite-user-dir", ["build", "tiny-sana", "u", "--overwrite"], user_dir, None, "is not a diffkiln output"),
    ("build-overwrite-parent-of-source", ["build", "{sana}", ".", "--overwrite"], None, None, "contains the source"),
    ("build-overwrite-root", ["build", "tiny-sana", "/", "--overwrite"], None, None, "is not a diffkiln output"),
    ("build-out-proc", ["build", "tiny-sana", "/proc/x"], None, None, "cannot create files in /proc"),
    ("build-out-under-file", ["build", "tiny-sana", "f/out"], a_file, None, "cannot create its parent directory"),
    ("build-existing-no-overwrite", ["build", "tiny-sana", "{sana}"], None, None, "pass --overwrite"),
    ("export-overwrite-user-dir", ["export", "tiny-sana", "u", "--overwrite"], user_dir, None, "is not a diffkiln output"),
    ("export-frames-0", ["export", "tiny-t2v-ms", "o", "--max-frames", "0"], None, None, "max_frames=0"),
    ("export-frames-crossed", ["export", "tiny-t2v-ms", "o", "--min-frames", "9", "--max-frames", "3"], None, None,
     "--min-frames 9 is larger than --max-frames 3"),
    ("export-frames-huge", ["export", "tiny-t2v-ms", "o", "--max-frames", "100000"], None, None, "expected at most 4096"),
    # calibrate / sensitivity / quality
    ("calib-num-prompts-0", ["calibrate", "tiny-sana", "-o", "c", "--num-prompts", "0"], None, None, "num_prompts=0"),
    ("calib-steps-0", ["calibrate", "tiny-sana", "-o", "c", "--steps", "0"], None, None, "calibration steps=0"),
    ("calib-steps-neg", ["calibrate", "tiny-sana", "-o", "c", "--steps", "-2"], None, None, "calibration steps=-2"),
    ("calib-steps-huge", ["calibrate", "tiny-sana", "-o", "c", "--steps", "100000"], None, None, "in [1, 1000]"),
    ("calib-guidance-nan", ["calibrate", "tiny-sana", "-o", "c", "--guidance", "nan"], None, None,
     "calibration guidance=nan; expected a finite number"),
    ("calib-guidance-inf", ["calibrate", "tiny-sana", "-o", "c", "--guidance", "inf"], None, None, "calibration guidance=inf"),
    ("calib-seed-neg", ["calibrate", "tiny-sana", "-o", "c", "--seed", "-1"], None, None, "calibration seed=-1"),
    ("calib-percentile-0", ["calibrate", "tiny-sana", "-o", "c", "--percentile", "0"], None, None, "percentile 0.0"),
    ("calib-percentile-nan", ["calibrate", "tiny-sana", "-o", "c", "--percentile", "nan"], None, None, "percentile nan"),
    ("calib-include-nothing", ["calibrate", "tiny-sana", "-o", "c", "--include", "nomatch*"], None, None,
     "no Linear/1x1-conv layers match"),
    ("calib-prompts-missing", ["calibrate", "tiny-sana", "-o", "c", "--prompts", "missing.txt"], None, None, "does not exist"),
    ("calib-prompts-empty", ["calibrate", "tiny-sana", "-o", "c", "--prompts", "p.txt"],
     lambda w: (w / "p.txt").write_text(""), None, "holds no prompts"),
    ("calib-prompts-blank", ["calibrate", "tiny-sana", "-o", "c", "--prompts", "p.txt"],
     lambda w: (w / "p.txt").write_text("\n \n"), None, "holds no prompts"),
    ("calib-prompts-not-utf8", ["calibrate", "tiny-sana", "-o", "c", "--prompts", "p.txt"],
     lambda w: (w / "p.txt").write_bytes(b"\xff\xfe bad\n"), None, "not UTF-8 text"),
    ("calib-prompts-jsonl-null", ["calibrate", "tiny-sana", "-o", "c", "--prompts", "p.jsonl"],
     lambda w: (w / "p.jsonl").write_text("null\n"), None, "p.jsonl:1: no prompt field"),
    ("calib-prompts-jsonl-int", ["calibrate", "tiny-sana", "-o", "c", "--prompts", "p.jsonl"],
     lambda w: (w / "p.jsonl").write_text('{"prompt": 3}\n'), None, "prompt is 3; expected a string"),
    ("calib-prompts-csv", ["calibrate", "tiny-sana", "-o", "c", "--prompts", "p.csv"],
     lambda w: (w / "p.csv").write_text("a\n"), None, "unsupported prompt file type '.csv'"),
    ("calib-out-user-dir", ["calibrate", "tiny-sana", "-o", "u", "--num-prompts", "1", "--steps", "1"], user_dir, None,
     "is not a diffkiln output"),
    ("calib-out-engine-dir", ["calibrate", "tiny-sana", "-o", "{sana}", "--num-prompts", "1", "--steps", "1"], None, None,
     "is not a diffkiln output"),
    ("sens-calibration-missing", ["sensitivity", "tiny-sana", "--calibration", "nope"], None, None,
     "nope is not a calibration directory"),
    ("sens-calibration-engine-dir", ["sensitivity", "tiny-sana", "--calibration", "{sana}"], None, None,
     "is not a calibration directory"),
    ("quality-absent-set", ["quality", "{sana}"], None, None, "No engine set onnxruntime/*/fp8"),
    ("quality-num-prompts-0", ["quality", "{sana}", "--precision", "fp32", "--reference", "fp16", "--num-prompts", "0"],
     None, None, "at least one held-out prompt"),
    ("quality-same-set", ["quality", "{sana}", "--precision", "fp32", "--reference", "fp32"], None, None,
     "name the same engine set"),
    ("quality-out-engine-dir", ["quality", "{sana}", "--precision", "fp32", "--reference", "fp16", "-o", "{sana}"], None,
     None, "is an engine directory"),
    ("quality-missing", ["quality", "nope"], None, None, "manifest.json is missing"),
    # bench / bench-kernels / demo / train-tiny
    ("bench-suite", ["bench", "--suite", "bogus"], None, None, "Unknown benchmark suite 'bogus'"),
    ("bench-repeats-0", ["bench", "--repeats", "0"], None, None, "repeats=0; expected an integer in [1, 10000]"),
    ("bench-repeats-neg", ["bench", "--repeats", "-1"], None, None, "repeats=-1"),
    ("kernels-warmup-neg", ["bench-kernels", "-o", "k", "--device", "cpu", "--small", "--warmup", "-1"], None, None,
     "warmup=-1"),
    ("kernels-repeats-0", ["bench-kernels", "-o", "k", "--device", "cpu", "--small", "--repeats", "0"], None, None,
     "repeats=0"),
    ("kernels-peak-nan", ["bench-kernels", "-o", "k", "--device", "cpu", "--small", "--peak-gbps", "nan"], None, None,
     "peak_gbps=nan"),
    ("demo-repeats-0", ["demo", "--repeats", "0"], None, None, "repeats=0"),
    ("demo-repeats-neg", ["demo", "--repeats", "-1"], None, None, "repeats=-1"),
    ("train-minutes-0", ["train-tiny", "-o", "t", "--minutes", "0"], None, None, "minutes=0.0; expected a finite number in (0"),
    ("train-minutes-nan", ["train-tiny", "-o", "t", "--minutes", "nan"], None, None, "minutes=nan"),
    ("train-minutes-neg", ["train-tiny", "-o", "t", "--minutes", "-1"], None, None, "minutes=-1.0"),
    ("train-steps-0", ["train-tiny", "-o", "t", "--steps", "0"], None, None, "steps=0; expected an integer in [1, inf]"),
    ("train-steps-neg", ["train-tiny", "-o", "t", "--steps", "-5"], None, None, "steps=-5"),
    ("train-seed-neg", ["train-tiny", "-o", "t", "--seed", "-1"], None, None, "seed=-1"),
    ("train-out-file", ["train-tiny", "-o", "f", "--steps", "1"], a_file, None, "exists and is not a directory"),
    ("train-out-engine-dir", ["train-tiny", "-o", "{sana}", "--steps", "1"], None, None, "is an engine directory"),
]


@pytest.mark.parametrize(("argv", "setup", "damage", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cli_refuses_with_one_line(built, tmp_path, monkeypatch, capsys, argv, setup, damage, fragment):
    work = tmp_path / "w"
    work.mkdir()
    sana, t2v = work / "sana", built["t2v"]
    shutil.copytree(built["sana"], sana)
    if damage is not None:
        damage(sana)
    if setup is not None:
        setup(work)
    monkeypatch.chdir(work)
    before, before_t2v = snapshot(work), snapshot(t2v)
    try:
        rc = main([a.format(sana=sana, t2v=t2v) for a in argv])
    except SystemExit as e:  # argparse's own usage errors (exit 2, one "error:" line)
        rc = e.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert rc == 2, err
    assert len(errors) == 1 and "Traceback" not in err and "internal error" not in err, err
    assert fragment in errors[0], f"expected {fragment!r} in {errors[0]!r}"
    assert snapshot(work) == before, "a refused command changed files"
    assert snapshot(t2v) == before_t2v


def _argparse_exit(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


@pytest.mark.parametrize("argv", [[], ["nope"], ["generate"], ["generate", "--engines", "x"], ["build", "tiny-sana"],
                                  ["build", "--backend", "bogus", "tiny-sana", "o"], ["calibrate", "tiny-sana"],
                                  ["calibrate", "tiny-sana", "-o", "c", "--precision", "int4"], ["bench-kernels"]],
                         ids=lambda a: " ".join(a) or "none")
def test_usage_errors_exit_2(argv, capsys):
    assert _argparse_exit(argv) == 2
    assert "Traceback" not in capsys.readouterr().err


# -- the API behind the verbs: the same checks without the CLI ------------------------------------------------
def test_api_checks(built, tmp_path):
    from diffkiln.calibration.calibrate import CalibrationConfig
    from diffkiln.engines.build import build, check_ranges
    from diffkiln.runtime import load_pipeline

    for kwargs, fragment in [(dict(steps=0), "calibration steps=0"), (dict(guidance=float("inf")), "guidance=inf"),
                             (dict(seed=-1), "seed=-1"), (dict(percentile=float("nan")), "percentile nan")]:
        with pytest.raises(DiffkilnError, match=re.escape(fragment)):
            CalibrationConfig(**kwargs)
    with pytest.raises(DiffkilnError, match="expected at most 16384"):
        check_ranges({"max_size": 10**8})
    with pytest.raises(DiffkilnError, match="--calibration applies to fp8 / nvfp4"):
        build("tiny-sana", tmp_path / "o", calibration=tmp_path)
    assert not (tmp_path / "o").exists()
    pipe = load_pipeline(built["t2v"])
    for scale in (float("nan"), float("inf"), True):
        with pytest.raises(DiffkilnError, match="expected a finite number"):
            pipe.set_lora(str(tmp_path / "missing.safetensors"), spatial_scale=scale)
