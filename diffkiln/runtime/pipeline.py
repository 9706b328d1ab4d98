"""The denoising loop over engines: tokenize -> text encoder -> scheduler + CFG -> VAE decoder -> images.

Imports nothing from torch, diffusers or transformers: it runs where only numpy, tokenizers,
pillow and an engine library are installed. It talks to engines only through `Engine`.

Seeds: initial latents are `numpy.random.Generator(numpy.random.PCG64(seed)).standard_normal(
(batch, C, H / f, W / f), dtype=float32)`; SANA-Sprint's per-step noise continues from the same
generator. The same seed therefore gives the same starting noise on every install and backend.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from diffkiln.errors import DiffkilnError
from diffkiln.fileio import host_memory_bytes
from diffkiln.runtime.image import to_pil, to_unit_range
from diffkiln.runtime.text import PromptTokenizer
from diffkiln.schedulers import scheduler_from_config


@dataclass
class PipelineOutput:
    images: list | np.ndarray  # PIL images, [B, H, W, 3] floats in [0, 1], or latents
    seed: int | None  # None when a caller-supplied generator was used
    timings: dict[str, list[float]] = field(default_factory=dict)  # stage -> seconds per call


def run_batched(engine, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Call `engine`, splitting axis 0 into chunks that fit the engine's batch range; returns its first output."""
    n = next(iter(feeds.values())).shape[0]
    step = engine.spec.dims.get("batch", (1, n))[1]
    out_name = engine.spec.outputs[0].name
    parts = [engine({k: v[i : i + step] for k, v in feeds.items()})[out_name] for i in range(0, n, step)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def guide(noise: np.ndarray, guidance: float) -> np.ndarray:
    """Classifier-free guidance over a batch stacked [unconditional; conditional], as diffusers combines it."""
    uncond, text = np.split(noise, 2)
    return uncond + np.float32(guidance) * (text - uncond)


def open_engine_dir(root: str | Path, backend: str | None = None, target: str | None = None,
                    precision: str | None = None, verify: bool = True, **engine_options) -> tuple[dict, dict, dict, Path]:
    """An engine directory -> (engines, pipeline settings, scheduler config, tokenizer file), manifest hashes checked.

    `backend=None`: the only engine set present, else the best one this machine runs (logged)."""
    from diffkiln.engines import open_engines, select_engines
    from diffkiln.manifest import path_of, read_listed_json, read_manifest
    from diffkiln.settings import PipelineSettings

    root = Path(root)
    manifest = read_manifest(root, verify=verify)
    # the runtime files are listed, hashed, inside the directory and strictly parsed before any engine is opened
    settings = PipelineSettings.from_dict(read_listed_json(root, manifest, "pipeline.json"), f"{root}/pipeline.json")
    scheduler = read_listed_json(root, manifest, "scheduler.json", infinities=True)  # diffusers writes -Infinity
    if not isinstance(scheduler, dict):
        raise DiffkilnError(f"{root}/scheduler.json: expected a JSON object (a diffusers scheduler config), got "
                            f"{type(scheduler).__name__}")
    tokenizer = path_of(root, "tokenizer.json", manifest)
    entry = select_engines(manifest, backend, target, precision, root=root)
    engines = open_engines(root, manifest, entry, **engine_options)
    return engines, settings, scheduler, tokenizer


@dataclass(frozen=True)
class Request:
    prompts: list[str]
    negatives: list[str]
    steps: int
    guidance: float
    height: int
    width: int
    total: int


def _texts(name: str, value, n: int | None = None) -> list[str]:
    """A prompt argument (a string, or a list of them) as a list of valid UTF-8 strings."""
    texts = [value] * (n or 1) if isinstance(value, str) else value
    if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
        raise DiffkilnError(f"{name}: expected a string or a non-empty list of strings, got {value!r:.80}")
    for i, t in enumerate(texts):
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DiffkilnError(f"{name} {i} is not valid text ({e.reason} at position {e.start})") from None
    return list(texts)


class EnginePipeline:
    """What every pipeline over an engine directory shares: loading, the required engines, the prompt tokenizer,
    the scheduler (the folder's, or `scheduler=NAME` swapped in as diffusers' `from_config` would), stage timing,
    and the one denoising loop (`denoise`) every family runs through its hooks."""

    required: tuple[str, ...] = ("text_encoder", "transformer", "vae_decoder")

    def __init__(self, engines: dict, settings: dict, scheduler_config: dict, tokenizer_file: str | Path,
                 scheduler: str | None = None):
        from diffkiln.settings import PipelineSettings

        self.settings = settings if isinstance(settings, PipelineSettings) else PipelineSettings.from_dict(settings)
        missing = set(self.required) - set(engines)
        if missing:
            raise DiffkilnError(f"{type(self).__name__} needs engines for {sorted(missing)}; got {sorted(engines)}")
        self.engines = engines
        if scheduler:
            from diffkiln.schedulers import predicts_flow, swap_scheduler

            scheduler_config = swap_scheduler(scheduler_config, scheduler)
            if predicts_flow(scheduler_config) != self.settings["flow"]:
                kind = "flow" if self.settings["flow"] else "noise-prediction"
                raise DiffkilnError(f"--scheduler {scheduler} does not sample this {kind} model "
                                    f"({self.settings.family}); swap to a {kind} scheduler (for flow models: "
                                    "FlowMatchEulerDiscreteScheduler, or DPMSolverMultistepScheduler keeping the "
                                    "folder's flow settings)")
        self.scheduler_config = scheduler_config
        try:
            scheduler_from_config(self.scheduler_config)  # refuse an unusable scheduler now, not mid-generation
        except ValueError as e:
            raise DiffkilnError(f"scheduler: {e}") from None
        self.tokenizer_file = Path(tokenizer_file)
        self.tokenizer = PromptTokenizer.from_settings(tokenizer_file, self.settings)

    @classmethod
    def from_engines(cls, root: str | Path, backend: str | None = None, target: str | None = None,
                     precision: str | None = None, verify: bool = True, scheduler: str | None = None,
                     **engine_options):
        """Load an engine directory: manifest (hashes checked), tokenizer, scheduler and pipeline settings."""
        return cls(*open_engine_dir(root, backend, target, precision, verify, **engine_options), scheduler=scheduler)

    # -- the denoising loop ------------------------------------------------------------------------
    def denoise(self, latents: np.ndarray, cond: dict, steps: int, guidance: float, rng: np.random.Generator,
                timings: dict, callback, progress: bool) -> np.ndarray:
        """diffusers' loop: set_timesteps, latents * init_noise_sigma, then per timestep: [uncond; cond] batch
        when cond["cfg"], scale_model_input, `predict` (the family's denoiser call), guidance (`guidance_at`),
        scheduler.step (with fresh noise from `rng` for samplers that take it), callback(i, t, latents)."""

        scheduler = scheduler_from_config(self.scheduler_config)
        self.set_timesteps(scheduler, steps)
        latents = self.prepare_latents(latents * np.float32(scheduler.init_noise_sigma), scheduler)
        cfg = bool(cond.get("cfg"))
        for i, t in enumerate(self._steps(self.loop_timesteps(scheduler), progress)):
            model_in = np.concatenate([latents, latents]) if cfg else latents
            model_in = scheduler.scale_model_input(model_in, t).astype(np.float32)
            noise = self.predict(model_in, t, cond, timings)
            if cfg:
                noise = guide(noise, self.guidance_at(guidance, t, steps))
            extra = {"noise": rng.standard_normal(latents.shape, dtype=np.float32)} if scheduler.needs_noise else {}
            latents = self.step(scheduler, noise, t, latents, **extra).astype(np.float32)
            if callback:
                callback(i, float(t), latents)
        return self.finish_latents(latents, scheduler)

    # hooks of the loop (defaults: diffusers' plain loop)
    def set_timesteps(self, scheduler, steps: int) -> None:
        scheduler.set_timesteps(steps)

    def loop_timesteps(self, scheduler):
        return scheduler.timesteps

    def prepare_latents(self, latents: np.ndarray, scheduler) -> np.ndarray:
        return latents

    def guidance_at(self, guidance: float, t, steps: int) -> float:
        return guidance

    def step(self, scheduler, model_output, t, latents, **extra) -> np.ndarray:
        return scheduler.step(model_output, t, latents, **extra)

    def predict(self, model_in: np.ndarray, t, cond: dict, timings: dict) -> np.ndarray:
        raise NotImplementedError

    def finish_latents(self, latents: np.ndarray, scheduler) -> np.ndarray:
        return latents

    def encode_text(self, prompts: list[str], with_instruction: bool, timings: dict) -> tuple[np.ndarray, np.ndarray]:
        """Prompts -> (text encoder hidden states, attention mask); Sana's families keep their selected tokens."""
        ids, mask = self.tokenizer.encode(prompts, with_instruction)
        feeds = {"input_ids": ids}
        if any(i.name == "attention_mask" for i in self.engines["text_encoder"].spec.inputs):
            feeds["attention_mask"] = mask
        hidden = self._timed(timings, "text_encoder", run_batched, self.engines["text_encoder"], feeds)
        if self.tokenizer.instruction:
            return self.tokenizer.select(hidden, mask)
        return hidden, mask

    def runtime_file(self, rel: str) -> Path:
        """Another runtime file of this engine directory (e.g. tokenizer_2.json), beside tokenizer.json: listed in
        the manifest, inside the directory, a regular file (its hash was checked when the directory was opened)."""
        from diffkiln.manifest import path_of, read_manifest

        root = self.tokenizer_file.parent
        return path_of(root, rel, read_manifest(root, verify=False))

    def _timed(self, timings: dict, stage: str, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        timings.setdefault(stage, []).append(time.perf_counter() - start)
        return out

    def _steps(self, timesteps, progress: bool):
        if not progress:
            return timesteps
        from diffkiln.progress import progress as bar

        return bar(timesteps, desc="denoising")

    def request(self, prompt, negative_prompt, steps, guidance, height, width, per_prompt: int = 1,
                frames: int | None = None) -> Request:
        """A generation request with the engine directory's defaults filled in, checked before any work: prompts
        (strings, UTF-8), steps in [1, the scheduler's train timesteps], finite guidance, sizes on the stride and in
        the built range, frames by the family's rule, and an output that fits in this machine's memory.
        0 is an error, not "the default": only None means the default."""
        d = self.settings.defaults
        steps = d["num_inference_steps"] if steps is None else steps
        guidance = d["guidance_scale"] if guidance is None else guidance
        height = d["height"] if height is None else height
        width = d["width"] if width is None else width
        prompts = _texts("prompt", prompt)
        negatives = _texts("negative_prompt", negative_prompt, len(prompts))
        if len(negatives) != len(prompts):
            raise DiffkilnError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one per prompt or a single string")
        for name, v in (("num_inference_steps", steps), ("num_images_per_prompt", per_prompt), ("height", height),
                        ("width", width)) + ((("num_frames", frames),) if frames is not None else ()):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise DiffkilnError(f"{name}={v!r}; expected a positive integer")
        most = int(self.scheduler_config.get("num_train_timesteps", 1000))
        if steps > most:
            raise DiffkilnError(f"num_inference_steps={steps}; this scheduler takes at most {most} "
                                f"(its num_train_timesteps)")
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float, np.floating)) or not np.isfinite(guidance):
            raise DiffkilnError(f"guidance_scale={guidance!r}; expected a finite number")
        total = len(prompts) * per_prompt
        # the decoded output alone: total x frames x H x W x 3 float32; refuse what cannot fit in memory
        need = total * (frames or 1) * height * width * 3 * 4
        have = host_memory_bytes()
        if have and need > have // 4:
            raise DiffkilnError(f"{total} outputs of {frames or 1} x {height} x {width} px need {need / 2**30:.1f} GiB "
                                f"for the decoded pixels alone; this machine has {have / 2**30:.1f} GiB: generate fewer "
                                "per call")
        return Request(prompts, negatives, int(steps), float(guidance), int(height), int(width), total)

    def _rng(self, seed: int | None, generator: np.random.Generator | None) -> tuple[np.random.Generator, int | None]:
        """The run's random stream: PCG64(seed), or the caller's generator (then no seed is reported)."""
        if generator is not None and seed is not None:
            raise DiffkilnError("pass either seed or generator, not both")
        if generator is not None:
            return generator, None
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
                                 or not 0 <= seed < 2**63):
            raise DiffkilnError(f"seed={seed!r}; expected an integer in [0, 2**63)")
        seed = int(np.random.SeedSequence().entropy % (2**63)) if seed is None else int(seed)
        return np.random.Generator(np.random.PCG64(seed)), seed

    def check_size(self, height: int, width: int) -> None:
        s = self.settings
        stride, lo, hi = s["pixel_stride"], s["min_pixels"], s["max_pixels"]
        for name, v in (("height", height), ("width", width)):
            if v % stride:
                raise DiffkilnError(
                    f"{name}={v} is not a multiple of {stride}, this model's pixel stride; "
                    f"nearest allowed: {max(lo, v // stride * stride)} or {v // stride * stride + stride}"
                )
            if not lo <= v <= hi:
                raise DiffkilnError(f"{name}={v} is outside the range these engines were built for: [{lo}, {hi}] pixels")


