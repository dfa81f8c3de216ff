"""peftbooth: DreamBooth fine-tuning of Stable Diffusion with PEFT adapters (LoRA, LoHa, LoKr)."""

from .config.sections import AdapterArgs, DataArgs, ModelArgs, TrainArgs, TrainConfig, UsageError
from .inference.pipeline import AdapterPipeline
from .training.loop import train

__version__ = "0.1.0"
__all__ = ["AdapterArgs", "AdapterPipeline", "DataArgs", "ModelArgs", "TrainArgs", "TrainConfig", "UsageError", "train"]
