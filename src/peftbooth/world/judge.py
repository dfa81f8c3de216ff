"""The world's judge: does this image show *this* subject? One network for any subject, given its description.

The evaluator (evaluator.py) knows one subject, the magenta-and-cyan ball it was trained on. The judge is told
which subject to look for: its class, its pattern and its colours (a `Description`), and answers with P(yes).
It is trained on subjects of random colours and every pattern (judge_training.py), so a subject it never saw
needs no retraining: the family of subjects (subjects.py) and a user's own are all just descriptions.

How the description reaches the network (why it generalises to colours it never saw):
- colour maps: for each described colour c_k, a map exp(-|x - c_k|^2 / 2 sigma^2) over the image, (N, 3, H, W),
  fed beside the RGB channels, so "where is colour k" is a pixel-wise fact, not something to learn per colour;
- the class and pattern (one-hot) and the colours themselves scale and shift every block's features (FiLM).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .scenes import CLASSES, SIZE, to_array
from .subjects import PATTERN_COLOURS, PATTERNS

FILE = "judge.safetensors"
MAX_COLOURS = max(PATTERN_COLOURS.values())
DESCRIPTION_DIM = len(CLASSES) + len(PATTERNS) + 4 * MAX_COLOURS  # one-hots, RGB per slot, slot-used flags
SIGMA = 0.35  # width of a colour map in [-1, 1] units (~45 RGB units): samples shift colours by about that


@dataclass(frozen=True)
class Description:
    """What the judge is asked to find: a class, a pattern and its colours (RGB, in the pattern's order)."""

    cls: str
    pattern: str
    colours: tuple[tuple[int, int, int], ...]

    def __post_init__(self):
        if self.cls not in CLASSES or self.pattern not in PATTERNS:
            raise ValueError(f"unknown class or pattern: {self.cls!r}, {self.pattern!r}")
        if len(self.colours) != PATTERN_COLOURS[self.pattern]:
            raise ValueError(f"pattern {self.pattern!r} takes {PATTERN_COLOURS[self.pattern]} colours, "
                             f"got {len(self.colours)}")


def describe(subject) -> Description:
    """The description of a family subject (subjects.Subject)."""
    return Description(subject.cls, subject.pattern, tuple(subject.colours))


def description_vector(d: Description) -> torch.Tensor:
    """(DESCRIPTION_DIM,): class one-hot, pattern one-hot, MAX_COLOURS RGB slots in [-1, 1], slot-used flags."""
    v = torch.zeros(DESCRIPTION_DIM)
    v[CLASSES.index(d.cls)] = 1
    v[len(CLASSES) + PATTERNS.index(d.pattern)] = 1
    start = len(CLASSES) + len(PATTERNS)
    for k, rgb in enumerate(d.colours):
        v[start + 3 * k:start + 3 * k + 3] = torch.tensor(rgb, dtype=torch.float32) / 127.5 - 1
        v[start + 3 * MAX_COLOURS + k] = 1
    return v


def colour_maps(x: torch.Tensor, desc: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) images and (N, DESCRIPTION_DIM) descriptions -> (N, MAX_COLOURS, H, W): how close each pixel is
    to each described colour (0 for an unused slot)."""
    start = len(CLASSES) + len(PATTERNS)
    rgb = desc[:, start:start + 3 * MAX_COLOURS].view(-1, MAX_COLOURS, 3, 1, 1)  # (N, K, 3, 1, 1)
    used = desc[:, start + 3 * MAX_COLOURS:].view(-1, MAX_COLOURS, 1, 1)  # (N, K, 1, 1)
    dist2 = ((x.unsqueeze(1) - rgb) ** 2).sum(dim=2)  # (N, K, H, W)
    return torch.exp(-dist2 / (2 * SIGMA ** 2)) * used


class FiLMBlock(nn.Module):
    """conv -> GroupNorm -> scale and shift from the description -> SiLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1)
        self.norm = nn.GroupNorm(8, cout)
        self.film = nn.Linear(DESCRIPTION_DIM, 2 * cout)

    def forward(self, h: torch.Tensor, desc: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(desc)[:, :, None, None].chunk(2, dim=1)  # (N, C, 1, 1) each
        return nn.functional.silu(self.norm(self.conv(h)) * (1 + gamma) + beta)


class SubjectJudge(nn.Module):
    """(N, 3, 32, 32) images in [-1, 1] and (N, DESCRIPTION_DIM) descriptions -> (N,) logits of "shows it"."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.width = w
        plan = [(3 + MAX_COLOURS, w, 1), (w, w, 1), (w, 2 * w, 2), (2 * w, 2 * w, 1), (2 * w, 4 * w, 2),
                (4 * w, 4 * w, 1), (4 * w, 4 * w, 2)]  # 32 -> 16 -> 8 -> 4
        self.blocks = nn.ModuleList(FiLMBlock(*p) for p in plan)
        self.head = nn.Sequential(nn.Linear(4 * w + DESCRIPTION_DIM, 64), nn.SiLU(), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor, desc: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, colour_maps(x, desc)], dim=1)
        for block in self.blocks:
            h = block(h, desc)
        return self.head(torch.cat([h.mean(dim=(2, 3)), desc], dim=1)).squeeze(1)


def save_judge(net: SubjectJudge, folder: str | Path) -> Path:
    """judge.safetensors in `folder`: fp16 weights, the width and the description layout in the header."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILE
    save_file({k: v.detach().half().contiguous() for k, v in net.state_dict().items()}, str(path),
              metadata={"config": json.dumps({"width": net.width, "classes": CLASSES, "patterns": PATTERNS})})
    return path


def load_judge(folder: str | Path) -> SubjectJudge:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(folder) / FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no judge here (built by `python -m peftbooth.world.build --only judge`)")
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    if (tuple(config["classes"]), tuple(config["patterns"])) != (CLASSES, PATTERNS):
        raise ValueError(f"{path}: made for another world (its classes or patterns differ from this version's)")
    net = SubjectJudge(config["width"])
    net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return net.eval().requires_grad_(False)


@torch.no_grad()
def p_shows(net: SubjectJudge, images: list, description: Description, batch_size: int = 256) -> np.ndarray:
    """P(the image shows the described subject), one per image (PIL images, resized to the world's size)."""
    d = description_vector(description)
    out = []
    for i in range(0, len(images), batch_size):
        batch = [im.convert("RGB").resize((SIZE, SIZE), 1) if im.size != (SIZE, SIZE) else im.convert("RGB")
                 for im in images[i:i + batch_size]]
        x = torch.from_numpy(to_array(batch))
        out.append(torch.sigmoid(net(x, d.expand(len(batch), -1))).numpy())
    return np.concatenate(out) if out else np.zeros(0)
