"""Open-Sora 2.0 text- and image-to-video over engines (numpy + tokenizers only), as opensora/utils/sampling.py samples it.

* text: T5 ids padded to max_sequence_length (no mask) -> `text_encoder`; CLIP ids from CLIP's own tokenizer
  (tokenizer_2.json; the main tokenizer when the model folder had none), padded to clip_length with its pad (end)
  token -> `text_encoder_2`'s pooled vector;
* schedule (get_schedule): sigmas linspace(1, 0, n + 1) shifted by alpha * s / (1 + (alpha - 1) * s), alpha =
  linear(tokens per latent frame: 256 -> base_shift, 4096 -> max_shift) * sqrt(latent frames); Euler steps
  x += (s_next - s) * v (the FlowMatchEuler port, shift 1, with these sigmas);
* the transformer sees 2x2-packed latents || the packed condition (text-to-video: zeros), timestep = sigma, and the
  token positions (t, h, w); guidance (I2VDenoiser): v = v_neg + g * (v_text - v_neg), the condition-free third pass of
  image-to-video equals the negative one when there is no reference, so text-to-video runs two passes exactly;
  with oscillation g is 1 on odd steps from `osci_from` (Open-Sora: 10) on;
* image-to-video (cond_type "i2v_head"; opensora/utils/inference.py prepare_inference_condition and
  collect_references_batch, sampling.py I2VDenoiser): the reference image (resized / cropped as Open-Sora reads it:
  runtime/video.py reference_pixels) -> `vae_encoder` -> one latent frame; the condition is mask (1 at latent frame
  0, when the video has more than one latent frame) || masked reference latents (the reference at frame 0, zeros
  after), 2x2-packed. Three passes per step: [text + cond, negative + cond, negative + zeros]:
  v = v_neg0 + g_img * (v_neg - v_neg0) + g * (v_text - v_neg), g and g_img each oscillated (text_osci,
  image_osci); with scale_temporal_osci and g_img > 1 the image scale is a ramp over latent frames,
  linspace(1, linspace(g_img, 1, steps + 1)[step], T)[frame]. After the loop latent frame 0 is replaced by the
  reference latents (as Open-Sora does for i2v_head; here for every video of the batch) before decoding;
* decode: diffusers' AutoencoderKLHunyuanVideo.decode, one `vae_decoder` call per tile (temporal tiles of
  tile_sample_min_num_frames / 4 + 1 latent frames, stride tile_sample_stride_num_frames / 4, blended over the
  overlap; spatial tiles likewise when use_tiling), so memory is bounded by one tile whatever the video's size.
"""

from __future__ import annotations

import math

import numpy as np

from diffkiln.errors import DiffkilnError
from diffkiln.runtime.pipeline import run_batched
from diffkiln.runtime.text import PromptTokenizer
from diffkiln.runtime.video import VideoPipeline
from diffkiln.schedulers import torch_linspace_f32

PATCH = 2


def image_ids(t: int, h: int, w: int) -> np.ndarray:
    """Token positions (t, h, w) in packing order, float32 [t*h*w, 3] (sampling.py `prepare`'s img_ids)."""
    g = np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij"), -1)
    return g.reshape(-1, 3).astype(np.float32)


