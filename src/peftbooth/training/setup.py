"""``setup``: validate everything, then load the components, claim the output folder, make the class images,
attach the adapters, place the weights, build the caches and the optimizer, and hand ``fit`` a :class:`Run`.

Nothing is written to disk until every input has been checked (preflight.py). Dtypes and devices are
precision.py's, compiling and the optimizer speed.py's, class images prior.py's.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..adapters import factored
from ..adapters import token_embedding as te_rows
from ..adapters.files import TrainedAdapters
from ..adapters.inject import attach, check_targets, count_parameters
from ..adapters.peft_config import TEXT_ENCODER_PRESETS, denoiser_presets
from ..config.checks import block_list, family_problems
from ..config.dicts import to_dict
from ..config.sections import TrainConfig, UsageError
from ..data.dataset import DreamBoothDataset, EpochSampler, collate
from ..data.images import list_images, load_captions
from ..models.components import Components
from ..models.defaults import announce
from ..models.loading import family_of, load_components, read_model_index, resolve_model
from ..models.vae import vae_force_upcast
from ..precision import Precision, for_training, place_frozen
from ..runs.rundir import RunDir, adapter_parts
from .cache import LatentCache, TextCache
from .checkpoint import CHECKPOINTS, Checkpointer, EMAState, OptimizerState, TrainState, acquire_lock, release_lock
from .distributed import accelerator_kwargs
from .ema import AdapterEMA, adapter_ema
from .memory import check_memory
from .preflight import check_inputs, cpu_processes_from_launcher
from .speed import make_optimizer, maybe_compile, offload


@dataclass
class Run:
    """Everything `fit` needs, built by `setup`."""

    cfg: TrainConfig
    accelerator: object
    components: Components
    unet: torch.nn.Module  # PeftModel around the denoiser, the UNet or SD3's transformer (prepared by Accelerate)
    text_encoder: torch.nn.Module  # PeftModel when trained, else the frozen CLIPTextModel
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    dataloader: DataLoader
    precision: Precision  # the device and dtypes of every component (precision.for_training)
    output_dir: Path
    sampler: EpochSampler
    dataset: DreamBoothDataset
    state: TrainState  # where the loop stands (fresh, or restored from a checkpoint)
    fingerprint: str  # of the instance photos, recorded in checkpoints
    lock: Path | None = None
    latent_cache: LatentCache | None = None  # VAE posteriors per (image, flip), when cached
    text_cache: TextCache | None = None  # text-encoder states per prompt, when the text encoder is frozen
    text_encoder_2: torch.nn.Module | None = None  # SDXL's second text encoder (PeftModel when trained)
    ema: AdapterEMA | None = None  # --ema-decay: the moving average of the adapter weights
    adapters: TrainedAdapters | None = None  # the trained parts unwrapped: what checkpoints and the run save
    checkpointer: Checkpointer | None = None

    @property
    def weight_dtype(self) -> torch.dtype:
        """The frozen weights' compute dtype (--mixed-precision's)."""
        return self.precision.compute

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 is not None else [])

    def trained(self) -> dict[str, torch.nn.Module]:
        """The models with adapters (as prepared), by the folder name their adapter is saved under."""
        return adapter_parts([self.unet, *(self.text_encoders if self.cfg.train.train_text_encoder else [])],
                             self.components.denoiser_part)

    def drop_wrappers(self) -> None:
        """Hold the models the prepared (data-parallel) ones wrap, and no wrapper (signals.end_training)."""
        unwrap = self.accelerator.unwrap_model
        self.unet, self.text_encoder = unwrap(self.unet), unwrap(self.text_encoder)
        if self.text_encoder_2 is not None:
            self.text_encoder_2 = unwrap(self.text_encoder_2)


def setup(cfg: TrainConfig) -> Run:
    """Validate everything, then load, claim the output folder and build the Run."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration

    cfg = cfg.resolved()
    cpu_processes_from_launcher()
    images, prompts, fingerprint, checkpoint, masks = check_inputs(cfg)
    t, m = cfg.train, cfg.model
    problems = family_problems(cfg, family_of(read_model_index(resolve_model(m.model), m.revision)))
    if problems:  # from model_index.json alone: before any weights are loaded
        raise UsageError("; ".join(problems))
    components = load_components(m.model, m.revision, m.variant, m.vae, m.t5, m.max_sequence_length)
    # Check adapter targets against the loaded modules before anything is written.
    check_targets(components.unet, cfg.unet_adapter.target_modules, denoiser_presets(components.family), "")
    target_blocks(cfg, components)
    if t.train_text_encoder:
        for encoder in components.text_encoders:
            check_targets(encoder, cfg.text_encoder_adapter.target_modules, TEXT_ENCODER_PRESETS, "text-encoder-")
    if t.train_token_embedding:  # the CLIP tokenizers' (SD3's T5 is never trained)
        for tokenizer in components.tokenizers[: len(components.text_encoders)]:
            te_rows.identifier_id(tokenizer, t.train_token_embedding)
    check_memory(cfg, components)  # on a GPU: refuse a run whose estimated peak exceeds the free memory
    announce()  # the CLI's "defaults from the model" line, once the run is known to start (a refusal: one line)

    # --- inputs are valid: from here on files are written
    out = Path(t.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision,
        # Every optimizer step sums exactly N micro-batches. Accelerate's default also steps at the end of each
        # pass over the data, which with 5 photos and N=4 gives every second step a quarter-size gradient.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=t.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        log_with=None if t.report_to == "none" else t.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        **accelerator_kwargs(cfg),  # DDP told of unused weights under module dropout (distributed.py)
    )
    lock = acquire_lock(out) if accelerator.is_main_process else None  # one lock per run, not per process
    if checkpoint is None and accelerator.is_main_process and (out / CHECKPOINTS).exists():
        shutil.rmtree(out / CHECKPOINTS)  # --overwrite: the old run's checkpoints must not be resumed by mistake
    try:
        return build_run(cfg, accelerator, components, images, prompts, fingerprint, checkpoint, lock, masks)
    except BaseException:
        release_lock(lock)  # a failed setup must not leave the folder looking busy
        raise


