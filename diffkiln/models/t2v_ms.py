"""ModelScope text-to-video (damo-vilab/text-to-video-ms-1.7b) adapter: UNet3D + CLIP text encoder + SD VAE.

diffusers 0.42 classes are the source of truth (UNet3DConditionModel, AutoencoderKL,
TextToVideoSDPipeline, DDIMScheduler) with a CLIPTextModel from transformers. Presets are built
with seeded random weights (no hub access here); a saved TextToVideoSDPipeline folder loads from
safetensors only. The UNet3D module is the model's `unet` attribute.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffkiln.errors import DiffkilnError
from diffkiln.fileio import atomic_write_json
from diffkiln.models.loading import (
    GENERIC_CONFIG_KEYS,
    check_request,
    check_safetensors,
    config_hash,
    loaded,
    read_json,
)

FAMILY = "text-to-video-ms"
SUBMODELS = ("text_encoder", "unet", "vae_decoder")
PIPELINE_CLASSES = {"TextToVideoSDPipeline": FAMILY}
SETTINGS_FILE = "diffkiln.json"
GENERATION_FIELDS = ("height", "width", "num_frames", "fps", "steps", "guidance_scale", "min_pixels", "max_pixels",
                     "min_frames", "max_frames", "max_batch", "decode_chunk")
# CLIP-style special tokens of the locally built word-level tokenizer (no hub: the BPE vocabulary of
# OpenCLIP cannot be fetched). Ids: pad 0, start 1, end 2, unk 3; the text encoder config says the same.
PAD, BOS, EOS, UNK = "<pad>", "<|startoftext|>", "<|endoftext|>", "<unk>"

# -- configs ------------------------------------------------------------------------------------
# Public diffusers configs of damo-vilab/text-to-video-ms-1.7b (unet/, vae/, text_encoder/, scheduler/).
UNET3D_1_7B = dict(
    in_channels=4, out_channels=4, sample_size=32, layers_per_block=2,
    block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"],
    up_block_types=["UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"],
    cross_attention_dim=1024, attention_head_dim=64, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=256,
    block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, act_fn="silu", scaling_factor=0.18215,
)
OPENCLIP_H_TEXT = dict(  # OpenCLIP ViT-H/14 text tower, penultimate layer (23 of 24 layers kept)
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=512,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
DDIM = dict(
    _class_name="DDIMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    prediction_type="epsilon", timestep_spacing="leading", skip_prk_steps=True,
)

TINY_UNET3D = dict(
    in_channels=4, out_channels=4, sample_size=4, layers_per_block=1, block_out_channels=[32, 64],
    down_block_types=["CrossAttnDownBlock3D", "DownBlock3D"], up_block_types=["UpBlock3D", "CrossAttnUpBlock3D"],
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, norm_eps=1e-5, act_fn="silu",
)
TINY_VAE = dict(
    SD_VAE, layers_per_block=1, norm_num_groups=4, sample_size=32, block_out_channels=[8, 16, 16, 16],
)
TINY_CLIP_TEXT = dict(
    OPENCLIP_H_TEXT, vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=16, projection_dim=32,
)
WORDS = (
    "a an the of on in with and at to small large big tiny red green blue yellow orange purple pink white black "
    "gray brown cat dog panda bear horse bird fish car boat astronaut man woman child tree flower sky sea river "
    "mountain city street beach forest snow rain fire smoke cloud sun moon night day sunset walking running "
    "riding flying swimming dancing playing eating guitar surfing wave waves camera slowly fast moving video "
    "clip shot closeup aerial view blurry low quality"
).split()


@dataclass(frozen=True)
class T2VPreset:
    """A named pipeline: component configs plus TextToVideoSDPipeline's generation defaults and engine ranges."""

    name: str
    description: str
    unet: dict
    vae: dict
    text_encoder: dict
    scheduler: dict
    height: int = 256
    width: int = 256
    num_frames: int = 16
    fps: int = 8
    steps: int = 50
    guidance_scale: float = 9.0
    # Engine ranges: pixels per side, frames per video, prompts per call (the UNet sees twice as many with CFG).
    min_pixels: int = 128
    max_pixels: int = 512
    min_frames: int = 1
    max_frames: int = 32
    max_batch: int = 1
    # Frames the VAE decoder engine takes per call: decoding memory is bounded by this chunk, not the video.
    decode_chunk: int = 8
    # (batch, frames) of the UNet's two parity shapes (the first is traced): small for the 1.7B model on CPU
    unet_parity: tuple[tuple[int, int], tuple[int, int]] = ((2, 8), (1, 4))
    seed: int = 0
    words: tuple[str, ...] = field(default=tuple(WORDS))