def pack(x: np.ndarray) -> np.ndarray:
    """[B, C, T, H, W] -> [B, T*(H/2)*(W/2), C*2*2] (sampling.py `pack`: b c t (h ph) (w pw) -> b (t h w) (c ph pw))."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // PATCH, PATCH, w // PATCH, PATCH).transpose(0, 2, 3, 5, 1, 4, 6)
    return np.ascontiguousarray(x.reshape(b, t * (h // PATCH) * (w // PATCH), c * PATCH * PATCH))


def unpack(x: np.ndarray, shape: tuple) -> np.ndarray:
    b, c, t, h, w = shape
    x = x.reshape(b, t, h // PATCH, w // PATCH, c, PATCH, PATCH).transpose(0, 4, 1, 2, 5, 3, 6)
    return np.ascontiguousarray(x.reshape(shape))


def schedule(steps: int, latent_shape: tuple, sampler: dict) -> np.ndarray:
    """Open-Sora's shifted sigmas (n + 1 values, ending at 0), float32 as torch computes them."""
    _, _, t, h, w = latent_shape
    seq = (h * w) // (PATCH * PATCH)
    slope = (sampler["max_shift"] - sampler["base_shift"]) / (sampler["max_seq_len"] - sampler["base_seq_len"])
    alpha = (slope * seq + sampler["base_shift"] - slope * sampler["base_seq_len"]) * math.sqrt(t)
    s = np.linspace(1, 0, steps + 1, dtype=np.float32)
    return (np.float32(alpha) * s / (np.float32(1) + np.float32(alpha - 1) * s)).astype(np.float32)


def oscillated(scale: float, i: int, start: int) -> float:
    """get_oscillation_gs: the scale before step `start` and on even steps, 1 on the odd ones after."""
    return scale if i < start or i % 2 == 0 else 1.0


def image_scale(guidance_img: float, i: int, steps: int, sampler: dict, tokens_shape: tuple) -> np.float32 | np.ndarray:
    """I2VDenoiser's image guidance at step i: oscillated (image_osci), then with scale_temporal_osci and a scale
    above 1 a ramp from 1 at latent frame 0 to linspace(g, 1, steps + 1)[i] at the last, per packed token
    ([1, N, 1] for tokens_shape (T, h/2, w/2))."""
    g = oscillated(guidance_img, i, sampler["osci_from"]) if sampler["image_osci"] else guidance_img
    if not (g > 1.0 and sampler["scale_temporal_osci"]):
        return np.float32(g)
    t, hh, ww = tokens_shape
    upper = torch_linspace_f32(g, 1.0, steps + 1)[i]
    ramp = torch_linspace_f32(1.0, float(upper), t)
    return np.repeat(ramp, hh * ww).reshape(1, -1, 1)


def condition(reference: np.ndarray | None, shape: tuple) -> np.ndarray:
    """The packed condition [B, N, 4 (C + 1)]: mask || masked reference latents (prepare_inference_condition,
    i2v_head: mask 1 and the reference at latent frame 0 when there is more than one latent frame; else zeros)."""
    b, c, t, h, w = shape
    cond = np.zeros((b, c + 1, t, h, w), np.float32)
    if reference is not None and t > 1:
        cond[:, 0, 0] = 1
        cond[:, 1:, 0] = reference
    return pack(cond)


