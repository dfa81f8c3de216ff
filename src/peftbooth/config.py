"""Typed configuration: the one source of truth for CLI flags, ``--config`` YAML files and the saved ``config.yaml``.

Every field of a section dataclass becomes one kebab-case flag (``instance_data_dir`` -> ``--instance-data-dir``);
the text-encoder adapter section reuses :class:`AdapterArgs` with the flag prefix ``--text-encoder-``. The one-line
``help`` in each field's metadata is the flag's help text. ``validate`` collects every problem and raises once.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Optional

ADAPTER_TYPES = ("lora", "loha", "lokr")
UNET_PRESETS = ("attn", "attn-ff", "all")
TEXT_ENCODER_PRESETS = ("attn", "attn-mlp")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear")
MIXED_PRECISION = ("no", "fp16", "bf16")
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
    (choices; and for the other commands' options, see peftbooth.flags: positional, required, aliases, ...)."""
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
    prior_loss_weight: float = _f(1.0, "weight of the class-prior loss")
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
                          "size 1, caches on, --sample-batch-size 1 (peftbooth.memory.LOW_MEMORY); settings given "
                          "explicitly (flags, --config) win")
    memory_check: bool = _f(True, "on a GPU, refuse to start when the estimated peak memory exceeds the free memory "
                            "(--no-memory-check: start anyway)")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)")
    snr_gamma: Optional[float] = _f(None, "Min-SNR loss weighting with this gamma (5.0 is common); off when unset")
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


# Ranges of the numeric options, checked before any work: (low, high) with None for no bound; a float low bound
# listed in OPEN_LOW is exclusive. The upper bounds are far past any real use but keep a typo (--resolution
# 1000000) from hanging a run for minutes before it fails. Every float must also be finite (argparse takes 'nan').
MAX_STEPS = 10_000_000
RANGES = {
    "data": dict(num_class_images=(1, 1_000_000), prior_loss_weight=(0.0, None), class_prompt_dropout=(0.0, 1.0),
                 unmasked_weight=(0.0, 1.0), sample_batch_size=(1, 1024), class_image_steps=(1, 1000),
                 train_batch_size=(1, 1024), dataloader_num_workers=(0, 256)),
    "train": dict(seed=(0, 2**32 - 1), max_train_steps=(1, MAX_STEPS), learning_rate=(0.0, 1.0),
                  text_encoder_learning_rate=(0.0, 1.0), token_embedding_learning_rate=(0.0, 1.0),
                  lr_warmup_steps=(0, MAX_STEPS), adam_beta1=(0.0, 1.0),
                  adam_beta2=(0.0, 1.0), adam_weight_decay=(0.0, None), adam_epsilon=(0.0, 1.0),
                  gradient_accumulation_steps=(1, 1024), max_grad_norm=(0.0, None), snr_gamma=(0.0, None),
                  noise_offset=(0.0, 1.0), ema_decay=(0.0, 1.0), logging_steps=(1, MAX_STEPS),
                  checkpointing_steps=(0, MAX_STEPS),
                  checkpoints_total_limit=(0, None), validation_steps=(1, MAX_STEPS), num_validation_images=(1, 64)),
    "adapter": dict(rank=(1, 4096), alpha=(0.0, None), dropout=(0.0, 1.0), module_dropout=(0.0, 1.0)),
}
OPEN_LOW = {"learning_rate", "text_encoder_learning_rate", "token_embedding_learning_rate", "adam_epsilon",
            "snr_gamma", "alpha"}
OPEN_HIGH = {"adam_beta1", "adam_beta2", "dropout", "module_dropout", "ema_decay"}  # [0, 1)
MAX_RESOLUTION = 4096


