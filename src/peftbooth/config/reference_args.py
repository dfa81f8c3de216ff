"""The spellings of the DreamBooth example scripts, accepted by `peftbooth train` with the same meaning.

People arrive with a command for diffusers' `train_dreambooth_lora.py` or PEFT's `lora_dreambooth/train_dreambooth.py`
(`--use_lora --lora_r 16 ...`) or `stable_diffusion/train_dreambooth.py` (a `lora` / `loha` / `lokr` subcommand with
`--unet_r`, `--te_r`, ...). `translate` rewrites such an argv into peftbooth flags before parsing; an option with no
equivalent here is refused with one line that says what to use instead. Only the options are translated: the module
lists those scripts hard-code are not (peftbooth's --target-modules presets apply; pass a list to change them).
"""

from __future__ import annotations

from pathlib import Path

from .sections import UsageError

# reference flag -> peftbooth flag, where the name differs by more than '_' -> '-'
RENAMED = {
    "--pretrained_model_name_or_path": "--model",
    "--resume_from_checkpoint": "--resume",
    "--text_encoder_lr": "--text-encoder-learning-rate",
    "--num_dataloader_workers": "--dataloader-num-workers",
    "--pre_compute_text_embeddings": "--cache-text-states",
    # PEFT lora_dreambooth/train_dreambooth.py
    "--lora_r": "--rank",
    "--lora_alpha": "--alpha",
    "--lora_dropout": "--dropout",
    "--lora_text_encoder_r": "--text-encoder-rank",
    "--lora_text_encoder_alpha": "--text-encoder-alpha",
    "--lora_text_encoder_dropout": "--text-encoder-dropout",
    # PEFT stable_diffusion/train_dreambooth.py (after its lora / loha / lokr subcommand); LoHa/LoKr 'rank_dropout'
    # is what peftbooth's --dropout sets for those types
    "--unet_r": "--rank",
    "--unet_alpha": "--alpha",
    "--unet_dropout": "--dropout",
    "--unet_rank_dropout": "--dropout",
    "--unet_module_dropout": "--module-dropout",
    "--unet_use_effective_conv2d": "--use-effective-conv2d",
    "--unet_decompose_both": "--decompose-both",
    "--unet_decompose_factor": "--decompose-factor",
    "--te_r": "--text-encoder-rank",
    "--te_alpha": "--text-encoder-alpha",
    "--te_dropout": "--text-encoder-dropout",
    "--te_rank_dropout": "--text-encoder-dropout",
    "--te_module_dropout": "--text-encoder-module-dropout",
    "--te_decompose_both": "--text-encoder-decompose-both",
    "--te_decompose_factor": "--text-encoder-decompose-factor",
}

# options with no peftbooth equivalent -> what to do instead
NO_EQUIVALENT = {
    "--num_train_epochs": "give the length as --max-train-steps",
    "--validation_epochs": "use --validation-steps",
    "--scale_lr": "give the --learning-rate you want (nothing is multiplied by batch size here)",
    "--lr_num_cycles": "the schedules here are constant, constant_with_warmup, cosine and linear",
    "--lr_power": "the schedules here are constant, constant_with_warmup, cosine and linear",
    "--hub_token": "the token comes from HF_TOKEN or `hf auth login`, never from a flag",
    "--logging_dir": "logs are written to OUTPUT/logs",
    "--allow_tf32": "drop it (PyTorch's defaults apply)",
    "--enable_xformers_memory_efficient_attention": "drop it (attention uses PyTorch's scaled_dot_product_attention)",
    "--prior_generation_precision": "class images are generated in --mixed-precision",
    "--tokenizer_name": "the tokenizer comes from --model",
    "--lora_bias": "drop it (adapter biases are not trained)",
    "--lora_text_encoder_bias": "drop it (adapter biases are not trained)",
    "--unet_bias": "drop it (adapter biases are not trained)",
    "--te_bias": "drop it (adapter biases are not trained)",
    "--no_tracemalloc": "drop it (no memory tracer runs)",
    "--wandb_key": "logs go to TensorBoard (--report-to tensorboard) or nowhere",
    "--wandb_project_name": "logs go to TensorBoard (--report-to tensorboard) or nowhere",
    "--local_rank": "launch with torchrun, accelerate launch or --num-processes N",
    "--class_labels_conditioning": "drop it (not supported)",
    "--text_encoder_use_attention_mask": "drop it (not supported)",
    "--validation_images": "drop it (validation is text-to-image)",
    "--validation_scheduler": "drop it (validation uses DPM-Solver++)",
    "--offset_noise": "use --noise-offset STRENGTH",
}

