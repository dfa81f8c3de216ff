"""The default DreamBooth recipe for the world (docs/world.md): one place for the demo, the benchmark and the
tests, so all three measure the same thing."""

from __future__ import annotations

from pathlib import Path

from ..config.sections import TrainConfig
from . import WORLD_NAME
from .scenes import SIZE, prompt
from .subjects import BALL, Subject, by_name

# LoHa and LoKr take larger learning rates than LoRA: their updates are products of factors that start small
# (docs/world.md has the sweep; LoKr's 5e-3 since the tenth, 1e-2 overshot at 1500 steps). The text-encoder adapter
# uses the same rate as the UNet's.
LEARNING_RATES = {"lora": 2e-3, "loha": 5e-3, "lokr": 5e-3}
# LoHa at half LoRA's rank: the same number of weights (a rank-r LoHa holds two rank-r pairs of factors) and an
# update of rank up to r^2 = 16; at rank 8 it learned the subject less reliably (docs/world.md, seventh sweep).
RANKS = {"lora": 8, "loha": 4, "lokr": 8}
# The loss masked to the subject by the photos' masks (the background at weight 0.1) and offset noise: together
# they lifted subject fidelity in the held-out contexts from 0.55 to 0.84 on average (docs/world.md, sixth sweep).
# The saved adapter is the moving average of its weights (ema_decay): one step's weights flicker with the last
# photos drawn (docs/world.md, seventh sweep).
# Class images drawn from the photos' captions without the identifier (--class-prompt-from-captions): class rows
# that differ from the photos only in the identifier carried the subjects into held-out contexts (docs/world.md,
# ninth sweep).
RECIPE = dict(rank=RANKS, target_modules="all", learning_rate=LEARNING_RATES, max_train_steps=1500, num_class_images=50,
              class_image_steps=20, prior_loss_weight=0.25, class_prompt_from_captions=True, masked_loss=True,
              unmasked_weight=0.1, noise_offset=0.3, ema_decay=0.99)


def recipe_defaults(adapter: str = "lora", prior: bool = True, masks: bool = True,
                    class_images: bool = True) -> dict[str, object]:
    """The recipe as {"section.field": value}: what `--model world` takes for every setting the user does not give
    (peftbooth.models.defaults), and what world_config builds on. The prior settings only with prior preservation
    (what the class images show only in its class-images mode), the masked loss only when every photo has its mask
    (write_subject_photos writes them)."""
    adapter = adapter if adapter in LEARNING_RATES else "lora"  # a bad type is refused later, naming --adapter
    values: dict[str, object] = {
        "data.resolution": SIZE, "unet_adapter.rank": RANKS[adapter],  # the text-encoder adapter inherits it
        "unet_adapter.target_modules": RECIPE["target_modules"], "train.learning_rate": LEARNING_RATES[adapter],
        "train.max_train_steps": RECIPE["max_train_steps"], "train.train_text_encoder": True,
        "train.noise_offset": RECIPE["noise_offset"], "train.ema_decay": RECIPE["ema_decay"],
    }
    if prior:
        values.update({f"data.{k}": RECIPE[k] for k in ("num_class_images", "class_image_steps", "prior_loss_weight")})
        if class_images:  # what the class images show: only where there are class images to draw
            values["data.class_prompt_from_captions"] = RECIPE["class_prompt_from_captions"]
    if masks:
        values.update({"data.masked_loss": RECIPE["masked_loss"], "data.unmasked_weight": RECIPE["unmasked_weight"]})
    return values


def world_config(photos: str | Path, output_dir: str | Path, adapter: str = "lora", prior: bool = True,
                 text_encoder: bool = True, steps: int | None = None, seed: int = 0,
                 class_data_dir: str | Path | None = None, subject: Subject | None = None,
                 prior_mode: str = "class-images") -> TrainConfig:
    """A TrainConfig for the world model: adapter on the UNet's attention, feed-forward, ResNet and time-embedding
    layers (and a text-encoder adapter), optionally with prior preservation on "a photo of a <class>" (in
    `prior_mode`). `subject`: the family member the photos show (subjects.write_photos; default the ball)."""
    subject = subject or by_name(BALL)
    cfg = TrainConfig()
    cfg.model.model = WORLD_NAME
    cfg.unet_adapter.adapter = adapter
    cfg.data.prior_mode = prior_mode
    for key, value in recipe_defaults(adapter, prior=prior, masks=True,
                                      class_images=prior_mode == "class-images").items():
        section, name = key.split(".", 1)
        setattr(getattr(cfg, section), name, value)
    cfg.data.instance_data_dir = str(photos)
    cfg.data.instance_prompt = subject.prompt()  # each photo's NAME.txt caption adds its context
    cfg.data.with_prior_preservation = prior
    if prior:
        cfg.data.class_prompt = prompt(subject.cls)
        if class_data_dir:
            cfg.data.class_data_dir = str(class_data_dir)
    cfg.train.output_dir = str(output_dir)
    cfg.train.overwrite = True
    cfg.train.seed = seed
    cfg.train.max_train_steps = steps or RECIPE["max_train_steps"]
    cfg.train.train_text_encoder = text_encoder
    cfg.train.logging_steps = 50
    cfg.train.report_to = "none"
    return cfg