class Pipeline(EnginePipeline):
    """A text-to-image pipeline over `text_encoder`, `transformer` and `vae_decoder` engines
    (SanaPipeline; SanaSprintPipeline's sCM loop through the same `denoise` hooks)."""

    @property
    def sprint(self) -> bool:
        return self.settings.family == "sana-sprint"

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] = "",
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        generator: np.random.Generator | None = None,
        num_images_per_prompt: int = 1,
        latents: np.ndarray | None = None,
        output_type: str = "pil",
        callback: Callable[[int, float, np.ndarray], None] | None = None,
        progress: bool = False,
        resolution_binning: bool = False,
    ) -> PipelineOutput:
        """Generate images. `callback(step_index, timestep, latents)` runs after every step.

        `resolution_binning=True` does what diffusers' SanaPipeline does by default: the requested size maps to the
        nearest aspect-ratio bin of diffusers' table for this model (pipeline.json `resolution_bins`), the image is
        generated at the bin size (which must lie in the engines' range; `latents` are then of the bin size), then
        resized and center-cropped back to the requested size (diffkiln.runtime.binning). Latent output stays at
        the bin size, as in diffusers.

        `seed` (an int) makes the run reproducible on any install and backend: the initial latents
        and any per-step noise come from `numpy.random.Generator(numpy.random.PCG64(seed))`. Pass
        `generator` instead to draw from your own numpy Generator; with neither, a fresh seed is
        drawn and returned in `PipelineOutput.seed`.
        """
        r = self.request(prompt, negative_prompt, num_inference_steps, guidance_scale, height, width,
                         num_images_per_prompt)
        prompts, negatives, steps, guidance, height, width, total = (r.prompts, r.negatives, r.steps, r.guidance,
                                                                      r.height, r.width, r.total)
        out_size = None  # the requested (height, width) when generating at an aspect-ratio bin's size
        if resolution_binning:
            bins, known = self.settings.get("resolution_bins"), self.settings.get("resolution_bin_sample_sizes")
            if not bins:
                raise DiffkilnError(
                    f"resolution binning: this {self.settings.family} model's transformer sample_size is "
                    f"{known['sample_size']}; diffusers has aspect-ratio bins for it only at sample_size "
                    f"{', '.join(map(str, known['with_tables']))}" if known else
                    "resolution binning: these engines were built without diffusers' aspect-ratio bins (no "
                    "resolution_bins in pipeline.json); rebuild them: diffkiln build MODEL OUT --overwrite")
            from diffkiln.runtime.binning import classify

            out_size, (height, width) = (height, width), classify(height, width, bins)
            try:
                self.check_size(height, width)
            except DiffkilnError as e:
                raise DiffkilnError(f"resolution binning maps the requested {out_size[0]}x{out_size[1]} (height x "
                                    f"width) to diffusers' bin {height}x{width}, which these engines cannot run: "
                                    f"{e}") from None
        else:
            self.check_size(height, width)
        if output_type not in ("pil", "np", "latent"):
            raise DiffkilnError(f"output_type={output_type!r}; expected 'pil', 'np' or 'latent'")
        rng, seed = self._rng(seed, generator)
        f = self.settings["vae_scale_factor"]
        shape = (total, self.settings["latent_channels"], height // f, width // f)
        if latents is None:
            latents = rng.standard_normal(shape, dtype=np.float32)
        elif latents.shape != shape:
            raise DiffkilnError(f"latents shape {latents.shape}; expected {shape}")
        timings: dict[str, list[float]] = {}
        start = time.perf_counter()

        emb, mask = self.encode_text(prompts, True, timings)
        emb, mask = np.repeat(emb, num_images_per_prompt, 0), np.repeat(mask, num_images_per_prompt, 0)
        cfg = guidance > 1.0 and not self.sprint  # SANA-Sprint takes guidance as an embedding, no CFG batch
        if cfg:
            neg, neg_mask = self.encode_text(negatives, False, timings)
            emb = np.concatenate([np.repeat(neg, num_images_per_prompt, 0), emb])
            mask = np.concatenate([np.repeat(neg_mask, num_images_per_prompt, 0), mask])
        cond = {"encoder_hidden_states": emb, "encoder_attention_mask": mask, "cfg": cfg, "guidance": guidance}
        latents = self.denoise(latents, cond, steps, guidance, rng, timings, callback, progress)

        if output_type == "latent":
            images = latents
        else:
            decoded = self._timed(timings, "vae_decoder", run_batched, self.engines["vae_decoder"],
                                  {"latents": (latents / self.settings["vae_scaling_factor"]).astype(np.float32)})
            if out_size is not None:
                from diffkiln.runtime.binning import resize_and_crop

                decoded = resize_and_crop(decoded, *out_size)
            images = to_unit_range(decoded)
            if output_type == "pil":
                images = to_pil(images)
        timings["total"] = [time.perf_counter() - start]
        return PipelineOutput(images=images, seed=seed, timings=timings)

    # -- hooks of the loop ----------------------------------------------------------------------
    def loop_timesteps(self, scheduler):
        # sCM evaluates the model at every angle but the last (0)
        return scheduler.timesteps[:-1] if self.sprint else scheduler.timesteps

    def prepare_latents(self, latents, scheduler):
        return latents * self._sigma_data() if self.sprint else latents

    def finish_latents(self, latents, scheduler):
        return (scheduler.pred_original_sample / self._sigma_data()).astype(np.float32) if self.sprint else latents

    def _sigma_data(self) -> np.float32:
        return np.float32(self.scheduler_config.get("sigma_data", 0.5))

    def predict(self, model_in, t, cond, timings):
        s = self.settings
        feeds = {"encoder_hidden_states": cond["encoder_hidden_states"],
                 "encoder_attention_mask": cond["encoder_attention_mask"]}
        if not self.sprint:
            timestep = np.full(model_in.shape[0], np.float32(t) * np.float32(s["timestep_scale"]), np.float32)
            noise = self._timed(timings, "transformer", run_batched, self.engines["transformer"],
                                dict(feeds, latents=model_in, timestep=timestep))
            return noise[:, : s["latent_channels"]] if s["learned_sigma"] else noise
        # SanaSprintPipeline: TrigFlow -> sCM time and input scaling around the transformer, guidance embedded
        sigma, t32 = self._sigma_data(), np.float32(t)
        scm_t = np.full(model_in.shape[0], np.sin(t32) / (np.cos(t32) + np.sin(t32)), np.float32)
        st = scm_t.reshape(-1, 1, 1, 1)
        norm = np.sqrt(st**2 + (1 - st) ** 2)
        x = (model_in / sigma * norm).astype(np.float32)
        g = np.full(model_in.shape[0], np.float32(cond["guidance"]) * np.float32(s["guidance_embeds_scale"]), np.float32)
        pred = self._timed(timings, "transformer", run_batched, self.engines["transformer"],
                           dict(feeds, latents=x, timestep=scm_t, guidance=g))
        pred = ((1 - 2 * st) * x + (1 - 2 * st + 2 * st**2) * pred) / norm
        return (pred * sigma).astype(np.float32)
