"""The world: a procedural scene generator, a small pretrained SD-shaped model of it (shipped, <= 10 MB) and an
evaluator trained on the same world, so that personalisation is measured offline. See docs/world.md."""

from pathlib import Path

WORLD_NAME = "world"  # `--model world`
MODEL_DIR = Path(__file__).parent / "model"  # written by `python -m peftbooth.world.build`
WORLD_SD3_NAME = "world-sd3"  # `--model world-sd3`: the SD3-shaped world (flow matching; docs/world_sd3.md)
SD3_MODEL_DIR = Path(__file__).parent / "model_sd3"  # written by `python -m peftbooth.world.build_sd3`
# what world.metrics measures, in its tables' column order, and the names of the rows it compares
METRICS = ("subject_fidelity", "in_context_fidelity", "prompt_fidelity", "class_drift", "class_fidelity", "diversity",
           "subject_similarity")
LABELS = {"adapter": "adapter", "base": "base model (no adapter)"}


def is_world_model(model: str | None) -> bool:
    """`--model world`, or a path to the shipped world model folder."""
    if not model:
        return False
    if model == WORLD_NAME:
        return True
    try:
        return Path(model).resolve() == MODEL_DIR.resolve()
    except OSError:
        return False
