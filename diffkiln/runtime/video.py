"""Text-to-video over engines: what every video family shares (loading, input checks, seeds, output).

A family's subclass (`VIDEO_PIPELINES`) reproduces its diffusers pipeline by implementing
    latent_shape(batch, frames, height, width) -> tuple      initial latents' shape
    predict(model_in, t, cond, timings) -> noise             its denoiser engine call (the loop is shared:
                                                             `EnginePipeline.denoise`)
    decode(latents, frames, timings) -> [B, F, H, W, 3] float32 in [0, 1]
and may override initial_latents / encode_prompt / guidance_at. Families that condition on a first frame
(image-to-video: `supports_image`) implement
    encode_image(pixels, shape, image_guidance, timings) -> dict   merged into the conditioning
where `pixels` is the reference image as [3, H, W] float32 in [-1, 1] at the request size (`reference_pixels`).
Like the image runtime it imports nothing from torch, diffusers or transformers.

pipeline.json of a video family holds, besides what the image runtime reads: "frames" (the valid
frame counts: min, max, multiple, offset -> f = offset + k * multiple), defaults.num_frames and
defaults.fps.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffkiln.errors import DiffkilnError
from diffkiln.runtime.pipeline import EnginePipeline, open_engine_dir

# family -> "module:class" of its runtime pipeline
VIDEO_PIPELINES = {
    "text-to-video-ms": "diffkiln.runtime.t2v_ms:TextToVideoMsPipeline",
    "cogvideox": "diffkiln.runtime.cogvideox:CogVideoXPipeline",
    "sana-video": "diffkiln.runtime.sana_video:SanaVideoPipeline",
    "videocrafter2": "diffkiln.runtime.videocrafter2:VideoCrafter2Pipeline",
    "open-sora-v2": "diffkiln.runtime.open_sora:OpenSoraV2Pipeline",
}


@dataclass
class VideoOutput:
    frames: np.ndarray  # [B, F, H, W, 3] float32 in [0, 1]; latents when output_type="latent"
    seed: int | None  # None when a caller-supplied generator was used
    timings: dict[str, list[float]] = field(default_factory=dict)  # stage -> seconds per call
    fps: int | None = None  # the model's default frame rate, for writing files


def valid_frames(rule: dict, n: int) -> bool:
    return rule["min"] <= n <= rule["max"] and (n - rule.get("offset", 0)) % rule.get("multiple", 1) == 0


def check_frames(rule: dict, n: int) -> None:
    """Refuse a frame count the model cannot take, naming the rule and the nearest counts it can."""
    if valid_frames(rule, n):
        return
    m, off, lo, hi = rule.get("multiple", 1), rule.get("offset", 0), rule["min"], rule["max"]
    below, above = off + (n - off) // m * m, off + -(-(n - off) // m) * m  # the rule's counts around n
    near = sorted({min(max(f, lo), hi) for f in (below, above)})
    near = [f for f in near if valid_frames(rule, f)]
    form = f"{off} + k*{m} frames" if m > 1 else "a frame count"
    raise DiffkilnError(f"num_frames={n} cannot be generated: these engines take {form} in [{lo}, {hi}]; "
                        f"nearest allowed: {' or '.join(map(str, near))}")


class VideoPipeline(EnginePipeline):
    """Base of the video families' runtime pipelines (see the module docstring for the hooks)."""

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] = "",
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        generator: np.random.Generator | None = None,
        latents: np.ndarray | None = None,
        output_type: str = "np",
        callback: Callable[[int, float, np.ndarray], None] | None = None,
        progress: bool = False,
        image=None,
        image_guidance_scale: float | None = None,
    ) -> VideoOutput:
        """Generate one video per prompt. `seed` makes it reproducible on any install and backend:
        the initial latents come from `numpy.random.Generator(numpy.random.PCG64(seed))`.

        `image` (families with `supports_image`): the first frame, an [H, W, 3] RGB array (uint8, or float in
        [0, 1]; [H, W] gray and [H, W, 4] RGBA are converted as PIL's convert("RGB") does) or a PIL image, resized
        and center-cropped to the request size (`reference_pixels`); `image_guidance_scale` overrides the model's
        image guidance (pipeline.json defaults.guidance_img)."""
        d = self.settings.defaults
        frames = d["num_frames"] if num_frames is None else num_frames
        r = self.request(prompt, negative_prompt, num_inference_steps, guidance_scale, height, width, frames=frames)
        prompts, negatives, steps, guidance, height, width = (r.prompts, r.negatives, r.steps, r.guidance, r.height,
                                                              r.width)
        if output_type not in ("np", "latent"):
            raise DiffkilnError(f"output_type={output_type!r}; expected 'np' or 'latent'")
        check_frames(self.settings["frames"], frames)
        self.check_size(height, width)
        image_guidance = self._image_request(image, image_guidance_scale)
        pixels = None if image is None else reference_pixels(image, height, width)
        rng, seed = self._rng(seed, generator)
        shape = tuple(self.latent_shape(len(prompts), frames, height, width))
        if latents is None:
            latents = self.initial_latents(shape, rng)
        elif tuple(latents.shape) != shape:
            raise DiffkilnError(f"latents shape {tuple(latents.shape)}; expected {shape}")
        timings: dict[str, list[float]] = {}
        start = time.perf_counter()
        cond = self.encode_prompt(prompts, negatives, guidance, timings)
        if pixels is not None:
            cond.update(self.encode_image(pixels, shape, image_guidance, timings))
        latents = self.denoise(latents.astype(np.float32), cond, steps, guidance, rng, timings, callback, progress)
        out = latents if output_type == "latent" else self.decode(latents, frames, timings)
        timings["total"] = [time.perf_counter() - start]
        return VideoOutput(frames=out, seed=seed, timings=timings, fps=d.get("fps"))

    def set_lora(self, path, spatial_scale: float = 1.0, temporal_scale: float = 1.0) -> dict:
        """Apply a LoRA (a .safetensors file in the diffusers/PEFT layout, or several) to the denoiser engine
        without re-exporting; `path=None` removes it. See diffkiln.runtime.lora.set_lora."""
        from diffkiln.runtime.lora import set_lora

        return set_lora(self, path, spatial_scale, temporal_scale, submodel=self.settings.denoiser)

    supports_image = False  # image-to-video (a reference first frame)

    def _image_request(self, image, scale) -> float | None:
        """The image guidance scale of an image-to-video request (None for text-to-video), checked."""
        family = self.settings.family
        if image is None:
            if scale is not None:
                raise DiffkilnError(f"image_guidance_scale={scale!r} applies with an image (image-to-video)")
            return None
        if not self.supports_image:
            raise DiffkilnError(f"image: the {family} model generates from text only; image-to-video needs an "
                                f"open-sora-v2 engine directory")
        scale = self.settings.defaults.get("guidance_img", 1.0) if scale is None else scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating)) or not np.isfinite(scale):
            raise DiffkilnError(f"image_guidance_scale={scale!r}; expected a finite number")
        return float(scale)

    # -- hooks ----------------------------------------------------------------------------------
    def encode_image(self, pixels: np.ndarray, shape: tuple, image_guidance: float, timings: dict) -> dict:
        raise NotImplementedError

    def latent_shape(self, batch: int, frames: int, height: int, width: int) -> tuple:
        raise NotImplementedError

    def initial_latents(self, shape: tuple, rng: np.random.Generator) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32)

    def encode_prompt(self, prompts: list[str], negatives: list[str], guidance: float, timings: dict) -> dict:
        """Conditioning as diffusers builds it: prompts (with the family's instruction, if any), and with
        guidance > 1 the negatives (without it) batched first: [negative; positive]."""
        emb, mask = self.encode_text(prompts, True, timings)
        cfg = guidance > 1.0
        if cfg:
            neg, neg_mask = self.encode_text(negatives, False, timings)
            emb, mask = np.concatenate([neg, emb]), np.concatenate([neg_mask, mask])
        return {"encoder_hidden_states": emb.astype(np.float32), "encoder_attention_mask": mask, "cfg": cfg}

    def decode(self, latents: np.ndarray, frames: int, timings: dict) -> np.ndarray:
        raise NotImplementedError


