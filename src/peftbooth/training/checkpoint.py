"""Checkpoints that survive crashes, exact resume, and the output-folder lock.

A checkpoint is a folder `OUTPUT/checkpoints/checkpoint-NNNNNN/` holding everything that determines the rest
of the run: adapter weights (safetensors) and, with --ema-decay, their moving average; optimizer, lr scheduler
and grad-scaler state, every RNG state, the position in the data, and the config it was made with. It is
written into a hidden temp folder, fsynced and renamed (runs/atomic.py), so a `checkpoint-N` folder is always
complete; older ones are pruned only after a new one is complete.

A :class:`Checkpointer` writes a list of :class:`Stateful` components (torchtitan's shape): each saves and loads
its own files, so the checkpoint knows no model, optimizer or average, only that they have state.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import socket
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..config.dicts import to_dict
from ..config.sections import TrainConfig, UsageError
from ..runs.atomic import fsync_path, fsync_tree, replace
from ..runs.rundir import ADAPTER_WEIGHTS, CHECKPOINTS_DIR, DENOISERS
from . import ema as ema_file

CHECKPOINTS = CHECKPOINTS_DIR  # OUT/checkpoints/ (the run folder's layout is rundir's)
NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"  # written last inside the temp folder
REQUIRED = ("optimizer.pt", "state.pt", STATE_FILE)  # and the denoiser's adapter weights (is_complete)
LOCK = ".peftbooth.lock"

# Config fields that may change between a run and its resume without changing what is trained.
RESUME_FREE = {
    "train.output_dir", "train.overwrite", "train.resume", "train.resume_force", "train.logging_steps",
    "train.report_to", "train.checkpointing_steps", "train.checkpoints_total_limit", "train.push_to_hub",
    "train.validation_prompt", "train.validation_steps", "train.num_validation_images", "train.nan_policy",
    "train.compile", "train.compile_mode", "train.channels_last", "train.factored_lycoris",
    "data.dataloader_num_workers", "data.sample_batch_size", "data.class_image_steps", "data.class_data_dir",
}


class CheckpointError(Exception):
    """A checkpoint could not be written (disk full, permissions); the previous one is intact."""


@dataclass
class TrainState:
    """Where the loop stands: optimizer steps done, and the epoch / micro-batches consumed in that epoch; and what
    the run has recorded so far, so that a run stopped and resumed reports as one run (train_stats.json, report)."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    loss_history: list = field(default_factory=list)  # [[step, logged loss], ...] of every segment so far
    seconds: float = 0.0  # training time so far, all segments, validation sampling left out (set at checkpoints)
    validation_seconds: float = 0.0  # time spent sampling validation images so far, all segments
    segments: int = 1  # starts whose work this state continues: 1 + the resumes
    # the step the history and times are counted from: 0, or the step of a checkpoint written by a version that did
    # not carry them (0.1.0), whose earlier history is unknown
    history_from: int = 0

    @classmethod
    def resumed(cls, saved: dict) -> "TrainState":
        """The state a run resumes with from a checkpoint's training_state.json: one segment more."""
        step = saved["step"]
        if "loss_history" not in saved:  # an older checkpoint: the run is counted from here on, with at least the
            return cls(step, saved["epoch"], saved["position"], segments=2, history_from=step)  # segment before
        return cls(step, saved["epoch"], saved["position"], [[int(s), float(v)] for s, v in saved["loss_history"]],
                   float(saved["seconds"]), float(saved["validation_seconds"]), int(saved["segments"]) + 1,
                   int(saved["history_from"]))


# ---------------------------------------------------------------------------------------------------------------
# what a checkpoint must match


def data_fingerprint(instance_paths: list[Path]) -> str:
    """sha256 over the instance images' names and bytes and their captions: 'the same photos'."""
    h = hashlib.sha256()
    for p in instance_paths:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
        caption = p.with_suffix(".txt")
        if caption.exists():
            h.update(b"caption\0" + caption.read_bytes())
    return h.hexdigest()


def flat(cfg_dict: dict) -> dict:
    return {f"{section}.{k}": v for section, values in cfg_dict.items() for k, v in values.items()}


def differing_fields(saved: dict, current: dict) -> list[str]:
    """Names of resolved-config fields that differ and matter for what is trained."""
    a, b = flat(saved), flat(current)
    free = set(RESUME_FREE)
    if not a.get("train.train_text_encoder") and not b.get("train.train_text_encoder"):
        free |= {k for k in a.keys() | b.keys() if k.startswith("text_encoder_adapter.")}  # not trained: moot
    return sorted(k for k in a.keys() | b.keys() if k not in free and a.get(k) != b.get(k))


# ---------------------------------------------------------------------------------------------------------------
# finding checkpoints


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if not missing_files(p)]


def missing_files(path: Path) -> list[str]:
    """What a complete checkpoint folder has and `path` lacks: the denoiser's adapter (unet/, or transformer/ for
    SD3), the optimizer, the RNG and loop state."""
    denoiser = [f"{d}/{ADAPTER_WEIGHTS}" for d in DENOISERS]
    missing = [r for r in REQUIRED if not (path / r).is_file()]
    return missing + ([] if any((path / d).is_file() for d in denoiser) else [" or ".join(denoiser)])