PRESETS = {
    p.name: p
    for p in [
        T2VPreset(
            name="tiny-t2v-ms",
            description="tiny UNet3D (2 levels, 32/64 ch), 2-layer CLIP text encoder, 4-level SD-style VAE (f8); "
                        "seeded random; 32x32 px, 8 frames",
            unet=TINY_UNET3D, vae=TINY_VAE, text_encoder=TINY_CLIP_TEXT, scheduler=DDIM,
            height=32, width=32, num_frames=8, steps=4, min_pixels=16, max_pixels=64, min_frames=1, max_frames=16,
            max_batch=2, decode_chunk=8,
        ),
        T2VPreset(
            name="text-to-video-ms-1.7b",
            description="ModelScope text-to-video 1.7B: UNet3D (320/640/1280/1280), OpenCLIP-H text encoder "
                        "(23 layers), SD VAE; DDIM; 256x256, 16 frames (seeded random weights)",
            unet=UNET3D_1_7B, vae=SD_VAE, text_encoder=OPENCLIP_H_TEXT, scheduler=DDIM,
            unet_parity=((1, 4), (2, 2)),
        ),
    ]
}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> T2VPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise DiffkilnError(f"Unknown preset {name!r}; available presets: {', '.join(PRESETS)}") from None


def preset_rows() -> list[dict]:
    """For `diffkiln presets`: parameter counts per module, counted on the meta device (no memory, no weights)."""
    import torch
    from diffusers import AutoencoderKL, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    count = lambda m: sum(p.numel() for p in m.parameters())
    rows = []
    for n, p in PRESETS.items():
        with torch.device("meta"):
            params = {"unet": count(UNet3DConditionModel(**p.unet)),
                      "text_encoder": count(CLIPTextModel(CLIPTextConfig(**p.text_encoder))),
                      "vae": count(AutoencoderKL(**p.vae))}
        rows.append({"name": n, "family": FAMILY, "params": params, "description": p.description})
    return rows


def build_clip_word_tokenizer(words, vocab_size: int):
    """Word-level tokenizer with CLIP's layout: <|startoftext|> words <|endoftext|>, lowercase."""
    from diffkiln.models.tokenizer import word_tokenizer

    return word_tokenizer((w.lower() for w in words), vocab_size, (PAD, BOS, EOS, UNK), f"{BOS} $A {EOS}", unk=UNK)


