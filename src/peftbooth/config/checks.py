"""The checks of a resolved training config: every problem collected, each naming its flag, raised once as a
:class:`~peftbooth.config.sections.UsageError` (``validate``); numeric ranges (``RANGES``)."""

from __future__ import annotations

import dataclasses
import math
import re

from .dicts import SECTIONS
from .sections import (
    ADAPTER_TYPES,
    MODEL_REQUIRED,
    TEXT_ENCODER_PRESETS,
    UNET_PRESETS,
    AdapterArgs,
    ModelArgs,
    TrainArgs,
    TrainConfig,
    UsageError,
)

# Ranges of the numeric options, checked before any work: (low, high) with None for no bound; a float low bound
# listed in OPEN_LOW is exclusive. The upper bounds are far past any real use but keep a typo (--resolution
# 1000000) from hanging a run for minutes before it fails. Every float must also be finite (argparse takes 'nan').
MAX_STEPS = 10_000_000
RANGES = {
    "data": dict(num_class_images=(1, 1_000_000), prior_loss_weight=(0.0, None), class_prompt_dropout=(0.0, 1.0),
                 unmasked_weight=(0.0, 1.0), sample_batch_size=(1, 1024), class_image_steps=(1, 1000),
                 train_batch_size=(1, 1024), dataloader_num_workers=(0, 256)),
    "model": dict(max_sequence_length=(1, 512)),
    "train": dict(logit_std=(0.0, None), mode_scale=(0.0, None), seed=(0, 2**32 - 1),
                  max_train_steps=(1, MAX_STEPS), learning_rate=(0.0, 1.0),
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
            "snr_gamma", "alpha", "logit_std"}
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


IDENTIFIER_MISSING = ("--class-prompt-from-captions: --instance-prompt {!r} has no word that --class-prompt {!r} "
                      "lacks (the identifier to take out of the captions)")


def identifier_words(instance_prompt: str, class_prompt: str) -> set[str]:
    """The words of the instance prompt that the class prompt lacks: the identifier ('sks')."""
    return set(instance_prompt.split()) - set(class_prompt.split())


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
        ranges = RANGES["adapter" if cls is AdapterArgs else section]
        obj = getattr(cfg, section)
        for f in dataclasses.fields(cls):
            if f.name == "num_class_images" and (not cfg.data.with_prior_preservation
                                                 or cfg.data.prior_mode == "base-prediction"):
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
    if d.prior_mode != "class-images" and not d.with_prior_preservation:
        problems.append(f"--prior-mode {d.prior_mode} needs --with-prior-preservation")
    if d.prior_mode == "base-prediction" and d.class_data_dir:
        problems.append("--class-data-dir: --prior-mode base-prediction uses no class images (the photos under "
                        "--class-prompt, with the base model's prediction as the target); drop one of them")
    if d.class_prompt_from_captions and (not d.with_prior_preservation or d.prior_mode != "class-images"):
        problems.append("--class-prompt-from-captions needs --with-prior-preservation with --prior-mode "
                        "class-images (it chooses what the class images show)")
    elif d.class_prompt_from_captions and d.instance_prompt and d.class_prompt:
        if not identifier_words(d.instance_prompt, d.class_prompt):
            problems.append(IDENTIFIER_MISSING.format(d.instance_prompt, d.class_prompt))
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
    if t.target_blocks is not None:
        try:
            block_list(t.target_blocks)
        except ValueError:
            problems.append(f"--target-blocks {t.target_blocks!r}: give block numbers and ranges, e.g. '0-11' or "
                            "'0,1,2'")
    if problems:
        raise UsageError("; ".join(problems))


MAX_BLOCK = 999  # far past any real transformer (SD 3.5 Large has 38 blocks); a typo must not build a huge set


def block_list(spec: str) -> list[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7] (sorted, unique); ValueError on anything else."""
    blocks = set()
    for part in spec.split(","):
        low, _, high = part.strip().partition("-")
        lo, hi = int(low), int(high or low)
        if lo < 0 or hi < lo or hi > MAX_BLOCK:
            raise ValueError(spec)
        blocks.update(range(lo, hi + 1))
    if not blocks:
        raise ValueError(spec)
    return sorted(blocks)


# The fields of SD3's flags (flow matching, its transformer's blocks). Given for another family they would do
# nothing, so they are refused once the model's family is known (family_problems).
FLOW_MATCHING_FLAGS = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "precondition_outputs",
                       "target_blocks")


def family_problems(cfg: "TrainConfig", family: str) -> list[str]:
    """Flags that do nothing for the model's family (read from model_index.json before any weights): Min-SNR
    weights an ε/v-prediction loss, SD3's flags its flow-matching loss and its transformer."""
    t, problems = cfg.train, []
    defaults, name = TrainArgs(), {"sd": "an SD 1.x / 2.x", "sdxl": "an SDXL"}.get(family, family)
    if family == "sd3":
        if t.snr_gamma is not None:
            problems.append("--snr-gamma: Min-SNR weights an epsilon/v-prediction loss; this SD3 model trains by "
                            "flow matching: use --weighting-scheme instead")
    else:
        for flag in FLOW_MATCHING_FLAGS:
            if getattr(t, flag) != getattr(defaults, flag):
                problems.append(f"--{flag.replace('_', '-')} applies to SD3 models (flow matching, the MMDiT "
                                f"transformer); this is {name} model")
        if not cfg.model.t5 or cfg.model.max_sequence_length != ModelArgs().max_sequence_length:
            problems.append(f"--no-t5 / --max-sequence-length apply to SD3 models; this is {name} model")
    return problems