def build_run(cfg: TrainConfig, accelerator, components: Components, images: list, prompts: list[str],
              fingerprint: str, checkpoint: Path | None, lock: Path | None, masks: list | None = None) -> Run:
    """The rest of setup, once the output folder is ours: class images, adapters, dtypes, caches, optimizer."""
    from accelerate.utils import set_seed

    t, d, device = cfg.train, cfg.data, accelerator.device
    precision = for_training(t.mixed_precision, device, components.family, vae_force_upcast(components.vae),
                             cfg.model.upcast_vae)
    # Frozen weights in the compute dtype from the start, still on the CPU: class images are made in it (SDXL's
    # UNet and text encoders would take 14 GB of a GPU in fp32), and training keeps them so.
    for model in (components.unet, *components.text_encoders, *frozen_t5(components)):
        model.to(dtype=precision.compute)
    components.vae.to(dtype=precision.vae)
    set_seed(t.seed)
    class_paths = None
    if d.with_prior_preservation and d.prior_mode == "base-prediction":
        # the photos themselves are the class rows, under --class-prompt; the loss compares them with the base
        # model's own prediction (training.objective's prior_target), so there is nothing to generate
        class_paths = list_images(d.instance_data_dir, "--instance-data-dir")
    elif d.with_prior_preservation:
        class_paths = class_images(cfg, accelerator, components, precision, prompts)
    set_seed(t.seed)  # training randomness must not depend on whether class images had to be generated
    unet, text_encoders = attach_adapters(cfg, components)
    # Adapter weights in fp32 beside the frozen ones: the optimizer sees exact fp32 parameters and gradients while
    # the big frozen matmuls run in half precision.
    components.vae.to(device)
    for model in (*text_encoders, *frozen_t5(components)):
        place_frozen(model, precision)
    dataset, latent_cache, text_cache = dataset_and_caches(cfg, accelerator, components, text_encoders, images,
                                                           prompts, class_paths, precision.compute, masks)
    # The UNet goes to the device only now: the VAE encoding the photos at full resolution is the largest
    # activation before training, and the UNet's weights (1.7 GB in bf16 for SD 1.5) need not sit beside it.
    place_frozen(unet, precision)
    if t.gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
        if t.train_text_encoder:
            for encoder in components.text_encoders:
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer, lr_scheduler = optimizer_and_schedule(t, unet, text_encoders, device)
    # the data order is a function of (seed, epoch): resumable; whole global batches: no padding by Accelerate
    sampler = EpochSampler(len(dataset), t.seed, d.train_batch_size * accelerator.num_processes)
    dataloader = DataLoader(
        dataset, batch_size=d.train_batch_size, sampler=sampler, num_workers=d.dataloader_num_workers,
        collate_fn=partial(collate, tokenizers=None if text_cache else components.tokenizers),
        generator=torch.Generator().manual_seed(t.seed), pin_memory=device.type == "cuda",
    )
    trained_encoders = text_encoders if t.train_text_encoder else []  # a frozen encoder is not wrapped
    unet, *prepared, optimizer, dataloader = accelerator.prepare(unet, *trained_encoders, optimizer, dataloader)
    text_encoders = prepared or text_encoders
    if t.compile:
        unet = maybe_compile(unet, accelerator, t.compile_mode)
    if accelerator.is_main_process and t.report_to != "none":
        accelerator.init_trackers("peftbooth")
    run = Run(cfg, accelerator, components, unet, text_encoders[0], optimizer, lr_scheduler, dataloader, precision,
              Path(t.output_dir), sampler, dataset, TrainState(), fingerprint, lock, latent_cache, text_cache,
              text_encoders[1] if len(text_encoders) > 1 else None)
    unwrap = accelerator.unwrap_model
    run.adapters = TrainedAdapters({name: unwrap(m) for name, m in run.trained().items()}, t.train_token_embedding,
                                   [unwrap(m) for m in run.text_encoders])
    run.ema = adapter_ema(run.adapters.models, t.ema_decay)  # keyed on the unwrapped models' parameter names
    run.checkpointer = Checkpointer(
        accelerator, run.output_dir,
        [run.adapters, *([EMAState(run.ema)] if run.ema is not None else []),
         OptimizerState(optimizer, lr_scheduler, accelerator)],
        {"config": to_dict(cfg), "data_fingerprint": fingerprint, "num_processes": accelerator.num_processes},
        t.checkpoints_total_limit or 0)
    for name, model in run.trained().items():
        trainable, total = count_parameters(model)
        accelerator.print(f"{name}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)")
    if checkpoint is not None:
        run.state = run.checkpointer.load(checkpoint)
        accelerator.print(f"resuming from {checkpoint} at step {run.state.step}")
    return run