def hf_clip_tokenizer(tokenizer, max_length: int):
    """Wrap a `tokenizers.Tokenizer` for diffusers (model_max_length = the text encoder's positions)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, model_max_length=max_length)


# -- the model object ------------------------------------------------------------------------------
@dataclass
class T2VMsModel:
    """A TextToVideoSDPipeline's parts. Modules not asked for are None."""

    name: str
    source: str  # "preset" or the folder it was loaded from
    preset: T2VPreset
    unet_config: dict
    vae_config: dict
    text_encoder_config: dict
    scheduler_config: dict
    tokenizer: object  # tokenizers.Tokenizer
    unet: object = None
    vae: object = None
    text_encoder: object = None
    weights_ids: dict = field(default_factory=dict)  # submodel -> weights digest (diffkiln.models.loading.loaded)
    family: str = FAMILY

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def latent_multiple(self) -> int:
        """Latent sides must be multiples of the UNet's total downsampling (else diffusers switches to
        explicit upsample sizes, a data-dependent path the engines are not built for)."""
        return 2 ** (len(self.unet_config["block_out_channels"]) - 1)

    @property
    def pixel_stride(self) -> int:
        return self.vae_scale_factor * self.latent_multiple

    @property
    def text_max_length(self) -> int:
        return self.text_encoder_config.get("max_position_embeddings", 77)

    def config_hash(self) -> str:
        """Hash of the effective configs (defaults filled), equal for a preset and its saved folder."""
        import diffusers
        from transformers import CLIPTextConfig

        return config_hash(self.family, (diffusers.UNet3DConditionModel, self.unet_config), (diffusers.AutoencoderKL, self.vae_config),
                           CLIPTextConfig(**self.text_encoder_config), self.scheduler_config)

    def submodels(self, names=None) -> dict:
        return t2v_submodels(self, names)

    def pipeline_settings(self) -> dict:
        """Everything the runtime needs besides the engines, the tokenizer and the scheduler config."""
        p = self.preset
        return {
            "family": self.family,
            "max_sequence_length": self.text_max_length,
            "pad_token": PAD,
            "latent_channels": self.unet_config["in_channels"],
            "vae_scale_factor": self.vae_scale_factor,
            "pixel_stride": self.pixel_stride,
            "vae_scaling_factor": self.vae_config.get("scaling_factor", 0.18215),
            "min_pixels": p.min_pixels,
            "max_pixels": p.max_pixels,
            "max_batch": p.max_batch,
            "decode_chunk": p.decode_chunk,
            "frames": {"min": p.min_frames, "max": p.max_frames, "multiple": 1, "offset": 0},
            "opt_dims": {"frames": p.num_frames},  # TensorRT profiles' opt point for the UNet's frames dim
            "defaults": {
                "height": p.height,
                "width": p.width,
                "num_frames": p.num_frames,
                "fps": p.fps,
                "num_inference_steps": p.steps,
                "guidance_scale": p.guidance_scale,
            },
        }

    def diffusers_pipeline(self):
        """diffusers' TextToVideoSDPipeline over the same modules (the reference the runtime reproduces)."""
        import diffusers

        return diffusers.TextToVideoSDPipeline(
            tokenizer=hf_clip_tokenizer(self.tokenizer, self.text_max_length),
            text_encoder=self.text_encoder,
            vae=self.vae,
            unet=self.unet,
            scheduler=diffusers.DDIMScheduler.from_config(self.scheduler_config),
        )

    def save_pretrained(self, folder: str | Path) -> None:
        """Write a diffusers-format folder (model_index.json + subfolders, safetensors weights)."""
        self.diffusers_pipeline().save_pretrained(str(folder), safe_serialization=True)
        atomic_write_json(Path(folder) / SETTINGS_FILE, {k: getattr(self.preset, k) for k in GENERATION_FIELDS})


# -- building and loading ---------------------------------------------------------------------------
def _clip_text_model(config: dict):
    from transformers import CLIPTextConfig, CLIPTextModel

    # eager attention: one code path for export and reference; CLIP's causal mask is built inside
    return CLIPTextModel(CLIPTextConfig(**config, attn_implementation="eager"))


def _build_modules(model: T2VMsModel, submodels, dtype, seed: int) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet3DConditionModel

    # Each module has its own seed, so building a subset gives the same weights.
    if "text_encoder" in submodels:
        torch.manual_seed(seed)
        model.text_encoder = loaded(model, "text_encoder", _clip_text_model(model.text_encoder_config), dtype)
    if "unet" in submodels:
        torch.manual_seed(seed + 1)
        model.unet = loaded(model, "unet", UNet3DConditionModel(**model.unet_config), dtype)
    if "vae_decoder" in submodels:
        torch.manual_seed(seed + 2)
        model.vae = loaded(model, "vae_decoder", AutoencoderKL(**model.vae_config), dtype)


def load_model(source: str | Path, submodels=SUBMODELS, dtype: str = "float32") -> T2VMsModel:
    """A preset name or a saved TextToVideoSDPipeline folder -> T2VMsModel with the requested modules."""
    folder, tdtype = check_request(source, submodels, SUBMODELS, dtype)
    if folder is not None:
        return _load_folder(folder, submodels, tdtype)
    preset = get_preset(str(source))
    model = T2VMsModel(
        name=preset.name, source="preset", preset=preset, unet_config=dict(preset.unet), vae_config=dict(preset.vae),
        text_encoder_config=dict(preset.text_encoder), scheduler_config=dict(preset.scheduler),
        tokenizer=build_clip_word_tokenizer(preset.words, preset.text_encoder["vocab_size"]),
    )
    _build_modules(model, submodels, tdtype, preset.seed)
    return model