def _blend(a: np.ndarray, b: np.ndarray, extent: int, axis: int) -> np.ndarray:
    """diffusers' blend_t / blend_v / blend_h: b's first `extent` entries along `axis` ramp from a's last ones."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent <= 0:
        return b
    ramp = (np.arange(extent, dtype=np.float64) / extent).astype(np.float32)
    shape = [1] * b.ndim
    shape[axis] = extent
    ramp = ramp.reshape(shape)
    head = [slice(None)] * b.ndim
    head[axis] = slice(0, extent)
    tail = [slice(None)] * b.ndim
    tail[axis] = slice(a.shape[axis] - extent, a.shape[axis])
    b = b.copy()
    b[tuple(head)] = a[tuple(tail)] * (1 - ramp) + b[tuple(head)] * ramp
    return b


def tiled_decode(decode, z: np.ndarray, tiles: dict, f: int, ft: int) -> np.ndarray:
    """AutoencoderKLHunyuanVideo._decode over `decode` (one tile -> pixels): temporal tiles when the latent video is
    longer than one, spatial tiles (use_tiling) when a tile is larger than tile_sample_min_{height,width}."""
    th, tw = tiles["tile_sample_min_height"] // f, tiles["tile_sample_min_width"] // f
    tt = tiles["tile_sample_min_num_frames"] // ft

    def spatial(tile):
        h, w = tile.shape[-2:]
        if not (tiles["use_tiling"] and (w > tw or h > th)):
            return decode(tile)
        sh, sw = tiles["tile_sample_stride_height"], tiles["tile_sample_stride_width"]
        rows = [[decode(tile[..., i:i + th, j:j + tw]) for j in range(0, w, sw // f)] for i in range(0, h, sh // f)]
        out = []
        for i, row in enumerate(rows):
            parts = []
            for j in range(len(row)):  # diffusers blends in place: later tiles blend with already blended ones
                if i > 0:
                    row[j] = _blend(rows[i - 1][j], row[j], tiles["tile_sample_min_height"] - sh, 3)
                if j > 0:
                    row[j] = _blend(row[j - 1], row[j], tiles["tile_sample_min_width"] - sw, 4)
                parts.append(row[j][..., :sh, :sw])
            out.append(np.concatenate(parts, -1))
        return np.concatenate(out, 3)[..., : h * f, : w * f]

    T = z.shape[2]
    if T <= tt:
        return spatial(z)
    st, blend = tiles["tile_sample_stride_num_frames"], tiles["tile_sample_min_num_frames"] - tiles["tile_sample_stride_num_frames"]
    row = []
    for i in range(0, T, st // ft):
        dec = spatial(z[:, :, i:i + tt + 1])
        row.append(dec if i == 0 else dec[:, :, 1:])
    for i in range(1, len(row)):  # in place, as diffusers' blend_t
        row[i] = _blend(row[i - 1], row[i], blend, 2)
    out = [row[0][:, :, : st + 1]] + [r[:, :, :st] for r in row[1:]]
    return np.concatenate(out, 2)[:, :, : (T - 1) * ft + 1]


class OpenSoraV2Pipeline(VideoPipeline):
    """Open-Sora 2.0 over `text_encoder` (T5), `text_encoder_2` (CLIP pooled), `transformer` and `vae_decoder`."""

    required = ("text_encoder", "text_encoder_2", "transformer", "vae_decoder")
    supports_image = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        s = self.settings
        self.sampler = dict(s["sampler"])
        clip_file = self.tokenizer_file if s.get("clip_tokenizer") is None else self.runtime_file(s["clip_tokenizer"])
        self.clip_tokenizer = PromptTokenizer(clip_file, s["clip_length"], s.get("clip_pad_token_id", s["pad_token_id"]),
                                              None, s.get("clip_vocab_size", s.get("text_vocab_size")))

    def encode_image(self, pixels, shape, image_guidance, timings):
        if "vae_encoder" not in self.engines:
            raise DiffkilnError("image: these engines have no vae_encoder (built before image-to-video); rebuild "
                                "them to generate from an image: diffkiln build MODEL OUT --overwrite")
        ref = self._timed(timings, "vae_encoder", run_batched, self.engines["vae_encoder"], {"image": pixels[None]})
        reference = np.repeat(ref.astype(np.float32), shape[0], 0)
        return {"reference": reference, "packed_cond": condition(reference, shape), "guidance_img": image_guidance}

    # -- hooks ------------------------------------------------------------------------------------
    def latent_shape(self, batch, frames, height, width):
        s = self.settings
        f, ft = s["vae_scale_factor"], s["temporal_compression"]
        return (batch, s["latent_channels"], (frames - 1) // ft + 1, height // f, width // f)

    def encode_prompt(self, prompts, negatives, guidance, timings):
        """[prompts; negatives] through both text encoders (negatives always: image-to-video's passes use them)."""
        texts = prompts + negatives
        hidden, _ = self.encode_text(texts, False, timings)
        ids, _ = self.clip_tokenizer.encode(texts)
        pooled = self._timed(timings, "text_encoder_2", run_batched, self.engines["text_encoder_2"], {"input_ids": ids})
        return {"t5": hidden.astype(np.float32), "pooled": pooled.astype(np.float32), "guided": guidance > 1.0,
                "cfg": False}

    def denoise(self, latents, cond, steps, guidance, rng, timings, callback, progress):
        self._sigmas = schedule(steps, latents.shape, self.sampler)
        cond = dict(cond, guidance=guidance)
        latents = super().denoise(latents, cond, steps, guidance, rng, timings, callback, progress)
        if cond.get("reference") is not None:  # i2v_head: latent frame 0 is the reference's
            latents = latents.copy()
            latents[:, :, 0] = cond["reference"]
        return latents

    def set_timesteps(self, scheduler, steps):
        scheduler.set_timesteps(sigmas=self._sigmas[:-1])
        self._index = {float(t): i for i, t in enumerate(scheduler.timesteps)}

    def predict(self, model_in, t, cond, timings):
        i = self._index[float(t)]
        shape = model_in.shape
        b, c, frames, h, w = shape
        x = pack(model_in)
        zeros = np.zeros((b, x.shape[1], (c + 1) * PATCH * PATCH), np.float32)  # mask || masked reference: none
        t5, pooled = cond["t5"], cond["pooled"]
        g = oscillated(cond["guidance"], i, self.sampler["osci_from"]) if self.sampler["text_osci"] else cond["guidance"]
        if "packed_cond" in cond:  # image-to-video: [text + cond, negative + cond, negative + no cond]
            withc = np.concatenate([x, cond["packed_cond"]], -1)
            hidden = np.concatenate([withc, withc, np.concatenate([x, zeros], -1)])
            t5, pooled = np.concatenate([t5, t5[b:]]), np.concatenate([pooled, pooled[b:]])
        else:  # text-to-video: the condition-free pass equals the negative one; without guidance the text alone
            n = 2 if cond["guided"] else 1
            hidden = np.concatenate([np.concatenate([x, zeros], -1)] * n)
            t5, pooled = t5[: n * b], pooled[: n * b]
        n = len(hidden) // b
        feeds = {"hidden_states": hidden, "encoder_hidden_states": t5, "pooled_projections": pooled,
                 "timestep": np.full(n * b, self._sigmas[i], np.float32),
                 "img_ids": image_ids(frames, h // PATCH, w // PATCH)}
        v = self._timed(timings, "transformer", self._transformer, feeds)
        if n == 3:
            text, neg, neg0 = np.split(v, 3)
            gi = image_scale(cond["guidance_img"], i, len(self._sigmas) - 1, self.sampler,
                             (frames, h // PATCH, w // PATCH))
            v = neg0 + gi * (neg - neg0) + np.float32(g) * (text - neg)
        elif n == 2:
            text, neg = np.split(v, 2)
            v = neg + np.float32(g) * (text - neg)
        return unpack(v.astype(np.float32), shape)

    def _transformer(self, feeds):
        engine = self.engines["transformer"]
        step = engine.spec.dims.get("batch", (1, len(feeds["timestep"])))[1]
        n, ids = len(feeds["timestep"]), feeds.pop("img_ids")
        parts = [engine({**{k: v[i:i + step] for k, v in feeds.items()}, "img_ids": ids})["velocity"]
                 for i in range(0, n, step)]
        return np.concatenate(parts)

    def decode(self, latents, frames, timings):
        s = self.settings
        z = (latents / np.float32(s["vae_scaling_factor"])).astype(np.float32)

        def one(tile):
            return self._timed(timings, "vae_decoder", run_batched, self.engines["vae_decoder"],
                               {"latents": np.ascontiguousarray(tile)})

        video = tiled_decode(one, z, s["vae_tiles"], s["vae_scale_factor"], s["temporal_compression"])
        video = np.clip(video[:, :, :frames] / 2 + 0.5, 0.0, 1.0)
        return np.ascontiguousarray(video.transpose(0, 2, 3, 4, 1)).astype(np.float32)
