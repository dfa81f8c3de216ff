"""Load the Stable Diffusion components separately, and build the tiny offline model.

`load_components` reads a hub id or a local diffusers folder through each component's own ``from_pretrained``,
so the tiny model (written as a normal diffusers folder) exercises exactly the code a real SD 1.5 model does.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import UsageError
from .world import MODEL_DIR as WORLD_MODEL_DIR, WORLD_NAME

# Sub-folders a Stable Diffusion (1.x / 2.x) diffusers folder must hold for training; SDXL adds its second text
# encoder and tokenizer.
REQUIRED_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_SUBFOLDERS = REQUIRED_SUBFOLDERS + ("text_encoder_2", "tokenizer_2")
TINY_NAME = "tiny"
FAMILIES = ("sd", "sdxl")  # SD 1.x / 2.x (one CLIP text encoder) and SDXL (two, plus micro-conditioning)


@dataclass
class Components:
    tokenizer: object
    noise_scheduler: object  # DDPMScheduler built from the model's scheduler config (keeps prediction_type)
    vae: torch.nn.Module
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    model_path: str  # local folder or hub id, as passed to from_pretrained
    # SDXL only: the second tokenizer and text encoder (CLIPTextModelWithProjection: gives the pooled embedding)
    tokenizer_2: object = None
    text_encoder_2: torch.nn.Module | None = None

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def family(self) -> str:
        """One of FAMILIES: what the precision policy and the conditioning depend on."""
        return "sdxl" if self.is_sdxl else "sd"

    @property
    def tokenizers(self) -> list:
        return [self.tokenizer] + ([self.tokenizer_2] if self.is_sdxl else [])

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """The base text-encoder modules (they hold the adapter layers when a text-encoder adapter is trained)."""
        return [self.text_encoder] + ([self.text_encoder_2] if self.is_sdxl else [])

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type


def encode_text(text_encoders: list, input_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids (one (N, 77) tensor per text encoder) -> (context, pooled): what the UNet is conditioned on.

    SD 1.x / 2.x: the last hidden states (N, 77, D) and no pooled embedding. SDXL: the penultimate hidden states of
    both encoders side by side (N, 77, D1 + D2), as SDXL was trained, and the second encoder's projected pooled
    embedding (N, P).
    """
    if len(text_encoders) == 1:
        return text_encoders[0](input_ids[0])[0], None
    states, pooled = [], None
    for encoder, ids in zip(text_encoders, input_ids):
        out = encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]  # of the last encoder (CLIPTextModelWithProjection): text_embeds, (N, P)
    return torch.cat(states, dim=-1), pooled


def added_conditioning(pooled: torch.Tensor | None, time_ids: torch.Tensor | None) -> dict | None:
    """The UNet's `added_cond_kwargs`: SDXL's pooled text embedding (N, P) and time ids (N, 6, moved beside the
    pooled embedding); None otherwise."""
    if pooled is None:
        return None
    return {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device, pooled.dtype)}


def cache_dir() -> Path:
    return Path(os.environ.get("PEFTBOOTH_CACHE", Path.home() / ".cache" / "peftbooth"))


def resolve_model(model: str) -> str:
    """'tiny' -> the cached tiny model folder (built on first use); 'world' -> the pretrained world model shipped
    with the package; a local folder is checked; else a hub id."""
    if model == TINY_NAME:
        path = cache_dir() / "tiny-sd"
        if not (path / "model_index.json").exists():
            build_tiny_model(path)
        return str(path)
    if model == WORLD_NAME:
        if not (WORLD_MODEL_DIR / "model_index.json").is_file():
            raise UsageError(f"--model world: the world model is missing from {WORLD_MODEL_DIR}; rebuild it with "
                             "'python -m peftbooth.world.build'")
        return str(WORLD_MODEL_DIR)
    if os.path.exists(model):
        check_model_folder(model)
        return model
    if looks_like_path(model):
        raise UsageError(f"--model {model}: no such folder")
    return model  # a hub id such as 'stable-diffusion-v1-5/stable-diffusion-v1-5'


