"""Writing videos: MP4 through imageio-ffmpeg (its bundled ffmpeg), GIF through Pillow, and a frame-grid PNG, all
atomic and checked: the suffix names the format, fps is a positive finite number, the codec is one MP4 carries,
and ffmpeg's result (a file with every frame) is checked before it replaces anything."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from diffkiln.errors import DiffkilnError
from diffkiln.fileio import temp_file


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """[F, H, W, 3] floats in [0, 1] (or uint8) -> uint8."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise DiffkilnError(f"expected frames [F, H, W, 3], got shape {frames.shape}")
    if frames.dtype == np.uint8:
        return frames
    if not np.isfinite(frames).all():
        raise DiffkilnError(f"frames hold {int((~np.isfinite(frames)).sum())} non-finite values (NaN or inf); "
                            "nothing was written")
    return (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)


# encoders of the bundled ffmpeg whose streams an MP4 carries
MP4_CODECS = ("libx264", "libx265", "libopenh264", "mpeg4", "libaom-av1", "libsvtav1", "h264_nvenc", "hevc_nvenc",
              "av1_nvenc")
PIX_FMTS = ("yuv420p", "yuv444p")
MAX_FPS = 240


def check_fps(fps) -> float:
    if isinstance(fps, bool) or not isinstance(fps, (int, float, np.integer, np.floating)) or not (
            math.isfinite(fps) and 0 < fps <= MAX_FPS):
        raise DiffkilnError(f"fps={fps!r}; expected a finite number in (0, {MAX_FPS}]")
    return float(fps)


def check_video_output(path, fps, codec: str = "libx264") -> Path:
    """Refuse a video request before any work: suffix .mp4 / .gif, fps, an MP4 codec, a writable path outside
    engine directories."""
    from diffkiln.runtime.image import VIDEO_SUFFIXES, check_output_path

    path = check_output_path(path, VIDEO_SUFFIXES, "video")
    check_fps(fps)
    if path.suffix.lower() == ".mp4" and codec not in MP4_CODECS:
        raise DiffkilnError(f"codec {codec!r}; expected one of {', '.join(MP4_CODECS)}")
    return path


def write_video(frames: np.ndarray, path: str | Path, fps: float = 8, codec: str = "libx264") -> Path:
    """Frames [F, H, W, 3] -> `path` in the format its suffix names (.mp4 or .gif)."""
    path = check_video_output(path, fps, codec)
    if path.suffix.lower() == ".gif":
        return write_gif(frames, path, fps)
    return write_mp4(frames, path, fps, codec)


def write_gif(frames: np.ndarray, path: str | Path, fps: float = 8) -> Path:
    """An animated GIF (looping) through Pillow, atomic."""
    import io

    from diffkiln.fileio import atomic_write_bytes
    from diffkiln.runtime.image import check_output_path

    path = check_output_path(path, (".gif",), "GIF")
    images = _frames_pil(to_uint8(frames))
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], loop=0,
                   duration=max(1, round(1000 / check_fps(fps))))
    atomic_write_bytes(path, buf.getvalue())
    return path


def _frames_pil(frames: np.ndarray) -> list:
    from PIL import Image

    return [Image.fromarray(f) for f in frames]


def write_mp4(frames: np.ndarray, path: str | Path, fps: float = 8, codec: str = "libx264",
              quality: float | None = 8, pix_fmt: str = "yuv420p") -> Path:
    """Encode frames [F, H, W, 3] to `path` (written to a temp file, checked, then renamed).

    yuv420p (what players expect) needs even sides; pass pix_fmt="yuv444p" for odd ones.
    quality: imageio-ffmpeg's 0..10 scale (None: ffmpeg's default bitrate). imageio-ffmpeg does not raise when
    ffmpeg fails, so the temp file must exist, be non-empty and decode to every frame before it replaces `path`.
    """
    from diffkiln.runtime.image import check_output_path

    try:
        import imageio_ffmpeg
    except ImportError:
        raise DiffkilnError("writing MP4 needs imageio-ffmpeg: pip install 'diffkiln[video]'") from None
    path = check_output_path(path, (".mp4",), "MP4")
    fps = check_fps(fps)
    if codec not in MP4_CODECS:
        raise DiffkilnError(f"codec {codec!r}; expected one of {', '.join(MP4_CODECS)}")
    if pix_fmt not in PIX_FMTS:
        raise DiffkilnError(f"pix_fmt {pix_fmt!r}; expected one of {PIX_FMTS}")
    if quality is not None and not (isinstance(quality, (int, float)) and 0 <= quality <= 10):
        raise DiffkilnError(f"quality={quality!r}; expected a number in [0, 10] or None")
    frames = to_uint8(frames)
    n, h, w, _ = frames.shape
    if n < 1 or h < 1 or w < 1:
        raise DiffkilnError(f"frames of shape {frames.shape}: nothing to encode")
    if pix_fmt == "yuv420p" and (h % 2 or w % 2):
        raise DiffkilnError(f"{w}x{h} frames: yuv420p needs even width and height; use pix_fmt='yuv444p'")
    tmp = temp_file(path, suffix=".mp4")  # ffmpeg picks the container from the suffix
    try:
        writer = imageio_ffmpeg.write_frames(tmp, (w, h), fps=fps, codec=codec, quality=quality,
                                             pix_fmt_out=pix_fmt, macro_block_size=1, ffmpeg_log_level="error")
        try:
            writer.send(None)
            for frame in frames:
                writer.send(np.ascontiguousarray(frame))
            writer.close()
        except (OSError, RuntimeError) as e:
            raise DiffkilnError(f"ffmpeg failed writing {path} (codec {codec}, fps {fps}): {str(e).splitlines()[0][:200]}") from None
        _check_encoded(tmp, path, n, codec, fps)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _check_encoded(tmp: Path, path: Path, n: int, codec: str, fps: float) -> None:
    import imageio_ffmpeg

    size = tmp.stat().st_size if tmp.exists() else 0
    if size == 0:
        raise DiffkilnError(f"ffmpeg wrote nothing for {path} (codec {codec}, fps {fps}); {path} was left unchanged")
    try:
        count, _ = imageio_ffmpeg.count_frames_and_secs(str(tmp))
    except (OSError, RuntimeError) as e:
        raise DiffkilnError(f"ffmpeg's output for {path} does not decode ({str(e).splitlines()[0][:120]}); {path} was "
                            "left unchanged") from None
    if count != n:
        raise DiffkilnError(f"ffmpeg encoded {count} of {n} frames for {path}; {path} was left unchanged")


def read_mp4(path: str | Path) -> np.ndarray:
    """Decode an MP4 back to uint8 frames [F, H, W, 3] (for checks)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = reader.__next__()
    w, h = meta["size"]
    return np.stack([np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader])


def save_frame_grid(frames: np.ndarray, path: str | Path, cols: int | None = None) -> Path:
    """All frames of one video tiled row-major into one PNG (default: up to 8 per row)."""
    from diffkiln.runtime.image import grid, save_image, to_pil

    images = to_pil(to_uint8(frames).astype(np.float32) / 255.0)
    return save_image(grid(images, cols or min(8, len(images))), path)