def class_images(cfg: TrainConfig, accelerator, components: Components, precision: Precision,
                 captions: list[str]) -> list[Path]:
    """The run's class images (--class-data-dir, else OUTPUT/class_images), the missing ones made first by the
    components in memory, in their compute dtype: called before the adapters are attached, so they are the base
    model's images. `captions`: the photos' prompts (for --class-prompt-from-captions)."""
    from ..data.images import class_image_prompt
    from .prior import class_images_from_components

    d, out = cfg.data, Path(cfg.train.output_dir)
    class_dir = RunDir(out).class_images_of(d.class_data_dir)
    class_prompt = class_image_prompt(d, captions)
    if d.class_prompt_from_captions:
        accelerator.print(f"class images from the photos' captions: {' | '.join(class_prompt)}")
    return class_images_from_components(
        components, class_prompt, class_dir, d.num_class_images, d.sample_batch_size, d.class_image_steps,
        cfg.train.seed, precision, show_progress=accelerator.is_local_main_process,
        process_index=accelerator.process_index, num_processes=accelerator.num_processes,
        barrier=accelerator.wait_for_everyone,
    )


def attach_adapters(cfg: TrainConfig, components: Components) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """(UNet with its adapter, text encoders): one (SD 1.x / 2.x) or two (SDXL); with --train-text-encoder each
    gets its own adapter of the --text-encoder-* settings, saved as text_encoder/ and text_encoder_2/."""
    t = cfg.train
    if t.channels_last:
        # before the adapters exist: only the frozen 4-D weights change layout; adapter weights stay contiguous,
        # as safetensors needs them for saving
        components.unet.to(memory_format=torch.channels_last)
    unet = attach(components.unet, cfg.unet_adapter, denoiser_presets(components.family), "", cfg.model.model,
                  layers=target_blocks(cfg, components), layers_pattern="transformer_blocks",
                  exclude=unused_denoiser_modules(components))
    text_encoders = list(components.text_encoders)
    if t.train_text_encoder:
        text_encoders = [attach(m, cfg.text_encoder_adapter, TEXT_ENCODER_PRESETS, "text-encoder-",
                                   cfg.model.model, layers=used_text_layers(components, i))
                         for i, m in enumerate(text_encoders)]
    if t.train_token_embedding:  # the identifier's own input vector, in every text encoder
        for tokenizer, model in zip(components.tokenizers, text_encoders):
            te_rows.attach(model, [te_rows.identifier_id(tokenizer, t.train_token_embedding)])
    if t.factored_lycoris:  # LoHa/LoKr layers wide enough to gain apply their update through the factors
        for model in (unet, *text_encoders):
            factored.install(model)
    return unet, text_encoders