def _load_folder(folder: Path, submodels, dtype) -> T2VMsModel:
    from tokenizers import Tokenizer
    from transformers import CLIPTextConfig

    index = read_json(folder / "model_index.json")
    if index.get("_class_name") not in PIPELINE_CLASSES:
        raise DiffkilnError(f"{folder}: pipeline class {index.get('_class_name')!r} is not supported by the {FAMILY} "
                            f"adapter; expected one of {list(PIPELINE_CLASSES)}")
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}
    uconf = strip(read_json(folder / "unet" / "config.json"))
    vconf = strip(read_json(folder / "vae" / "config.json"))
    clip_keys = set(inspect.signature(CLIPTextConfig.__init__).parameters) | set(CLIPTextConfig().to_dict())
    teconf = {k: v for k, v in read_json(folder / "text_encoder" / "config.json").items()
              if k in clip_keys and k not in GENERIC_CONFIG_KEYS}
    sconf = read_json(folder / "scheduler" / "scheduler_config.json")
    if sconf.get("_class_name") != "DDIMScheduler":
        raise DiffkilnError(f"{folder}: scheduler {sconf.get('_class_name')!r}; the {FAMILY} runtime implements DDIMScheduler")
    tok_file = folder / "tokenizer" / "tokenizer.json"
    if not tok_file.is_file():
        raise DiffkilnError(f"{folder}: tokenizer/tokenizer.json is missing (a fast tokenizer file is required; "
                            "convert CLIP's vocab.json/merges.txt with transformers' CLIPTokenizerFast.save_pretrained)")
    stride = 2 ** (len(vconf["block_out_channels"]) - 1)
    native = uconf.get("sample_size", 32) * stride
    settings = dict(height=native, width=native, min_pixels=max(stride * 2 ** (len(uconf["block_out_channels"]) - 1), native // 2),
                    max_pixels=native * 2)
    if (folder / SETTINGS_FILE).is_file():
        settings.update({k: v for k, v in read_json(folder / SETTINGS_FILE).items() if k in GENERATION_FIELDS})
    preset = T2VPreset(name=folder.name, description=f"diffusers folder {folder}", unet=uconf, vae=vconf,
                       text_encoder=teconf, scheduler=sconf, **settings)
    model = T2VMsModel(name=folder.name, source=str(folder.resolve()), preset=preset, unet_config=uconf,
                       vae_config=vconf, text_encoder_config=teconf, scheduler_config=sconf,
                       tokenizer=Tokenizer.from_file(str(tok_file)))
    from diffusers import AutoencoderKL, UNet3DConditionModel
    from transformers import CLIPTextModel

    loaders = {
        "unet": ("unet", lambda p: UNet3DConditionModel.from_pretrained(p, use_safetensors=True)),
        "vae_decoder": ("vae", lambda p: AutoencoderKL.from_pretrained(p, use_safetensors=True)),
        "text_encoder": ("text_encoder",
                         lambda p: CLIPTextModel.from_pretrained(p, use_safetensors=True, attn_implementation="eager")),
    }
    for sub in submodels:
        attr, load = loaders[sub]
        check_safetensors(folder / attr)
        setattr(model, attr, loaded(model, sub, load(str(folder / attr)), dtype))
    return model


# -- submodels ---------------------------------------------------------------------------------------
def _wrappers():
    """Wrappers with float32 I/O whatever the weights' dtype (casts inside the graph)."""
    import torch

    from diffkiln.models.submodels import cast_like as cast

    class TextEncoder(torch.nn.Module):
        def __init__(self, text_encoder):
            super().__init__()
            self.text_encoder = text_encoder

        def forward(self, input_ids):
            # input_ids [B, L] int64, padded to L -> last_hidden_state [B, L, D] (no attention mask, as diffusers)
            return self.text_encoder(input_ids=input_ids).last_hidden_state.float()

    class Unet(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, latents, timestep, encoder_hidden_states):
            # latents [B, C, F, h, w]; timestep [B] (train timestep, float32); encoder_hidden_states [B, L, D]
            w = next(self.unet.parameters())
            return self.unet(cast(latents, w), timestep, encoder_hidden_states=cast(encoder_hidden_states, w),
                             return_dict=False)[0].float()

    class VaeDecoder(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, latents):
            # latents [N, C, h, w] (frames folded into the batch, already / scaling_factor) -> [N, 3, H, W] in [-1, 1]
            return self.vae.decode(cast(latents, next(self.vae.parameters())), return_dict=False)[0].float()

    return TextEncoder, Unet, VaeDecoder


def t2v_submodels(model: T2VMsModel, names=None) -> dict:
    """Submodels for the modules present in `model` (or the subset `names`)."""
    from diffkiln.manifest import SubmodelSpec, TensorSpec
    from diffkiln.models.submodels import Submodel

    TextEncoder, Unet, VaeDecoder = _wrappers()
    p, f, m = model.preset, model.vae_scale_factor, model.latent_multiple
    lat = (max(m, p.min_pixels // f), p.max_pixels // f)
    mid = max(lat[0], min(lat[1], p.height // f))
    other = lat[0] if mid != lat[0] else lat[0] + m
    frames = (p.min_frames, p.max_frames)
    (b0, f0), (b1, f1) = ((b, max(frames[0], min(frames[1], fr))) for b, fr in p.unet_parity)
    sides = {"latent_height": lat, "latent_width": lat}
    out = {}

    if model.text_encoder is not None:
        L, D = model.text_max_length, model.text_encoder_config["hidden_size"]
        vocab = model.text_encoder_config["vocab_size"]

        def sample_te(dims, seed):
            rng = np.random.default_rng(seed)
            ids = np.zeros((dims["batch"], L), np.int64)  # <|startoftext|> words <|endoftext|> <pad>...
            for i in range(dims["batch"]):
                n = int(rng.integers(1, L - 1))
                ids[i, 0], ids[i, 1 : n + 1], ids[i, n + 1 :] = 1, rng.integers(4, vocab, n), 0
                ids[i, n + 1] = 2
            return {"input_ids": ids}

        out["text_encoder"] = Submodel(
            SubmodelSpec("text_encoder", inputs=[TensorSpec("input_ids", "int64", ("batch", L))],
                         outputs=[TensorSpec("last_hidden_state", "float32", ("batch", L, D))],
                         dims={"batch": (1, 2 * p.max_batch)}),
            TextEncoder(model.text_encoder), sample_te, [{"batch": 2}, {"batch": 1}],
        )

    if model.unet is not None:
        uc = model.unet_config
        C, Cout, D = uc["in_channels"], uc.get("out_channels", uc["in_channels"]), uc["cross_attention_dim"]
        L = model.text_max_length

        def sample_unet(dims, seed):
            rng = np.random.default_rng(seed)
            b = dims["batch"]
            return {
                "latents": rng.standard_normal((b, C, dims["frames"], dims["latent_height"], dims["latent_width"]), np.float32),
                "timestep": rng.integers(1, 1000, b).astype(np.float32),
                "encoder_hidden_states": rng.standard_normal((b, L, D), np.float32),
            }

        out["unet"] = Submodel(
            SubmodelSpec(
                "unet",
                inputs=[TensorSpec("latents", "float32", ("batch", C, "frames", "latent_height", "latent_width")),
                        TensorSpec("timestep", "float32", ("batch",)),
                        TensorSpec("encoder_hidden_states", "float32", ("batch", L, D))],
                outputs=[TensorSpec("noise_pred", "float32", ("batch", Cout, "frames", "latent_height", "latent_width"))],
                dims={"batch": (1, 2 * p.max_batch), "frames": frames, **sides},
                multiples={"latent_height": m, "latent_width": m} if m > 1 else {},
            ),
            Unet(model.unet), sample_unet,
            [{"batch": b0, "frames": f0, "latent_height": mid, "latent_width": mid},
             {"batch": b1, "frames": f1, "latent_height": other, "latent_width": mid}],
        )

    if model.vae is not None:
        C = model.vae_config["latent_channels"]

        def sample_vae(dims, seed):
            rng = np.random.default_rng(seed)
            return {"latents": rng.standard_normal((dims["batch"], C, dims["latent_height"], dims["latent_width"]), np.float32)}

        out["vae_decoder"] = Submodel(
            SubmodelSpec(
                "vae_decoder",
                inputs=[TensorSpec("latents", "float32", ("batch", C, "latent_height", "latent_width"))],
                outputs=[TensorSpec("image", "float32", ("batch", 3, "image_height", "image_width"))],
                dims={"batch": (1, p.decode_chunk), **sides,
                      "image_height": (lat[0] * f, lat[1] * f), "image_width": (lat[0] * f, lat[1] * f)},
            ),
            VaeDecoder(model.vae), sample_vae,
            [{"batch": 2, "latent_height": mid, "latent_width": mid},
             {"batch": 1, "latent_height": other, "latent_width": mid}],
        )
    if names is not None:
        out = {k: v for k, v in out.items() if k in names}
    return out
