"""What every stage of the world build shares (`python -m peftbooth.world.build`): the timestamped progress log
and the warm-up + cosine learning-rate schedule of its training loops."""

from __future__ import annotations

import math
import time


def log(msg: str) -> None:
    print(f"[world {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cosine_lr(step: int, total: int, base: float, warmup: int = 100, floor: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