def dataset_and_caches(cfg: TrainConfig, accelerator, components: Components, text_encoders: list, images: list,
                       prompts: list[str], class_paths: list[Path] | None, weight_dtype: torch.dtype,
                       masks: list | None = None) -> tuple[DreamBoothDataset, LatentCache | None, TextCache | None]:
    """The dataset, and the caches: the frozen VAE and text encoder give the same answer for the same input, so
    they are asked once and then moved off the GPU."""
    t, d, device = cfg.train, cfg.data, accelerator.device
    cache_latents = t.cache_latents and d.center_crop
    if t.cache_latents and not d.center_crop:
        accelerator.print("note: latents are not cached: random crops (--no-center-crop) give new pixels every step")
    class_prompts = load_captions(class_paths, d.class_prompt) if class_paths else []  # NAME.txt, else --class-prompt
    dataset = DreamBoothDataset(images, prompts, d.resolution, d.center_crop, d.random_flip, class_paths,
                                d.class_prompt, load_pixels=not cache_latents, seed=t.seed,
                                class_prompt_dropout=d.class_prompt_dropout if class_paths else 0.0,
                                instance_masks=masks, class_prompts=class_prompts)
    latent_cache = text_cache = None
    if cache_latents:
        latent_cache = LatentCache.build(dataset, components.vae, device, weight_dtype, d.sample_batch_size)
        offload(components.vae, device)
    if t.cache_text_states and not t.train_text_encoder:
        all_prompts = prompts + list(dict.fromkeys(class_prompts)) + ([""] if d.class_prompt_dropout else [])
        text_cache = TextCache.build(all_prompts, components.tokenizers, text_encoders, device, components.t5)
        for encoder in (*text_encoders, *frozen_t5(components)):
            offload(encoder, device)
    return dataset, latent_cache, text_cache


def optimizer_and_schedule(t, unet: torch.nn.Module, text_encoders: list, device: torch.device):
    """AdamW over the adapter weights (the text encoders' at --text-encoder-learning-rate) and its LR schedule,
    which counts optimizer steps: fit steps it by hand once per optimizer step."""
    from diffusers.optimization import get_scheduler

    params = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": t.learning_rate}]
    rows = [r.weight for m in text_encoders if (r := te_rows.trained_rows(m)) is not None]
    if t.train_text_encoder:
        params.append({"params": [p for m in text_encoders for p in m.parameters()
                                  if p.requires_grad and not any(p is r for r in rows)],
                       "lr": t.text_encoder_learning_rate or t.learning_rate})
    if rows:  # no weight decay: it would pull the identifier's vector towards zero, away from the other words'
        params.append({"params": rows, "weight_decay": 0.0,
                       "lr": t.token_embedding_learning_rate or t.text_encoder_learning_rate or t.learning_rate})
    optimizer = make_optimizer(params, t, device)
    return optimizer, get_scheduler(t.lr_scheduler, optimizer=optimizer, num_warmup_steps=t.lr_warmup_steps,
                                    num_training_steps=t.max_train_steps)


def frozen_t5(components: Components) -> list[torch.nn.Module]:
    """SD3's T5 when it is loaded (it is never trained, but placed and offloaded as the frozen encoders are)."""
    return [components.text_encoder_3] if components.text_encoder_3 is not None else []


def target_blocks(cfg: TrainConfig, components: Components) -> list[int] | None:
    """--target-blocks as block indices, checked against SD3's transformer (None: every block)."""
    spec = cfg.train.target_blocks
    if spec is None:
        return None
    blocks, count = block_list(spec), len(components.unet.transformer_blocks)
    if blocks[-1] >= count:
        raise UsageError(f"--target-blocks {spec}: this transformer has blocks 0-{count - 1}")
    return blocks


def unused_denoiser_modules(components: Components) -> list[str] | None:
    """Modules of the denoiser whose output never reaches the loss, so an adapter on them would stay untrained
    (and stall DistributedDataParallel's gradient exchange): SD3's last block is 'context pre-only', it drops
    the text stream after attending, so the query of that stream (attn.add_q_proj) is computed for nothing."""
    if not components.is_sd3:
        return None
    last = len(components.unet.transformer_blocks) - 1
    if not components.unet.transformer_blocks[last].context_pre_only:
        return None
    return [f"transformer_blocks.{last}.attn.add_q_proj"]


def used_text_layers(components: Components, index: int) -> list[int] | None:
    """Encoder layers of text encoder `index` whose output reaches the UNet; None: all of them.

    SDXL conditions on the penultimate hidden states, and takes the pooled embedding from the second encoder
    only: the first encoder's last layer never affects the loss (SD3 takes both pooled embeddings: all are used). An adapter there would be saved untrained, and
    under DistributedDataParallel its missing gradients stall the gradient exchange.
    """
    if not components.is_sdxl or index != 0:
        return None
    return list(range(components.text_encoder.config.num_hidden_layers - 1))