MAX_RESIZE_PIXELS = 1 << 26  # the resized image before the crop (an extreme aspect ratio would need more)


def _rgb(image) -> np.ndarray:
    """An image argument -> [H, W, 3] uint8 or float32 in [0, 1] (PIL images and arrays; gray / RGBA converted as
    PIL's convert("RGB"): gray replicated, alpha dropped)."""
    if type(image).__module__.startswith("PIL."):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise DiffkilnError(f"image: expected an [H, W, 3] RGB array or a PIL image, got {type(image).__name__}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, 2)
    elif image.ndim == 3 and image.shape[2] in (1, 3, 4):
        image = np.repeat(image, 3, 2) if image.shape[2] == 1 else image[:, :, :3]
    else:
        raise DiffkilnError(f"image: shape {image.shape}; expected [H, W, 3] RGB (or [H, W] gray, [H, W, 4] RGBA)")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise DiffkilnError(f"image: shape {image.shape} has no pixels")
    if image.dtype == np.uint8:
        return image
    if image.dtype.kind != "f":
        raise DiffkilnError(f"image: dtype {image.dtype}; expected uint8 (0..255) or float in [0, 1]")
    image = image.astype(np.float32)
    if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
        raise DiffkilnError("image: float pixels must be finite and in [0, 1]")
    return image


def cover_size(h: int, w: int, height: int, width: int) -> tuple[int, int]:
    """The size an h x w image is scaled to so that it covers height x width with its aspect ratio kept; refused
    when that exceeds MAX_RESIZE_PIXELS (an aspect ratio too far from the request's)."""
    rh, rw = height / h, width / w
    sh, sw = (height, round(w * rh)) if rh > rw else (round(h * rw), width)
    if sh * sw > MAX_RESIZE_PIXELS:
        raise DiffkilnError(f"image: {w}x{h} px (width x height) would be scaled to {sw}x{sh} to cover the "
                            f"{width}x{height} request; its aspect ratio is too far from the request's")
    return sh, sw


def reference_pixels(image, height: int, width: int) -> np.ndarray:
    """A first frame as Open-Sora reads it (opensora/datasets/utils.py read_image_from_path, transform
    "resize_crop": resize_crop_to_fill then ToTensor and Normalize(0.5, 0.5)): scaled (bicubic) to cover
    height x width with the aspect ratio kept, center-cropped, -> [3, height, width] float32 in [-1, 1]. An image
    already of the request size is used as is (no resampling)."""
    rgb = _rgb(image)
    h, w = rgb.shape[:2]
    if (h, w) != (height, width):
        sh, sw = cover_size(h, w, height, width)
        try:
            from PIL import Image
        except ImportError:
            raise DiffkilnError(f"image: {w}x{h} px needs resizing to {width}x{height} and Pillow is not installed; "
                                f"pass an image of the request size or install pillow") from None
        if rgb.dtype == np.uint8:
            big = np.asarray(Image.fromarray(rgb).resize((sw, sh), Image.BICUBIC)).astype(np.float32) / 255
        else:  # float pixels: each channel resized in PIL's float mode (no 8-bit rounding)
            big = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(rgb[:, :, c])).resize((sw, sh), Image.BICUBIC))
                            for c in range(3)], -1)
        i, j = round((sh - height) / 2.0), round((sw - width) / 2.0)
        rgb = big[i:i + height, j:j + width]
    else:
        rgb = rgb.astype(np.float32) / 255 if rgb.dtype == np.uint8 else rgb
    return np.ascontiguousarray(rgb.transpose(2, 0, 1) * 2 - 1).astype(np.float32)