def resolve_resume(resume: str, output_dir: Path) -> Path:
    """--resume latest|PATH -> a complete checkpoint folder, or UsageError."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        for path in reversed(found):
            try:
                json.loads((path / STATE_FILE).read_text())
                return path
            except (OSError, ValueError):
                warnings.warn(f"--resume latest: skipping unreadable checkpoint {path}", stacklevel=2)
        raise UsageError(f"--resume latest: no complete checkpoint in {output_dir / CHECKPOINTS}")
    path = Path(resume)
    missing = missing_files(path)
    if not path.is_dir() or missing:
        raise UsageError(f"--resume {resume}: not a complete peftbooth checkpoint"
                         + (f" (missing {', '.join(missing)})" if path.is_dir() else " (no such folder)"))
    return path


def check_compatible(path: Path, cfg: TrainConfig, fingerprint: str, force: bool,
                     world_size: int | None = None) -> None:
    """Refuse a checkpoint made with another config or other photos (naming what differs) unless forced.

    `world_size`: the run's number of processes; None: this process's (WORLD_SIZE). The launcher checks before
    its workers exist, so it passes the number it is about to start."""
    saved = json.loads((path / STATE_FILE).read_text())
    diffs = differing_fields(saved["config"], to_dict(cfg))
    if saved.get("data_fingerprint") != fingerprint:
        diffs.append("instance images (files or captions changed)")
    # the position in the data is counted in micro-batches of every process: another world size lands elsewhere
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    if saved.get("num_processes", 1) != world:
        diffs.append(f"number of processes ({saved.get('num_processes', 1)} then, {world} now)")
    if diffs and not force:
        raise UsageError(f"--resume {path}: made with a different setup ({', '.join(diffs)}); "
                         "pass --resume-force to resume anyway")


# ---------------------------------------------------------------------------------------------------------------
# RNG state


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        # numpy's state holds an ndarray: stored as a tensor so the file loads with weights_only=True
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "cuda_device": torch.cuda.current_device() if torch.cuda.is_available() else -1,  # the one it draws from
    }


def process_rng_state(path: Path, process_index: int) -> dict:
    """The RNG states process `process_index` resumes with: its own file, or for a process added under
    --resume-force, the state it would have had in a run with that many processes.

    Every rank seeds its generators alike and draws the same amounts, so all ranks' CPU streams are equal (a
    2-process checkpoint's rng-0.pt and rng-1.pt match): rank 0's are the added process's too, and PEFT's
    module-dropout coin stays the same on every rank. Its GPU stream is another matter: each rank draws from its
    own device's generator, and rank 0's file holds the added process's device only as rank 0 saw it, never drawn
    from (the seed's first numbers again). The added process takes rank 0's own device's state for its device.
    """
    own = path / f"rng-{process_index}.pt"
    if own.is_file():
        return torch.load(own, weights_only=True)
    state = torch.load(path / "rng-0.pt", weights_only=True)
    cuda = list(state["cuda"])
    if cuda and torch.cuda.is_available():
        mine, theirs = torch.cuda.current_device(), max(int(state.get("cuda_device", 0)), 0)
        if mine < len(cuda) and theirs < len(cuda):
            cuda[mine] = cuda[theirs]
    return {**state, "cuda": cuda}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, key, *rest = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------------------
# writing and reading


class Stateful(Protocol):
    """A component whose state a checkpoint holds, in files of its own inside the checkpoint folder."""

    def save(self, folder: Path) -> None: ...

    def load(self, folder: Path) -> None: ...


@dataclass
class OptimizerState:
    """The optimizer's, the lr schedule's and the fp16 grad scaler's state (optimizer.pt, state.pt). The scaler is
    looked up on the accelerator when saving and loading: Accelerate keeps it there."""

    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    accelerator: object

    def save(self, folder: Path) -> None:
        torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
        scaler = getattr(self.accelerator, "scaler", None)
        torch.save({"lr_scheduler": self.lr_scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None}, folder / "state.pt")

    def load(self, folder: Path) -> None:
        # weights_only=True: these files are read without unpickling arbitrary objects; on the CPU (torch.load
        # cannot map to "cpu:0" either): load_state_dict moves the state to its parameters' device
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
        extra = torch.load(folder / "state.pt", weights_only=True)
        self.lr_scheduler.load_state_dict(extra["lr_scheduler"])
        scaler = getattr(self.accelerator, "scaler", None)
        if extra["scaler"] is not None and scaler is not None:
            scaler.load_state_dict(extra["scaler"])


@dataclass
class EMAState:
    """--ema-decay's moving average (ema.safetensors)."""

    ema: ema_file.AdapterEMA

    def save(self, folder: Path) -> None:
        self.ema.save(folder / ema_file.FILE)

    def load(self, folder: Path) -> None:
        if (folder / ema_file.FILE).is_file():
            self.ema.load(folder / ema_file.FILE)
        else:  # only reachable with --resume-force: the checkpoint's run had no --ema-decay
            warnings.warn(f"--resume {folder}: the checkpoint has no {ema_file.FILE}; the moving average starts "
                          "from its weights", stacklevel=2)
            self.ema.restart()


@dataclass
class Checkpointer:
    """Writes and reads a run's checkpoints: `parts` (the components whose state continues the run: adapters,
    their average, optimizer) are written by the main process, every process adds its own RNG streams, and
    `record` (config, data fingerprint, number of processes) goes beside the loop's TrainState."""

    accelerator: object
    output_dir: Path
    parts: list[Stateful]
    record: dict
    total_limit: int = 0  # --checkpoints-total-limit; 0 keeps them all

    def save(self, state: TrainState) -> Path:
        """Write checkpoint-<step> atomically, then prune beyond the limit. Returns its path."""
        acc = self.accelerator
        root = self.output_dir / CHECKPOINTS
        final = root / f"checkpoint-{state.step:06d}"
        tmp = root / f".tmp-checkpoint-{state.step:06d}"  # one folder that every process writes into
        previous = list_checkpoints(self.output_dir)
        try:
            if acc.is_main_process:
                root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier write of this step
                tmp.mkdir()
            acc.wait_for_everyone()
            # every process keeps its own RNG streams
            torch.save(rng_state(), tmp / f"rng-{acc.process_index}.pt")
            if acc.is_main_process:
                for part in self.parts:
                    part.save(tmp)
                (tmp / STATE_FILE).write_text(json.dumps({**asdict(state), **self.record}, indent=1))
            acc.wait_for_everyone()
            if acc.is_main_process:
                fsync_tree(tmp)
                replace(tmp, final)
                fsync_path(root)
            # nobody leaves before the checkpoint is in place: after a stop signal a process that exits early
            # makes the launcher stop the rest, the writer included
            acc.wait_for_everyone()
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError, not OSError
            shutil.rmtree(tmp, ignore_errors=True)
            kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
            why = getattr(e, "strerror", None) or str(e).strip().splitlines()[0]
            raise CheckpointError(f"could not write the checkpoint of step {state.step} in {root} "
                                  f"({why}); {kept}") from e
        if acc.is_main_process and self.total_limit:
            for old in list_checkpoints(self.output_dir)[: -self.total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def load(self, path: Path) -> TrainState:
        """Restore every part and this process's RNG streams from `path`; return where the loop stands."""
        for part in self.parts:
            part.load(path)
        set_rng_state(process_rng_state(path, self.accelerator.process_index))
        return TrainState.resumed(json.loads((path / STATE_FILE).read_text()))


# ---------------------------------------------------------------------------------------------------------------
# the output-folder lock


def acquire_lock(output_dir: Path) -> Path:
    """Claim the output folder for this process; refuse one in use by a live run, take over a stale lock."""
    lock = output_dir / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    # the lock appears with its contents or not at all: written beside it, then hard-linked into place (the link
    # fails if a lock exists), so no other run can read a half-written lock and take it for stale
    tmp = output_dir / f".peftbooth.lock.{os.getpid()}"
    tmp.write_text(json.dumps(me))
    try:
        for _ in range(3):
            try:
                os.link(tmp, lock)
                return lock
            except FileExistsError:
                pass
            try:
                holder = json.loads(lock.read_text())
            except FileNotFoundError:
                continue  # released meanwhile: try again
            except (OSError, ValueError):
                raise UsageError(f"--output-dir {output_dir}: its lock {lock} is unreadable; if no run uses the "
                                 "folder, delete the lock") from None
            if holder.get("host") != me["host"]:
                raise UsageError(f"--output-dir {output_dir}: in use by a run on host {holder.get('host')} "
                                 f"(pid {holder.get('pid')}); if it is gone, delete {lock}")
            if holder.get("pid") != me["pid"] and _alive(holder.get("pid", -1)):
                raise UsageError(f"--output-dir {output_dir}: in use by another run (pid {holder['pid']}); "
                                 f"wait for it or choose another folder")
            lock.unlink(missing_ok=True)  # stale: its process is gone (or it is this very process)
        raise UsageError(f"--output-dir {output_dir}: could not take the lock {lock}; try again")
    finally:
        tmp.unlink(missing_ok=True)


def release_lock_of(output_dir: Path, pids: list[int]) -> None:
    """The launcher's clean-up: remove the lock of a worker of its own that is gone (killed before releasing it)."""
    lock = output_dir / LOCK
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return
    if holder.get("host") == socket.gethostname() and holder.get("pid") in pids and not _alive(holder["pid"]):
        lock.unlink(missing_ok=True)


def release_lock(lock: Path | None) -> None:
    if lock is None:
        return
    try:
        if json.loads(lock.read_text()).get("pid") == os.getpid():
            lock.unlink()
    except (OSError, ValueError):
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
