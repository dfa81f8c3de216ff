"""The world's evaluator: a small CNN trained on the world's labels, standing in for DINO and CLIP.

It reads a 32 x 32 image and says which class, colour and background it shows and whether it shows the subject;
its pooled features (unit length) give an image-image similarity, as DINO's do for real photos.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .scenes import BACKGROUNDS, CLASSES, COLOURS, SIZE, to_array

HEADS = {"class": CLASSES, "colour": tuple(COLOURS), "background": tuple(BACKGROUNDS), "subject": ("no", "yes")}
FILE = "evaluator.safetensors"


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())


class WorldEvaluator(nn.Module):
    """(N, 3, 32, 32) in [-1, 1] -> logits per head and (N, 4w) unit features."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.width = w
        self.body = nn.Sequential(_block(3, w, 1), _block(w, w, 1), _block(w, 2 * w, 2), _block(2 * w, 2 * w, 1),
                                  _block(2 * w, 4 * w, 2), _block(4 * w, 4 * w, 1), _block(4 * w, 4 * w, 2))
        self.heads = nn.ModuleDict({k: nn.Linear(4 * w, len(v)) for k, v in HEADS.items()})

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        h = self.body(x).mean(dim=(2, 3))  # (N, 4w): global average pool of the 4 x 4 map
        return {k: head(h) for k, head in self.heads.items()}, nn.functional.normalize(h, dim=-1)


def save_evaluator(net: WorldEvaluator, folder: str | Path) -> Path:
    """evaluator.safetensors in `folder`: fp16 weights, the width and label names in the header."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILE
    save_file({k: v.detach().half().contiguous() for k, v in net.state_dict().items()}, str(path),
              metadata={"config": json.dumps({"width": net.width, "heads": HEADS})})
    return path


def load_evaluator(folder: str | Path) -> WorldEvaluator:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(folder) / FILE
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    if {k: tuple(v) for k, v in config["heads"].items()} != HEADS:
        raise ValueError(f"{path}: made for another world (its labels differ from this version's)")
    net = WorldEvaluator(config["width"])
    net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return net.eval().requires_grad_(False)


@torch.no_grad()
def judge(net: WorldEvaluator, images: list, batch_size: int = 256) -> dict:
    """Per image: the label of each head, P(subject) and the unit features (as numpy arrays)."""
    out = {k: [] for k in HEADS}
    out["p_subject"], out["features"] = [], []
    for i in range(0, len(images), batch_size):
        batch = [im.convert("RGB").resize((SIZE, SIZE), 1) if im.size != (SIZE, SIZE) else im
                 for im in images[i:i + batch_size]]
        logits, feats = net(torch.from_numpy(to_array(batch)))
        for k, names in HEADS.items():
            out[k] += [names[j] for j in logits[k].argmax(-1).tolist()]
        out["p_subject"].append(logits["subject"].softmax(-1)[:, 1].numpy())
        out["features"].append(feats.numpy())
    out["p_subject"] = np.concatenate(out["p_subject"]) if out["p_subject"] else np.zeros(0)
    out["features"] = np.concatenate(out["features"]) if out["features"] else np.zeros((0, 4 * net.width))
    return out