# the reference scripts' on/off switches (take no value)
SWITCHES = {"--push_to_hub", "--use_lora", "--with_prior_preservation", "--train_text_encoder", "--center_crop",
            "--gradient_checkpointing", "--use_8bit_adam", "--pre_compute_text_embeddings", "--scale_lr",
            "--allow_tf32", "--enable_xformers_memory_efficient_attention", "--no_tracemalloc",
            "--unet_use_effective_conv2d", "--unet_decompose_both", "--te_decompose_both", "--offset_noise",
            "--class_labels_conditioning", "--text_encoder_use_attention_mask"}
ADAPTER_SUBCOMMANDS = ("lora", "loha", "lokr")
REPORT_TO = ("tensorboard", "none")


def translate(argv: list[str], known: set[str], switches: set[str]) -> list[str]:
    """`train` arguments with the reference scripts' spellings rewritten into peftbooth's. `known`: peftbooth's own
    train flags; `switches`: those of them that take no value. Our own spellings pass through unchanged."""
    out: list[str] = []
    push, hub_model_id, output_dir = False, None, None
    args = list(argv)
    while args:
        arg = args.pop(0)
        value_of_previous = bool(out) and out[-1] in known and out[-1] not in switches
        if not arg.startswith("--") or value_of_previous:
            if arg in ADAPTER_SUBCOMMANDS and not value_of_previous:  # PEFT's `train_dreambooth.py lokr ...`
                out += ["--adapter", arg]
            elif arg == "full" and not value_of_previous:
                raise UsageError("full: full fine-tuning is not done here; peftbooth trains adapters "
                                 "(lora, loha, lokr)")
            else:
                out.append(arg)
            continue
        name, has_value, value = arg.partition("=")
        if "_" not in name:  # peftbooth's own spelling
            if name == "--output-dir":
                output_dir = value if has_value else (args[0] if args else None)
            out.append(arg)
            continue
        if name in NO_EQUIVALENT:
            raise UsageError(f"{name}: no equivalent in peftbooth; {NO_EQUIVALENT[name]}")
        ours = RENAMED.get(name, name.replace("_", "-"))
        switch = name in SWITCHES or ours in switches
        if switch and has_value:
            raise UsageError(f"{name}: takes no value")
        if not switch and not has_value:
            if not args:
                raise UsageError(f"{name}: expected a value")
            value = args.pop(0)
        if name == "--push_to_hub":
            push = True
            continue
        if name == "--hub_model_id":
            hub_model_id = value
            continue
        if name == "--use_lora":
            out += ["--adapter", "lora"]
            continue
        if name == "--report_to" and value not in REPORT_TO:
            raise UsageError(f"--report_to {value}: peftbooth logs to TensorBoard or nowhere; use --report-to "
                             "tensorboard or none")
        if name == "--output_dir":
            output_dir = value
        if ours not in known:
            raise UsageError(f"{name}: no such option (neither peftbooth's nor the DreamBooth example scripts'); "
                             "see peftbooth train --help")
        out += [ours] if switch else [f"{ours}={value}"]
    if hub_model_id and not push:
        raise UsageError("--hub_model_id needs --push_to_hub (as in the example scripts)")
    if push:
        # the scripts push to --hub_model_id, else to a repo named after the output folder in the token's namespace
        repo = hub_model_id or (Path(output_dir).name if output_dir else None)
        if not repo:
            raise UsageError("--push_to_hub needs --hub_model_id user/name or --output_dir")
        out += ["--push-to-hub", repo]
    return out
