"""The options of every subcommand besides `train` (whose options are config/sections.py's dataclasses) and `eval` (whose
options are :class:`peftbooth.evaluate.runner.EvalArgs`), as dataclasses: one field per flag (see :mod:`peftbooth.config.flags`).

One naming scheme across commands, the one `train` set: a folder written is ``--output-dir``, denoising steps are
``--num-inference-steps`` (``--class-image-steps`` in train), optimizer steps ``--max-train-steps``, the base model
``--model`` (default: the one the run records). Old spellings are ``aliases``: accepted for a release, and named
as such in ``--help``. `export` keeps ``--output``: it names a file (or a folder to put the file in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .sections import option

EXPORT_FORMATS = ("diffusers", "kohya", "peft")
TINY_KINDS = ("sd1", "sd2-v", "sdxl", "sd3", "sd3.5")
PREDICTION_TYPES = ("epsilon", "v_prediction")

RUN_DIR_HELP = "run folder written by 'peftbooth train'"
MODEL_HELP = "base model: hub id, diffusers folder, 'world' or 'tiny' (default: the one the run records in its config.yaml)"
OVERWRITE_HELP = "replace an existing output"


@dataclass
class GenerateOptions:
    prompt: Optional[str] = option(None, "the prompt", required=True)
    output_dir: Optional[str] = option(None, "folder for the images and grid.png", required=True)
    adapter: list[str] = option([], "a run folder (unet/ and optional text_encoder/, text_encoder_2/ adapter "
                                "folders); repeatable", metavar="[NAME=]DIR")
    mix: list[str] = option([], "generate with a weighted mix", nargs="+", metavar="NAME=WEIGHT")
    model: Optional[str] = option(None, "base model: hub id, diffusers folder, or 'tiny' (default: the one the "
                                  "--adapter runs record in their config.yaml)")
    revision: Optional[str] = option(None, "hub revision (branch, tag or commit) of --model")
    variant: Optional[str] = option(None, "weights variant of --model, e.g. 'fp16'")
    vae: Optional[str] = option(None, "replacement VAE (hub id or folder), e.g. an fp16-safe SDXL VAE")
    negative_prompt: Optional[str] = option(None, "what the images should not show")
    num_images: int = option(4, "images per adapter (or per mix)")
    seed: int = option(0, "random seed (the same for every adapter)")
    num_inference_steps: int = option(25, "denoising steps", aliases=("--steps",))
    guidance_scale: float = option(7.5, "classifier-free guidance scale")
    guidance_cutoff: float = option(1.0, "the share of the denoising steps that are guided, from the first; the rest "
                                    "are unguided and cost half (1.0: all)")
    height: Optional[int] = option(None, "image height in pixels (default: the model's)")
    width: Optional[int] = option(None, "image width in pixels (default: the model's)")
    include_base: bool = option(False, "also generate with the base model alone")
    overwrite: bool = option(False, "replace images already in --output-dir")
    t5: Optional[bool] = option(None, "SD3: load T5 (--no-t5: zeros in its place; default: as the --adapter runs "
                                "were trained, else loaded)")
    max_sequence_length: Optional[int] = option(None, "SD3: T5 tokens per prompt (default: the --adapter runs', "
                                                "else 77)")


@dataclass
class ExportOptions:
    run_dir: str = option(None, RUN_DIR_HELP, positional=True, metavar="RUN_DIR")
    format: Optional[str] = option(None, "diffusers: pytorch_lora_weights.safetensors for load_lora_weights (LoRA "
                                   "only); kohya: one LyCORIS-style .safetensors (LoRA, LoHa, LoKr); peft: the "
                                   "adapter folders", choices=EXPORT_FORMATS, required=True)
    output: Optional[str] = option(None, "a .safetensors file, or a folder to write it into (peft: the output "
                                   "folder)", required=True, metavar="PATH")
    overwrite: bool = option(False, OVERWRITE_HELP)


@dataclass
class ImportOptions:
    file: str = option(None, "kohya / LyCORIS .safetensors (LoRA, LoHa, LoKr)", positional=True, metavar="FILE")
    output_dir: Optional[str] = option(None, "folder for unet/, text_encoder/ and (SDXL) text_encoder_2/",
                                       required=True, metavar="DIR", aliases=("--output",))
    model: Optional[str] = option(None, "base model the file is for (diffusers folder, hub id or 'tiny'); default: "
                                  "the published SD 1.x / 2.x / SDXL layout, picked from the file")
    overwrite: bool = option(False, OVERWRITE_HELP)


@dataclass
class FuseOptions:
    run_dir: str = option(None, RUN_DIR_HELP, positional=True, metavar="RUN_DIR")
    output_dir: Optional[str] = option(None, "folder for the fused diffusers pipeline", required=True,
                                       metavar="DIR", aliases=("--output",))
    model: Optional[str] = option(None, MODEL_HELP)
    vae: Optional[str] = option(None, "VAE for the fused folder (hub id or folder); default: the run's --vae from "
                                "RUN_DIR/config.yaml, else the base model's")
    scale: float = option(1.0, "adapter strength merged in (1.0 = as trained)")
    overwrite: bool = option(False, OVERWRITE_HELP)


@dataclass
class PushOptions:
    run_dir: str = option(None, RUN_DIR_HELP, positional=True, metavar="RUN_DIR")
    repo_id: str = option(None, "user/name", positional=True, metavar="REPO_ID")
    private: bool = option(False, "create the repo as private")
    dry_run: bool = option(False, "list the files that would be uploaded and exit")
    output_dir: Optional[str] = option(None, "write the repo's files into DIR (a new folder) instead of uploading "
                                       "them", metavar="DIR", aliases=("--output",))


@dataclass
class TinyModelOptions:
    dir: str = option(None, "the new model folder", positional=True, metavar="DIR")
    kind: str = option("sd1", "sd1: SD 1.x layout; sd2-v: SD 2.x layout with v-prediction; sdxl: SDXL layout (two "
                       "text encoders, micro-conditioning; 64 px images); sd3 / sd3.5: SD3's MMDiT with flow "
                       "matching, two CLIPs and T5 (sd3.5: with attn2 and qk-norm)", choices=TINY_KINDS)
    prediction_type: str = option("epsilon", "scheduler prediction type of --kind sd1 and sdxl (SD3 is flow "
                                  "matching)",
                                  choices=PREDICTION_TYPES)
    seed: int = option(0, "seed of the random weights")


@dataclass
class DemoOptions:
    output_dir: str = option("demo-output", "folder for the runs and the comparison")
    adapters: str = option("lora", "the adapters to train, comma-separated from lora, loha, lokr (the default fits "
                           "90 s on 2 cores; each more adds about a minute)")
    max_train_steps: Optional[int] = option(None, "training steps per adapter (default: 1000, the fewest at which "
                                            "the world's test subjects are learned; the recipe trains 1500)",
                                            aliases=("--steps",))
    subject: str = option("box-band-brown-mint", "the subject of the world's family to learn, e.g. "
                          "tent-dot-cyan-lime or ball-halves-magenta-cyan (docs/world.md)")


@dataclass
class UiOptions:
    runs_dir: str = option("runs", "folder of run folders")
    host: str = option("127.0.0.1", "address to listen on; anything but 127.0.0.1/localhost needs "
                       "PEFTBOOTH_UI_TOKEN set")
    port: int = option(7860, "port (0: a free one)")
    allow_dir: list[str] = option([], "a folder of photos the page may read besides the runs folder (repeatable)",
                                  metavar="DIR")
