"""A run's trained adapters as files: one PEFT adapter folder per part (``unet/``, ``text_encoder/``, ...) and, with
--train-token-embedding, the identifier's rows. The finished run and every checkpoint write them the same way."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config.sections import UsageError
from ..runs.rundir import ADAPTER_WEIGHTS, TOKEN_EMBEDDINGS
from . import token_embedding


@dataclass
class TrainedAdapters:
    """The trained parts by their folder name, and the identifier whose input rows were trained (if any).

    `models` are the PeftModels themselves (not a data-parallel wrapper): the weights every process holds alike.
    `text_encoders` are every text encoder of the model, unwrapped, for the identifier's rows.
    """

    models: dict[str, torch.nn.Module]
    token: str | None = None
    text_encoders: list[torch.nn.Module] = field(default_factory=list)

    def save(self, folder: Path) -> None:
        """Write the adapter folders (and the identifier's rows) into `folder`."""
        for name, model in self.models.items():
            # save_embedding_layers=False: no embeddings are trained, and 'auto' would look the base model up online
            model.save_pretrained(folder / name, save_embedding_layers=False)
        if self.token:
            token_embedding.save_file(folder / TOKEN_EMBEDDINGS, self.text_encoders, self.token)

    def load(self, folder: Path, flag: str = "--resume") -> None:
        """Copy the weights saved in `folder` into the models, refusing a file that does not fit them exactly."""
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
        from safetensors.torch import load_file

        for part, model in self.models.items():
            # read on the CPU and copied in: safetensors refuses the device "cpu:0" that the CPU processes of a
            # multi-process run have, and adapters are small
            weights = load_file(folder / part / ADAPTER_WEIGHTS, device="cpu")
            # compared as PEFT saves them: missing weights would leave those at their fresh initialisation,
            # silently, as much as extra weights would be dropped
            expected = set(get_peft_model_state_dict(model, adapter_name="default", unwrap_compiled=True,
                                                    save_embedding_layers=False))
            missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
            if missing or unexpected:
                what = f"{len(missing)} missing, e.g. {missing[0]}" if missing else \
                    f"{len(unexpected)} unexpected, e.g. {unexpected[0]}"
                raise UsageError(f"{flag} {folder}: {part} weights do not fit this model ({what})")
            set_peft_model_state_dict(model, weights, adapter_name="default")
        if self.token:
            _, rows = token_embedding.read_file(folder / TOKEN_EMBEDDINGS)
            token_embedding.load_state(self.text_encoders, rows)