def looks_like_path(name: str) -> bool:
    """A local path rather than an 'owner/name' hub id (which has exactly one slash and no leading dot or slash)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def check_vae_arg(vae: str | None) -> None:
    """--vae: a missing local folder, or a file, is refused before anything is loaded."""
    if vae and os.path.isfile(vae):
        raise UsageError(f"--vae {vae}: is a file; pass a diffusers AutoencoderKL folder (config.json + "
                         "diffusion_pytorch_model.safetensors) or hub id")
    if vae and not os.path.exists(vae) and looks_like_path(vae):
        raise UsageError(f"--vae {vae}: no such folder; pass an AutoencoderKL folder or hub id")


# The VAE's activations at full resolution dominate memory outside the UNet: a 512-px image's decoder holds
# (128, 512, 512) maps in several copies, about 640 MiB in half precision (benchmarks/memory_estimate.py). One
# call sees at most this many output pixels, so memory does not grow with --sample-batch-size: one image per call
# at 512 px and above, small images are not split (the world's 32-px ones go 256 to a call).
VAE_PIXELS_PER_CALL = 512 * 512


def vae_rows_per_call(height: int, width: int) -> int:
    """Images of height x width pixels one VAE call may take."""
    return max(1, VAE_PIXELS_PER_CALL // (height * width))


@contextlib.contextmanager
def vae_calls(vae: torch.nn.Module):
    """Every encode/decode of `vae` inside the block (a pipeline's included) runs in the VAE's own dtype, and in
    bounded chunks of images.

    Own dtype: the policy (precision.py) may keep the VAE in fp32 beside half-precision weights, where it would
    overflow; inputs are cast to it, and an fp32 VAE runs outside any autocast region (validation and the proxies
    run under the training autocast, which would run its convolutions in half precision anyway). Chunks: at most
    VAE_PIXELS_PER_CALL output pixels per call; below that the call is passed through unchanged.
    """
    from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
    from diffusers.models.modeling_outputs import AutoencoderKLOutput

    dtype = next(vae.parameters()).dtype
    factor = 2 ** (len(vae.config.block_out_channels) - 1)  # pixels per latent pixel, per side (8 for SD)
    originals = {name: getattr(vae, name) for name in ("encode", "decode")}

    def run(fn, x, scale, *args, **kwargs):
        with torch.autocast(x.device.type, enabled=False) if dtype == torch.float32 else contextlib.nullcontext():
            x = x.to(dtype)
            rows = vae_rows_per_call(x.shape[-2] * scale, x.shape[-1] * scale)
            if x.shape[0] <= rows:
                return fn(x, *args, **kwargs)
            return [fn(chunk, *args, **kwargs) for chunk in x.split(rows)]

    def encode(x, *args, return_dict: bool = True, **kwargs):  # x (N, 3, H, W)
        out = run(originals["encode"], x, 1, *args, return_dict=False, **kwargs)
        # one posterior over all rows: its parameters are (mean, logvar) side by side, (N, 2C, H/f, W/f)
        posterior = out[0] if isinstance(out, tuple) else DiagonalGaussianDistribution(
            torch.cat([part[0].parameters for part in out]))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(z, *args, return_dict: bool = True, **kwargs):  # z (N, C, H/f, W/f)
        out = run(originals["decode"], z, factor, *args, return_dict=False, **kwargs)
        sample = out[0] if isinstance(out, tuple) else torch.cat([part[0] for part in out])
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    vae.encode, vae.decode = encode, decode
    try:
        yield vae
    finally:
        for name in originals:
            delattr(vae, name)  # the class's methods show through again


def vae_force_upcast(vae: torch.nn.Module) -> bool:
    """diffusers' mark of a VAE that overflows in fp16 (default True, as in diffusers' AutoencoderKL)."""
    return bool(getattr(vae.config, "force_upcast", True))


def check_model_folder(path: str) -> None:
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"--model {path}: not a folder; pass a diffusers model folder or a hub id")
    has_index = (p / "model_index.json").is_file()
    needed = SDXL_SUBFOLDERS if has_index and family_of(read_model_index(path)) == "sdxl" else REQUIRED_SUBFOLDERS
    missing = [s for s in needed if not (p / s).is_dir()]
    if not has_index or missing:
        what = f"missing {', '.join(s + '/' for s in missing)}" if missing else "missing model_index.json"
        raise UsageError(f"--model {path}: not a diffusers Stable Diffusion folder ({what})")


def read_model_index(path: str, revision: str | None = None) -> dict:
    """model_index.json of a local folder or hub id (one small file: the family is known before any weights)."""
    local = Path(path) / "model_index.json"
    try:
        if local.is_file():
            return json.loads(local.read_text())
        from diffusers import DiffusionPipeline

        return dict(DiffusionPipeline.load_config(path, revision=revision))
    except (OSError, ValueError) as e:  # not found, offline, or not JSON
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--model {path}: could not read model_index.json ({first})") from e


def family_of(index: dict) -> str:
    """'sdxl' when the pipeline has a second text encoder, else 'sd' (1.x / 2.x); refiners are refused."""
    def present(name):
        value = index.get(name)
        return isinstance(value, list) and any(v is not None for v in value)

    if present("text_encoder_2"):
        if not present("text_encoder"):
            raise UsageError("--model: an SDXL refiner (no first text encoder) cannot be trained; use an SDXL base model")
        return "sdxl"
    return "sd"


def load_components(model: str, revision: str | None = None, variant: str | None = None,
                    vae: str | None = None) -> Components:
    """Tokenizer(s), training scheduler, VAE, UNet and text encoder(s), frozen; `vae` replaces the model's VAE
    (a folder or hub id holding one AutoencoderKL, e.g. an fp16-safe SDXL VAE)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = resolve_model(model)
    sdxl = family_of(read_model_index(path, revision)) == "sdxl"
    # use_safetensors: weights are never read from pickles (a model with only .bin files is refused)
    kw = dict(revision=revision)
    wkw = dict(revision=revision, variant=variant, use_safetensors=True)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
        # The training scheduler comes from the model's own config: prediction_type (epsilon or v_prediction),
        # beta schedule and timestep count are kept instead of being hard-coded.
        noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **wkw)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **wkw)
        tokenizer_2 = text_encoder_2 = None
        if sdxl:
            tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw)
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **wkw)
        if vae is None:
            vae_model = AutoencoderKL.from_pretrained(path, subfolder="vae", **wkw)
        else:
            vae_model = load_vae(vae)
    except OSError as e:  # hub id not found, offline, or a weights variant that is not there
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--model {model}: could not load ({first})") from e
    for m in (vae_model, unet, text_encoder, text_encoder_2):
        if m is not None:
            m.requires_grad_(False)
            m.eval()
    return Components(tokenizer, noise_scheduler, vae_model, unet, text_encoder, path, tokenizer_2, text_encoder_2)