def range_problem(flag: str, name: str, value, low, high) -> str | None:
    """The problem with one numeric option's value, or None."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{flag} must be a finite number (got {value})"
    if low is not None and (value <= low if name in OPEN_LOW else value < low):
        return f"{flag} must be {'>' if name in OPEN_LOW else '>='} {low:g} (got {value})"
    if high is not None and (value >= high if name in OPEN_HIGH else value > high):
        bound = high if isinstance(high, int) else f"{high:g}"
        return f"{flag} must be {'<' if name in OPEN_HIGH else '<='} {bound} (got {value})"
    return None


def token_embedding_problems(t: TrainArgs, instance_prompt: str | None) -> list[str]:
    """--train-token-embedding WORD: trained through the text encoder, and the word must be in the prompt."""
    word, problems = t.train_token_embedding, []
    if not word or not word.strip() or len(word.split()) != 1:
        return [f"--train-token-embedding must be one word, the identifier of --instance-prompt (got {word!r})"]
    if not t.train_text_encoder:
        problems.append("--train-token-embedding needs --train-text-encoder (the embedding is trained through the "
                        "text encoder, as its adapter is)")
    if instance_prompt and re.search(rf"(?<!\w){re.escape(word)}(?!\w)", instance_prompt) is None:
        problems.append(f"--train-token-embedding {word}: the word is not in --instance-prompt {instance_prompt!r}")
    return problems


def number_problems(cfg: "TrainConfig") -> list[str]:
    """Every numeric option finite and in its range (RANGES), each problem naming its flag."""
    problems = []
    res = cfg.data.resolution
    if isinstance(res, int) and not (8 <= res <= MAX_RESOLUTION and res % 8 == 0):
        problems.append(f"--resolution must be a multiple of 8 from 8 to {MAX_RESOLUTION} (got {res})")
    for section, (cls, prefix) in SECTIONS.items():
        if section == "text_encoder_adapter" and not cfg.train.train_text_encoder:
            continue
        ranges = RANGES["adapter" if cls is AdapterArgs else section] if section != "model" else {}
        obj = getattr(cfg, section)
        for f in dataclasses.fields(cls):
            if f.name == "num_class_images" and not cfg.data.with_prior_preservation:
                continue
            low, high = ranges.get(f.name, (None, None))
            problem = range_problem("--" + prefix + f.name.replace("_", "-"), f.name, getattr(obj, f.name), low, high)
            if problem:
                problems.append(problem)
    df = cfg.unet_adapter.decompose_factor
    if isinstance(df, int) and df != -1 and df < 1:
        problems.append(f"--decompose-factor must be -1 (automatic) or >= 1 (got {df})")
    return problems


def adapter_problems(a: AdapterArgs, prefix: str, presets: tuple[str, ...]) -> list[str]:
    problems = []
    if a.adapter not in ADAPTER_TYPES:
        problems.append(f"{prefix}adapter must be one of {', '.join(ADAPTER_TYPES)} (got {a.adapter!r})")
    if a.rank is None:
        problems.append(f"{prefix}rank must be >= 1 (got None)")
    tm = (a.target_modules or "").strip()
    if not tm:
        problems.append(f"{prefix}target-modules is empty: use a preset ({' | '.join(presets)}) or module names")
    elif tm not in presets and "-" in tm:
        # module names never hold a dash, preset names do: this is a mistyped preset such as 'attn-f'
        problems.append(f"{prefix}target-modules: unknown preset {tm!r}; presets are {' | '.join(presets)}")
    if a.adapter != "lora" and (a.use_dora or a.use_rslora):
        problems.append(f"{prefix}use-dora / {prefix}use-rslora apply to lora only (adapter is {a.adapter})")
    return problems



def validate(cfg: "TrainConfig") -> None:
    """Raise one UsageError listing every problem of a resolved config, each naming its flag."""
    problems = []
    d, t = cfg.data, cfg.train
    if not cfg.model.model:
        problems.append(MODEL_REQUIRED)
    if not d.instance_data_dir:
        problems.append("--instance-data-dir is required: a folder of photos of the subject")
    if not d.instance_prompt:
        problems.append("--instance-prompt is required, e.g. 'a photo of sks dog'")
    if not t.output_dir:
        problems.append("--output-dir is required: where the adapters are written")
    problems += number_problems(cfg)
    if d.with_prior_preservation and not d.class_prompt:
        problems.append("--with-prior-preservation needs --class-prompt, e.g. 'a photo of a dog'")
    if d.class_prompt_dropout and not d.with_prior_preservation:
        problems.append("--class-prompt-dropout needs --with-prior-preservation "
                        "(it drops the class images' prompt)")
    if d.unmasked_weight and not d.masked_loss:
        problems.append("--unmasked-weight needs --masked-loss (it weights the pixels outside the masks)")
    if t.train_token_embedding is not None:
        problems += token_embedding_problems(t, d.instance_prompt)
    if t.compile_mode != "default" and not t.compile:
        problems.append(f"--compile-mode {t.compile_mode} needs --compile")
    for prefix, adapter, presets in [
        ("--", cfg.unet_adapter, UNET_PRESETS),
        ("--text-encoder-", cfg.text_encoder_adapter, TEXT_ENCODER_PRESETS),
    ]:
        if prefix == "--text-encoder-" and not t.train_text_encoder:
            continue
        problems += adapter_problems(adapter, prefix, presets)
    if problems:
        raise UsageError("; ".join(problems))


SECTIONS: dict[str, tuple[type, str]] = {
    # section name -> (dataclass, flag prefix)
    "model": (ModelArgs, ""),
    "unet_adapter": (AdapterArgs, ""),
    "text_encoder_adapter": (AdapterArgs, "text-encoder-"),
    "data": (DataArgs, ""),
    "train": (TrainArgs, ""),
}


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict, source: str = "config") -> TrainConfig:
    """Build a TrainConfig from nested dicts, refusing unknown keys and wrong types (naming them)."""
    if not isinstance(data, dict):
        raise UsageError(f"{source}: expected a mapping of sections {', '.join(SECTIONS)}")
    unknown = [k for k in data if k not in SECTIONS]
    if unknown:
        raise UsageError(f"{source}: unknown section {unknown[0]!r}; sections are {', '.join(SECTIONS)}")
    cfg = TrainConfig()
    for section, values in data.items():
        cls, _ = SECTIONS[section]
        if values is None:
            continue
        if not isinstance(values, dict):
            raise UsageError(f"{source}: section {section!r} must be a mapping")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        obj = getattr(cfg, section)
        for key, value in values.items():
            if key not in fields:
                raise UsageError(f"{source}: unknown key {section}.{key}")
            setattr(obj, key, coerce(value, fields[key], f"{source}: {section}.{key}"))
    return cfg


def field_type(f: dataclasses.Field) -> tuple[type, bool]:
    """(base type, optional) of a field whose annotation is a string such as 'Optional[int]'.

    'list[str]' gives (str, False): use `is_list` to tell lists (repeatable flags, YAML lists) apart.
    """
    ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    optional = ann.startswith("Optional[")
    base = ann[len("Optional[") : -1] if optional else ann
    base = base[len("list[") : -1] if base.startswith("list[") else base
    return {"str": str, "int": int, "float": float, "bool": bool}[base], optional


def is_list(f: dataclasses.Field) -> bool:
    return str(f.type).startswith("list[")


def coerce(value, f: dataclasses.Field, where: str):
    """Check a YAML value against the field's type (ints are accepted for floats), naming the key on error."""
    typ, optional = field_type(f)
    if is_list(f):
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, typ) for v in value):
            raise UsageError(f"{where} must be a list of {typ.__name__} (got {value!r})")
        return list(value)
    if value is None:
        if optional:
            return None
        raise UsageError(f"{where} must not be empty")
    ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise UsageError(f"{where} must be {typ.__name__} (got {type(value).__name__} {value!r})")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise UsageError(f"{where} must be one of {', '.join(choices)} (got {value!r})")
    return value

