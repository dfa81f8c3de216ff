"""Stopping a training run cleanly: SIGINT/SIGTERM, the exception that reports it, and the multi-process exit.

The loop (train.fit) asks `StopSignals.agreed` after each optimizer step; every process stops after the same
step, writes its part of a checkpoint and raises `TrainingInterrupted`, which the CLI turns into exit code
128 + signal. `end_training` works around a hang at exit under DistributedDataParallel.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch

# With several processes, agreeing on a stop signal is a gather and a host sync; the loop asks only every this
# many optimizer steps (or fewer: at logging steps, which sync anyway, and at checkpoints), not every step.
SIGNAL_STEPS = 10
# The same signal again within this many seconds is one stop delivered twice, not a user insisting: a scheduler
# or `systemctl stop` signals every process of the job, and the `--num-processes` launcher passes its copy on too.
DUPLICATE_S = 1.0


class TrainingInterrupted(Exception):
    """SIGINT / SIGTERM: the current step was finished and a checkpoint written. `exit_code` is 128 + signal."""

    def __init__(self, signum: int, checkpoint: Path):
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"{name}: stopped after a checkpoint at {checkpoint}; "
                         "run the same command with --resume latest to continue")


def signal_interval(num_processes: int, logging_steps: int) -> int:
    """How many optimizer steps apart the processes compare stop signals: every step alone (no sync needed)."""
    return 1 if num_processes == 1 else min(logging_steps, SIGNAL_STEPS)


class StopSignals:
    """First SIGINT/SIGTERM: note it, so the loop ends after the current step with a checkpoint (with several
    processes: after the next step where they agree, at most `every` steps on). The same signal again: exit at once
    (the last complete checkpoint stays valid: checkpoints are renamed into place)."""

    def __init__(self, every: int = 1):
        self.received: int | None = None
        self.received_at = 0.0
        self.every = every
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        # the same signal again: the user insists. A different one right after (torchrun answers the terminal's
        # SIGINT by sending its workers SIGTERM) must not cut the checkpoint short.
        if self.received == signum and time.monotonic() - self.received_at > DUPLICATE_S:
            os._exit(128 + signum)
        if self.received is not None:
            return
        self.received, self.received_at = signum, time.monotonic()
        steps = "this step" if self.every == 1 else f"at most {self.every} steps"
        print(f"\n{signal.Signals(signum).name}: finishing {steps}, then writing a checkpoint "
              "(send it again to exit at once)", file=sys.stderr, flush=True)

    def agreed(self, accelerator, step: int, checkpoint_due: bool) -> int:
        """The signal to stop on after optimizer step `step` (0: none), the same on every process: a process
        that got it a step earlier must not wait in the checkpoint while the others wait in the gradient
        exchange. Alone, every step (no sync); with several processes, every `every` steps and at checkpoints."""
        received = self.received or 0
        if accelerator.num_processes > 1:
            if step % self.every and not checkpoint_due:
                return 0  # the others are not asked now: nobody stops yet
            flags = accelerator.gather(torch.tensor([received], device=accelerator.device))
            received = int(flags.max())
        return received

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def all_true(accelerator, flag: torch.Tensor) -> bool:
    """A boolean that holds on every process (a host sync; with several processes, a gather too)."""
    if accelerator.num_processes > 1:
        return bool(accelerator.gather(flag.reshape(1).float()).min() > 0)
    return bool(flag)


def end_training(accelerator, release: Callable[[], None]) -> None:
    """Accelerate's end_training (trackers closed, process group destroyed), with the DDP wrappers dropped first.

    `release` drops the caller's references to the prepared (data-parallel) models, keeping the models they wrap
    (training.setup.Run.drop_wrappers). With several processes: DDP's Reducer holds the process group. Where the Reducer is the group's last
    owner, the group's destructor waits for gloo's worker threads while holding the GIL, and a worker that needs
    the GIL to free the tensors of a finished gather never ends: seen as 1 run in 12 hanging at exit with 2 CPU
    processes (a known PyTorch pattern, pytorch/pytorch#56297). So first a barrier: every earlier collective is
    finished and freed by the workers while this thread waits without the GIL. Then the references this code and
    Accelerate hold to the wrappers are dropped while the group is still registered, so that where nothing else
    holds a wrapper, destroy_process_group (whose binding lets go of the GIL) is the group's last owner. (On rank 0
    one wrapper was seen to outlive this, referenced from outside Python's view: there the barrier is what helps.)
    After the change 20 of 20 runs exited.
    """
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        release()
        accelerator.free_memory()  # Accelerate's own references to the prepared models, optimizer and data loader
        gc.collect()
    accelerator.end_training()