def load_vae(vae: str):
    """--vae: an AutoencoderKL folder or hub id (its config.json at the top, or in a vae/ subfolder)."""
    from diffusers import AutoencoderKL

    check_vae_arg(vae)
    subfolder = "vae" if (Path(vae) / "vae" / "config.json").is_file() else None
    try:
        return AutoencoderKL.from_pretrained(vae, subfolder=subfolder, use_safetensors=True)
    except (OSError, ValueError, TypeError) as e:  # missing files, or the config of another kind of model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--vae {vae}: could not load an AutoencoderKL ({first[:200]})") from e


def vae_config_force_upcast(model: str, revision: str | None = None, vae: str | None = None) -> bool:
    """`force_upcast` of the VAE a pipeline of `model` (with `vae` replacing its own) will have, read from its
    config before any weights are loaded: the precision policy needs it to choose the VAE's dtype."""
    from diffusers import AutoencoderKL

    if vae is not None:
        subfolder = "vae" if (Path(vae) / "vae" / "config.json").is_file() else None
        config = AutoencoderKL.load_config(vae, subfolder=subfolder)
    else:
        config = AutoencoderKL.load_config(resolve_model(model), subfolder="vae", revision=revision)
    return bool(config.get("force_upcast", True))


def load_pipeline(model: str, revision: str | None = None, variant: str | None = None, torch_dtype=None,
                  vae: str | None = None, vae_dtype=None):
    """The full pipeline for generation: StableDiffusionPipeline (no safety checker) or, for an SDXL model,
    StableDiffusionXLPipeline (no watermarker). The class is chosen here from model_index.json, never by
    importing whatever class the file names. `torch_dtype`: the UNet's and text encoders'; `vae_dtype`: the
    VAE's, when the precision policy keeps it apart (it is loaded on its own then, never rounded to half first)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline

    path = resolve_model(model)
    extra = {}
    if vae is not None:
        extra["vae"] = load_vae(vae).to(vae_dtype or torch_dtype)
    elif vae_dtype is not None and vae_dtype != torch_dtype:
        extra["vae"] = AutoencoderKL.from_pretrained(path, subfolder="vae", revision=revision, variant=variant,
                                                     use_safetensors=True).to(vae_dtype)
    if family_of(read_model_index(path, revision)) == "sdxl":
        cls, extra = StableDiffusionXLPipeline, {**extra, "add_watermarker": False}
    else:
        cls, extra = StableDiffusionPipeline, {**extra, "safety_checker": None, "feature_extractor": None,
                                               "requires_safety_checker": False}
    try:
        with warnings.catch_warnings():
            # newer diffusers rename torch_dtype to dtype; the old name keeps older releases working
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            return cls.from_pretrained(path, revision=revision, variant=variant, torch_dtype=torch_dtype,
                                       use_safetensors=True, **extra)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--model {model}: could not load ({first})") from e


# ----------------------------------------------------------------------------------------------------------------
# The tiny model: SD 1.x layout, random weights, small enough to train on 2 CPU cores in seconds.


def _write_tokenizer(folder: Path) -> None:
    """A byte-level CLIP BPE vocabulary with no merges: every character is a token, words end with '</w>'."""
    from .world.tokenizer import byte_chars

    chars = byte_chars()  # each of the 256 bytes as a printable character (the GPT-2 / CLIP convention)
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>")
    tok.model_max_length = 77
    tok.save_pretrained(str(folder))  # tokenizer.json + config; vocab.json / merges.txt stay for slow tokenizers


# Component configs of the random models: 'tiny' for tests and the demo, 'sd15' with the shapes of SD 1.5
# (860M-parameter UNet) for benchmarks. Both use the SD 1.x layout and the locally written tokenizer.
SHAPES = {
    "tiny": dict(
        unet=dict(sample_size=32, block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16),
        vae=dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=16, sample_size=64),
        text=dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    ),
    # SD 2.x differences that matter to the code: linear (not 1x1 conv) transformer projections, per-block head
    # dims, a GELU text encoder; paired with a v-prediction scheduler it is a tiny SD 2.x 768-v.
    "tiny-sd2": dict(
        unet=dict(sample_size=32, block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=16),
        vae=dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=16, sample_size=64),
        text=dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  hidden_act="gelu"),
    ),
    # SDXL layout: no attention in the first block, several transformer layers per block, linear projections, a
    # UNet conditioned on the pooled text embedding and 6 micro-conditioning numbers ("text_time"), and two text
    # encoders whose penultimate states are concatenated (32 + 32 = cross_attention_dim 64).
    "tiny-sdxl": dict(
        unet=dict(sample_size=32, block_out_channels=(32, 64), layers_per_block=2,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                  transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
                  cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=16),
        vae=dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=16, sample_size=64,
                 scaling_factor=0.13025, force_upcast=True),
        text=dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4),
        text_2=dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                    hidden_act="gelu", projection_dim=32),
    ),
    "sd15": dict(
        unet=dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
        vae=dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=512, layers_per_block=2),
        text=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, hidden_act="quick_gelu"),
    ),
}


def random_components(shape: str = "tiny", prediction_type: str = "epsilon", seed: int = 0):
    """Randomly initialised SD components built from the configs in SHAPES: (unet, vae, text_encoder, scheduler,
    text_encoder_2), the last None except for SDXL shapes."""
    from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = SHAPES[shape]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **cfg["unet"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **cfg["vae"])
    ids = dict(max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513)
    text_encoder = CLIPTextModel(CLIPTextConfig(**ids, **cfg["text"]))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**ids, **cfg["text_2"])) if "text_2" in cfg else None
    # SDXL ships an Euler sampler config; training reads it as DDPM (same betas), as for any model
    sched_cls = EulerDiscreteScheduler if text_encoder_2 is not None else DDPMScheduler
    extra = {"timestep_spacing": "leading"} if text_encoder_2 is not None else {"clip_sample": False}
    scheduler = sched_cls(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type=prediction_type, steps_offset=1, **extra,
    )
    return unet, vae, text_encoder, scheduler, text_encoder_2


def build_tiny_model(path: str | Path, prediction_type: str = "epsilon", seed: int = 0, shape: str = "tiny") -> Path:
    """Write a random SD pipeline folder (tiny by default) at `path` atomically: built in a temp folder, renamed."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    from .rundir import atomic_dir

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the tokenizer files are staged beside it, the model is written in a hidden folder and renamed into place
    with tempfile.TemporaryDirectory(prefix=".tiny-", dir=path.parent) as work, atomic_dir(path) as model:
        tmp = Path(work)
        unet, vae, text_encoder, scheduler, text_encoder_2 = random_components(shape, prediction_type, seed)
        _write_tokenizer(tmp / "_tok")
        tokenizer = CLIPTokenizer.from_pretrained(str(tmp / "_tok"))
        tokenizer.model_max_length = 77
        if text_encoder_2 is None:
            pipe = StableDiffusionPipeline(
                vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
        else:
            # SDXL's second tokenizer pads with '!' (id 0) instead of the end token, as the real one does
            tokenizer_2 = CLIPTokenizer.from_pretrained(str(tmp / "_tok"), pad_token="!")
            tokenizer_2.model_max_length = 77
            pipe = StableDiffusionXLPipeline(
                vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False,
            )
        pipe.save_pretrained(str(model), safe_serialization=True)
        for folder in ("tokenizer", "tokenizer_2") if text_encoder_2 is not None else ("tokenizer",):
            for name in ("vocab.json", "merges.txt"):
                shutil.copy(tmp / "_tok" / name, model / folder / name)
    return path
