"""What every stage of the world build shares (`python -m peftbooth.world.build`): the timestamped progress log
and the warm-up + cosine learning-rate schedule of its training loops."""

from __future__ import annotations

import math
import time
from pathlib import Path


def log(msg: str) -> None:
    print(f"[world {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cosine_lr(step: int, total: int, base: float, warmup: int = 100, floor: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


class StageClock:
    """A build's stage times: `clock(name, made)` records the seconds since the last stage in record["seconds"];
    a stage loaded from --work-dir (made False) reports the time it took when it was made there (NAME.seconds)."""

    def __init__(self, work: Path, record: dict):
        self.work, self.record, self.t = work, record, time.perf_counter()

    def restart(self) -> None:
        self.t = time.perf_counter()

    def __call__(self, name: str, made: bool = True) -> None:
        seconds = round(time.perf_counter() - self.t, 1)
        kept = self.work / f"{name}.seconds"
        if made or not kept.exists():
            kept.write_text(f"{seconds}\n")
        self.record["seconds"][name] = float(kept.read_text())
        self.t = time.perf_counter()
        # a kept stage is reused silently otherwise: say so, and how to make it again (e.g. after changing its code)
        where = "" if made else f" (kept in {self.work} by an earlier run: remove its {name} files to make it again)"
        log(f"stage {name} done in {seconds:.0f} s{where}")