MAX_IMAGE_FILE_BYTES = 256 << 20


def read_image_bytes(data: bytes, where: str) -> np.ndarray:
    """PNG / JPEG bytes (any format Pillow reads) -> [H, W, 3] uint8, converted to RGB as Open-Sora's pil_loader
    does; empty, unreadable or non-image bytes and images over MAX_RESIZE_PIXELS (a small compressed file must not
    expand into gigabytes) are one clear error naming `where`."""
    import io

    try:
        from PIL import Image
    except ImportError:
        raise DiffkilnError(f"{where}: reading images needs Pillow (pip install pillow)") from None
    if not data:
        raise DiffkilnError(f"{where}: empty (0 bytes); expected a PNG or JPEG file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > MAX_RESIZE_PIXELS:
                raise DiffkilnError(f"{where}: {w}x{h} px (width x height); at most {MAX_RESIZE_PIXELS} pixels")
            return np.asarray(im.convert("RGB"))
    except Image.DecompressionBombError as e:
        raise DiffkilnError(f"{where}: {e}") from None
    except Image.UnidentifiedImageError:  # its text names the BytesIO object, not the file
        raise DiffkilnError(f"{where}: not a readable image (Pillow cannot identify it); expected a PNG or JPEG "
                            "file") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DiffkilnError(f"{where}: not a readable image ({' '.join(str(e).split())[:120]}); expected a PNG or "
                            "JPEG file") from None


def image_file_bytes(path) -> bytes:
    """An image file's bytes: a missing path, a directory or an oversized file is one clear error."""
    path = Path(path)
    where = f"image {path}"
    if not path.is_file():
        raise DiffkilnError(f"{where}: {'a directory' if path.is_dir() else 'no such file'}; expected a PNG or "
                            "JPEG file")
    if path.stat().st_size > MAX_IMAGE_FILE_BYTES:
        raise DiffkilnError(f"{where}: {path.stat().st_size} bytes; at most {MAX_IMAGE_FILE_BYTES} for an image")
    try:
        return path.read_bytes()
    except OSError as e:
        raise DiffkilnError(f"{where}: {e.strerror or e}") from None


def read_image_file(path) -> np.ndarray:
    """A PNG / JPEG file -> [H, W, 3] uint8 (read_image_bytes)."""
    return read_image_bytes(image_file_bytes(path), f"image {Path(path)}")


def video_pipeline_class(family: str) -> type[VideoPipeline]:
    try:
        module, cls = VIDEO_PIPELINES[family].split(":")
    except KeyError:
        raise DiffkilnError(f"family {family!r} has no video pipeline; video families: {sorted(VIDEO_PIPELINES)}") from None
    return getattr(importlib.import_module(module), cls)


def is_video(root: str | Path) -> bool:
    """Whether an engine directory holds a video model (by its pipeline.json family, read as the loader reads it:
    listed in the manifest, hashed, strictly parsed). A directory that fails that is left to the loader, which
    names what is wrong."""
    from diffkiln.manifest import read_listed_json, read_manifest

    try:
        settings = read_listed_json(root, read_manifest(root, verify=False), "pipeline.json")
    except DiffkilnError:
        return False
    return isinstance(settings, dict) and settings.get("family") in VIDEO_PIPELINES


def load_video_pipeline(root: str | Path, backend: str | None = None, target: str | None = None,
                        precision: str | None = None, verify: bool = True, **engine_options) -> VideoPipeline:
    """The runtime pipeline of the video family an engine directory was built for."""
    engines, settings, scheduler, tokenizer = open_engine_dir(root, backend, target, precision, verify, **engine_options)
    return video_pipeline_class(settings.family)(engines, settings, scheduler, tokenizer)
