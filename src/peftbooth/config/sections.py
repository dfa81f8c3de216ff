"""Typed configuration of a training run: the one source of truth for CLI flags, ``--config`` YAML files and the saved
``config.yaml``.

Every field of a section dataclass becomes one kebab-case flag (``instance_data_dir`` -> ``--instance-data-dir``);
the text-encoder adapter section reuses :class:`AdapterArgs` with the flag prefix ``--text-encoder-``. The one-line
``help`` in each field's metadata is the flag's help text. ``checks.validate`` collects every problem and raises
once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

ADAPTER_TYPES = ("lora", "loha", "lokr")
UNET_PRESETS = ("attn", "attn-ff", "all")
TEXT_ENCODER_PRESETS = ("attn", "attn-mlp")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear")
MIXED_PRECISION = ("no", "fp16", "bf16")
PRIOR_MODES = ("class-images", "base-prediction")
WEIGHTING_SCHEMES = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")  # SD3 flow matching (training/flow.py)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's own
MODEL_REQUIRED = ("--model is required: a hub id, a local diffusers folder, 'world' (the small pretrained world "
                  "model, docs/world.md) or 'tiny' (a tiny random model for trying things out)")


class UsageError(Exception):
    """Bad input from the user: the CLI prints the message on one line and exits with code 2."""


def accelerate_mixed_precision(environ=None) -> str:
    """The precision Accelerate was configured with, for a run whose --mixed-precision is not given.

    `accelerate launch` passes its config file's `mixed_precision` (or its own --mixed_precision flag) to the
    processes as ACCELERATE_MIXED_PRECISION; a plain `peftbooth train` may have it set by hand. Unset: "no".
    """
    import os

    value = (os.environ if environ is None else environ).get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()
    if value not in MIXED_PRECISION:
        raise UsageError(f"ACCELERATE_MIXED_PRECISION={value}: not one of {', '.join(MIXED_PRECISION)}; fix the "
                         "Accelerate config or environment, or pass --mixed-precision")
    return value


def option(default, help: str, **kw):
    """A dataclass field with its one-line help text (shown by ``--help``); `kw` is more metadata for the flag
    (choices; and for the other commands' options, see peftbooth.config.flags: positional, required, aliases, ...)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})
_f = option  # the short name the sections below use


@dataclass
class ModelArgs:
    model: Optional[str] = _f(None, "base model (required): hub id or local diffusers folder; 'world' is the small "
                              "pretrained world model (docs/world.md); 'tiny' builds a tiny random SD model")
    revision: Optional[str] = _f(None, "hub revision (branch, tag or commit) of --model")
    variant: Optional[str] = _f(None, "weights variant of --model, e.g. 'fp16'")
    vae: Optional[str] = _f(None, "replacement VAE (hub id or folder), e.g. an fp16-safe SDXL VAE "
                        "'madebyollin/sdxl-vae-fp16-fix'")
    upcast_vae: Optional[bool] = _f(None, "run the VAE in fp32 beside half-precision weights (default: where an "
                                    "SDXL VAE's config has force_upcast, as SDXL's own: it overflows in fp16)")
    t5: bool = _f(True, "SD3: load the T5 text encoder (--no-t5: leave it out, its states are zeros as in the "
                  "pipeline without it; saves SD 3.5's 4.7B T5 parameters)")
    max_sequence_length: int = _f(77, "SD3: T5 tokens per prompt (the reference DreamBooth script's 77; up to 512)")


@dataclass
class AdapterArgs:
    """One adapter (UNet or text encoder). ``None`` fields of the text-encoder adapter inherit the UNet's value."""

    adapter: Optional[str] = _f(None, "adapter type: lora | loha | lokr", choices=ADAPTER_TYPES)
    rank: Optional[int] = _f(None, "adapter rank r")
    alpha: Optional[float] = _f(None, "adapter alpha (scale = alpha / rank); defaults to the rank")
    dropout: Optional[float] = _f(None, "LoRA dropout, or LoHa/LoKr rank dropout")
    module_dropout: Optional[float] = _f(None, "LoHa/LoKr: probability of dropping a whole module's update")
    target_modules: Optional[str] = _f(
        None,
        "preset (UNet: attn | attn-ff | all; text encoder: attn | attn-mlp) or a comma-separated list of module names",
    )
    use_dora: Optional[bool] = _f(None, "LoRA: weight-decomposed LoRA (DoRA)")
    use_rslora: Optional[bool] = _f(None, "LoRA: rank-stabilised scaling alpha / sqrt(rank)")
    use_effective_conv2d: Optional[bool] = _f(None, "LoHa/LoKr: effective Conv2d decomposition for k>1 convs")
    decompose_both: Optional[bool] = _f(None, "LoKr: also decompose the left Kronecker factor")
    decompose_factor: Optional[int] = _f(None, "LoKr: Kronecker factor size (-1 = automatic)")


# Defaults applied to the UNet adapter's None fields; the text-encoder adapter then inherits from the UNet's.
UNET_ADAPTER_DEFAULTS = dict(
    adapter="lora",
    rank=4,
    alpha=None,  # resolved to the rank
    dropout=0.0,
    module_dropout=0.0,
    target_modules="attn",
    use_dora=False,
    use_rslora=False,
    use_effective_conv2d=False,
    decompose_both=False,
    decompose_factor=-1,
)


# Options that only mean something for some adapter types: the text-encoder adapter inherits them from the UNet's
# only when both adapters are of the same type.
TYPE_SPECIFIC_OPTIONS = ("module_dropout", "use_dora", "use_rslora", "use_effective_conv2d", "decompose_both",
                         "decompose_factor")


@dataclass
class DataArgs:
    instance_data_dir: Optional[str] = _f(None, "folder of 3-10 photos of the subject (jpg, jpeg, png, webp)")
    instance_prompt: Optional[str] = _f(None, "prompt with the identifier, e.g. 'a photo of sks dog'")
    resolution: int = _f(512, "training resolution in pixels (multiple of 8)")
    center_crop: bool = _f(True, "center crop after resizing (--no-center-crop: random crop)")
    random_flip: bool = _f(False, "random horizontal flip of training images")
    with_prior_preservation: bool = _f(False, "add the class-prior loss on images generated by the base model")
    class_prompt: Optional[str] = _f(None, "prompt of the class, e.g. 'a photo of a dog'")
    class_data_dir: Optional[str] = _f(None, "folder of class images (missing ones are generated); default OUTPUT/class_images")
    num_class_images: int = _f(100, "number of class images for prior preservation")
    class_prompt_from_captions: bool = _f(False, "draw the class images from the photos' captions (NAME.txt) with "
                                          "the identifier taken out, each captioned so, instead of from "
                                          "--class-prompt alone: they differ from the photos only in the identifier "
                                          "(docs/training.md)")
    prior_loss_weight: float = _f(1.0, "weight of the class-prior loss")
    prior_mode: str = _f("class-images", "with --with-prior-preservation: class-images: class rows are images the "
                         "base model drew for --class-prompt (the paper's way); base-prediction: class rows are the "
                         "photos under --class-prompt, their target the base model's own prediction (adapters off; "
                         "no class images to make)", choices=PRIOR_MODES)
    class_prompt_dropout: float = _f(0.0, "share of class-image rows trained on the empty prompt instead of "
                                     "--class-prompt: keeps the unguided prediction, classifier-free guidance's "
                                     "reference, the base model's (e.g. 0.5; docs/training.md)")
    masked_loss: bool = _f(False, "learn only where each photo's mask (NAME.mask.png beside it, white = the "
                           "subject) is: the photos' backgrounds are not learned (docs/training.md)")
    unmasked_weight: float = _f(0.0, "with --masked-loss: the loss weight of the pixels outside the mask (0: none; "
                                "e.g. 0.1 keeps a little of the backgrounds)")
    sample_batch_size: int = _f(4, "batch size when generating class images")
    class_image_steps: int = _f(25, "denoising steps per class image (DPM-Solver++)")
    train_batch_size: int = _f(1, "instance images per step (as many class images are added)")
    dataloader_num_workers: int = _f(0, "data-loader worker processes")


@dataclass
class TrainArgs:
    output_dir: Optional[str] = _f(None, "run folder: adapters, config.yaml, README.md, logs")
    overwrite: bool = _f(False, "replace a finished run in --output-dir")
    seed: int = _f(0, "random seed")
    max_train_steps: int = _f(400, "optimizer steps")
    learning_rate: float = _f(1e-4, "learning rate of the UNet adapter")
    text_encoder_learning_rate: Optional[float] = _f(None, "learning rate of the text-encoder adapter (default: --learning-rate)")
    lr_scheduler: str = _f("constant", "learning-rate schedule", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = _f(0, "linear warm-up steps of the schedule")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_weight_decay: float = _f(1e-2, "AdamW weight decay")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    use_8bit_adam: bool = _f(False, "8-bit AdamW from bitsandbytes (must be installed)")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    low_memory: bool = _f(False, "the low-memory preset: --gradient-checkpointing, --mixed-precision bf16, batch "
                          "size 1, caches on, --sample-batch-size 1 (peftbooth.training.memory.LOW_MEMORY); settings given "
                          "explicitly (flags, --config) win")
    memory_check: bool = _f(True, "on a GPU, refuse to start when the estimated peak memory exceeds the free memory "
                            "(--no-memory-check: start anyway)")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)")
    snr_gamma: Optional[float] = _f(None, "Min-SNR loss weighting with this gamma (5.0 is common); off when unset; "
                                    "SD 1.x / 2.x / SDXL")
    weighting_scheme: str = _f("logit_normal", "SD3 flow matching: how training timesteps are drawn and weighted "
                               "(logit_normal and mode draw; sigma_sqrt and cosmap weight; none: uniform, "
                               "unweighted)", choices=WEIGHTING_SCHEMES)
    logit_mean: float = _f(0.0, "SD3, --weighting-scheme logit_normal: mean of the logit")
    logit_std: float = _f(1.0, "SD3, --weighting-scheme logit_normal: std of the logit")
    mode_scale: float = _f(1.29, "SD3, --weighting-scheme mode: its scale")
    precondition_outputs: bool = _f(True, "SD3: train the preconditioned output (x0 = noisy - sigma * prediction) "
                                    "against the latents, as the reference script; --no-precondition-outputs: the "
                                    "velocity (noise - latents)")
    target_blocks: Optional[str] = _f(None, "SD3: adapt only these transformer blocks, e.g. '0-11' or '0,1,2' "
                                      "(docs/sd3.md); default: all")
    noise_offset: float = _f(0.0, "offset-noise strength (e.g. 0.05): lets the model learn very dark/bright images")
    ema_decay: float = _f(0.0, "save (and validate) a moving average of the adapter weights over about the last "
                          "1/(1-D) steps instead of the last step's, e.g. 0.99; 0: off")
    mixed_precision: Optional[str] = _f(None, "compute precision of the frozen weights (default: Accelerate's, "
                                        "from `accelerate launch` or ACCELERATE_MIXED_PRECISION, else no)",
                                        choices=MIXED_PRECISION)
    train_text_encoder: bool = _f(False, "also train an adapter on the CLIP text encoder")
    train_token_embedding: Optional[str] = _f(None, "also train this identifier word's input embedding, e.g. sks "
                                              "(pivotal tuning); one token, in --instance-prompt, with "
                                              "--train-text-encoder")
    token_embedding_learning_rate: Optional[float] = _f(None, "learning rate of the identifier's embedding "
                                                        "(default: the text encoder's)")
    cache_latents: bool = _f(True, "VAE-encode each image (and its flip) once instead of every step; off with random crops")
    cache_text_states: bool = _f(True, "encode each prompt once when the text encoder is frozen")
    factored_lycoris: bool = _f(True, "LoHa/LoKr: apply each update through its factors instead of rebuilding the "
                                "full delta weight every step (the same maths, a fraction of the compute)")
    compile: bool = _f(False, "torch.compile the UNet (falls back to eager with a warning where unavailable)")
    compile_mode: str = _f("default", "torch.compile mode with --compile: reduce-overhead and max-autotune also "
                           "replay the step as CUDA graphs (GPU only)", choices=COMPILE_MODES)
    channels_last: bool = _f(False, "keep the UNet's convolution weights and input in channels-last (NHWC) layout; "
                             "off by default until measured on a GPU (see BENCHMARKS.md)")
    logging_steps: int = _f(10, "log loss and lr every N steps (a host sync each time)")
    checkpointing_steps: int = _f(0, "write a resumable checkpoint every N steps (0: only when interrupted)")
    checkpoints_total_limit: int = _f(0, "keep only the newest K checkpoints (0: keep all)")
    resume: Optional[str] = _f(None, "resume from 'latest' (newest checkpoint in --output-dir) or a checkpoint folder")
    resume_force: bool = _f(False, "resume even if the checkpoint was made with a different config or photos")
    nan_policy: str = _f("stop", "on a NaN/inf loss: stop (keeping the last good checkpoint) or skip-step "
                         "(one host sync per step)", choices=("stop", "skip-step"))
    validation_prompt: list[str] = _f([], "prompt to sample during training (repeatable); none: no validation")
    validation_steps: int = _f(100, "sample the validation prompts every N steps (and before training)")
    num_validation_images: int = _f(2, "images per validation prompt (fixed seeds, comparable across steps)")
    push_to_hub: Optional[str] = _f(None, "upload the finished run to this Hub repo (user/name); token from HF_TOKEN or login")
    report_to: str = _f("tensorboard", "tracker for loss/lr logs: tensorboard | none", choices=("tensorboard", "none"))


@dataclass
class TrainConfig:
    """Everything `peftbooth train` needs. YAML files use the section names as top-level keys."""

    model: ModelArgs = field(default_factory=ModelArgs)
    unet_adapter: AdapterArgs = field(default_factory=AdapterArgs)
    text_encoder_adapter: AdapterArgs = field(default_factory=AdapterArgs)
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)

    def resolved(self) -> "TrainConfig":
        """Fill the adapters' inherited fields: UNet None -> defaults, text encoder None -> UNet's value."""
        cfg = dataclasses.replace(self)
        unet = dataclasses.replace(self.unet_adapter)
        for name, default in UNET_ADAPTER_DEFAULTS.items():
            if getattr(unet, name) is None:
                setattr(unet, name, default)
        if unet.alpha is None:
            unet.alpha = float(unet.rank)
        te = dataclasses.replace(self.text_encoder_adapter)
        if te.adapter is None:
            te.adapter = unet.adapter
        for name in UNET_ADAPTER_DEFAULTS:
            if getattr(te, name) is None:
                if name == "target_modules":
                    # module names differ in the text encoder: its default preset is 'attn' too
                    value = "attn"
                elif name in TYPE_SPECIFIC_OPTIONS and te.adapter != unet.adapter:
                    # e.g. the UNet's --use-dora must not leak into a LoHa text-encoder adapter
                    value = UNET_ADAPTER_DEFAULTS[name]
                else:
                    value = getattr(unet, name)
                setattr(te, name, value)
        if self.text_encoder_adapter.alpha is None:
            te.alpha = float(te.rank)  # alpha follows the text encoder's own rank, not the UNet's alpha
        cfg.unet_adapter, cfg.text_encoder_adapter = unet, te
        if self.train.mixed_precision is None:  # the saved config.yaml records the precision the run used
            cfg.train = dataclasses.replace(self.train, mixed_precision=accelerate_mixed_precision())
        return cfg
