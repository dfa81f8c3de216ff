"""peftbooth: DreamBooth fine-tuning of Stable Diffusion with PEFT adapters (LoRA, LoHa, LoKr)."""

from .config import AdapterArgs, DataArgs, ModelArgs, TrainArgs, TrainConfig, UsageError
from .inference import AdapterPipeline
from .train import train

__version__ = "0.1.0"
__all__ = ["AdapterArgs", "AdapterPipeline", "DataArgs", "ModelArgs", "TrainArgs", "TrainConfig", "UsageError", "train"]
