"""Writing videos: MP4 through imageio-ffmpeg (its bundled ffmpeg) and a frame-grid PNG, both atomic."""

from __future__ import annotations

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
    return frames if frames.dtype == np.uint8 else (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)


def write_mp4(frames: np.ndarray, path: str | Path, fps: int = 8, codec: str = "libx264",
              quality: float | None = 8, pix_fmt: str = "yuv420p") -> Path:
    """Encode frames [F, H, W, 3] to `path` (written to a temp file, then renamed).

    yuv420p (what players expect) needs even sides; pass pix_fmt="yuv444p" for odd ones.
    quality: imageio-ffmpeg's 0..10 scale (None: ffmpeg's default bitrate).
    """
    try:
        import imageio_ffmpeg
    except ImportError:
        raise DiffkilnError("writing MP4 needs imageio-ffmpeg: pip install 'diffkiln[video]'") from None
    frames = to_uint8(frames)
    _, h, w, _ = frames.shape
    if pix_fmt == "yuv420p" and (h % 2 or w % 2):
        raise DiffkilnError(f"{w}x{h} frames: yuv420p needs even width and height; use pix_fmt='yuv444p'")
    path = Path(path)
    tmp = temp_file(path, suffix=path.suffix or ".mp4")  # ffmpeg picks the container from the suffix
    try:
        writer = imageio_ffmpeg.write_frames(tmp, (w, h), fps=fps, codec=codec, quality=quality,
                                             pix_fmt_out=pix_fmt, macro_block_size=1, ffmpeg_log_level="error")
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_mp4(path: str | Path) -> np.ndarray:
    """Decode an MP4 back to uint8 frames [F, H, W, 3] (for checks)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = reader.__next__()
    w, h = meta["size"]
    return np.stack([np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader])


def save_frame_grid(frames: np.ndarray, path: str | Path, cols: int | None = None) -> Path:
    """All frames of one video tiled row-major into one PNG (default: up to 8 per row)."""
    from diffkiln.runtime.image import grid, save_png, to_pil

    images = to_pil(to_uint8(frames).astype(np.float32) / 255.0)
    save_png(grid(images, cols or min(8, len(images))), path)
    return Path(path)
