"""Runs on disk: what state each is in, how far it got, and the queue that starts `peftbooth train` one at a time.

Everything is read back from the run folders, so the page (and a restarted `peftbooth ui`) sees the same thing
the training process wrote:

* ``RUN/config.yaml``: written by the UI before the run starts; ``peftbooth train --config RUN/config.yaml``
  repeats the run from the command line.
* ``RUN/ui/job.json``: the UI's note of the job (queued / started, its pid, whether it resumes, exit code).
* ``RUN/ui/train.log``: the training process's output; its last progress bar gives step / total, it/s and the
  time left.
* ``RUN/logs/`` (TensorBoard events: the loss curve), ``RUN/validation/step_N/``, ``RUN/checkpoints/``,
  ``RUN/unet/`` (the finished-run marker), ``RUN/report.html``: written by training itself.

Training runs in its own session (``start_new_session``): a Ctrl-C or crash of the UI does not reach it, and a
restarted UI finds it by its pid (and the run folder's lock) and shows it running.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..config.sections import UsageError
from ..runs.atomic import hide
from ..runs.rundir import ADAPTER_WEIGHTS, RunDir, read_warning, step_dir, validation_steps_on_disk
from ..training.checkpoint import LOCK, list_checkpoints
from .files import UI_DIR, atomic_write

JOB = "job.json"
LOG = "train.log"
FINISHED = Path("unet") / ADAPTER_WEIGHTS  # the finished-run marker (RunDir.is_finished)
INTERRUPTED = (130, 143)  # 128 + SIGINT / SIGTERM: a checkpoint was written, Resume continues


# ---------------------------------------------------------------------------------------------------------------
# job file


def read_job(run: Path) -> dict:
    try:
        return json.loads((run / UI_DIR / JOB).read_text())
    except (OSError, ValueError):
        return {}


def write_job(run: Path, job: dict) -> None:
    (run / UI_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write(run / UI_DIR / JOB, json.dumps(job, indent=1))


def alive(pid) -> bool:
    """A live `peftbooth train` process with this pid (a reused pid of another program does not count)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return True  # no /proc (macOS): the signal check has to do
    return state != "Z" and b"peftbooth" in b" ".join(cmd) and b"train" in cmd


def running_pid(run: Path) -> int | None:
    """The pid training this run: the UI's job, or any `peftbooth train` holding the folder's lock (a CLI run)."""
    pid = read_job(run).get("pid")
    if alive(pid):
        return pid
    try:
        pid = json.loads((run / LOCK).read_text()).get("pid")
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def state_of(run: Path) -> str:
    """draft | queued | running | stopping | stopped | failed | finished (ready: a config nobody started)."""
    job = read_job(run)
    if job.get("state") == "queued":
        return "queued"
    if running_pid(run):
        return "stopping" if job.get("stop_requested") else "running"
    if RunDir(run).is_finished():
        return "finished"
    if list_checkpoints(run):
        return "stopped"
    if job.get("state") in ("started", "done"):
        return "failed"  # ended (or vanished) without a checkpoint or adapters
    if job.get("state") == "cancelled" or RunDir(run).config_file.is_file():
        return "ready"
    return "draft"


# ---------------------------------------------------------------------------------------------------------------
# progress


# tqdm's bar: 'train:  40%|####      | 4/10 [00:01<00:02,  2.50it/s, loss=0.1, lr=1e-4]'
BAR = re.compile(r"(?P<desc>[\w ]+):\s+\d+%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)\s+\[(?P<elapsed>[\d:]+)<"
                 r"(?P<left>[\d:?]+),\s*(?P<rate>[\d.?]+)(?P<unit>it/s|s/it)")


def seconds(text: str) -> float | None:
    if "?" in text:
        return None
    total = 0.0
    for part in text.split(":"):
        total = total * 60 + float(part)
    return total


def log_tail(run: Path, nbytes: int = 65536) -> str:
    try:
        with open(run / UI_DIR / LOG, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - nbytes))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


COMMAND = "\n$ "  # the queue writes '$ peftbooth train ...' into the log before each process it starts


def last_bar(text: str) -> dict | None:
    """The last progress bar of the latest process in a log: {phase, step, total, it_s, seconds_left}."""
    text = text.rsplit(COMMAND, 1)[-1]  # a resumed run's new process, not the bars of the one before
    for line in reversed(re.split(r"[\r\n]", text)):
        m = BAR.search(line)
        if m:
            rate = None if "?" in m["rate"] else float(m["rate"])
            if rate is not None and m["unit"] == "s/it":
                rate = 1.0 / rate if rate else None
            return {"phase": m["desc"].strip(), "step": int(m["n"]), "total": int(m["total"]), "it_s": rate,
                    "seconds_left": seconds(m["left"])}
    return None


def log_lines(text: str, n: int = 12) -> list[str]:
    """The last lines of output, progress-bar redraws collapsed to their latest state."""
    lines = [seg.rstrip() for line in text.split("\n") for seg in line.split("\r")[-1:]]
    return [line for line in lines if line.strip()][-n:]


_loss_cache: dict[Path, tuple[tuple, list]] = {}


def loss_curve(run: Path) -> list[list[float]]:
    """[[step, loss], ...] from the TensorBoard events training writes (flushed at every logging step)."""
    logs = run / "logs"
    files = sorted(logs.rglob("events.out.tfevents.*")) if logs.is_dir() else []
    if not files:
        return []
    key = tuple((str(f), f.stat().st_size) for f in files)
    cached = _loss_cache.get(run)
    if cached and cached[0] == key:
        return cached[1]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[int, float] = {}
    for folder in sorted({f.parent for f in files}):
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 1, "tensors": 1})
        acc.Reload()
        if "loss" in acc.Tags().get("scalars", []):
            points.update({e.step: e.value for e in acc.Scalars("loss")})  # a resumed run's events follow on
    curve = [[s, points[s]] for s in sorted(points)]
    _loss_cache[run] = (key, curve)
    return curve


def load_config(run: Path) -> dict:
    """The run's config.yaml; {} when it is missing or broken (the list must still show the run)."""
    return RunDir(run).read_config()


def summary(run: Path, queue: list[str]) -> dict:
    """One row of the runs list."""
    cfg = load_config(run)
    state = state_of(run)
    config_file = RunDir(run).config_file
    started = (config_file if config_file.exists() else run).stat().st_mtime
    return {
        "name": run.name, "state": state,
        "model": (cfg.get("model") or {}).get("model"),
        "adapter": (cfg.get("unet_adapter") or {}).get("adapter"),
        "steps": (cfg.get("train") or {}).get("max_train_steps"),
        "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)), "time": started,
        "queue_position": queue.index(run.name) + 1 if run.name in queue else None,
    }


def validation_prompts(run: Path) -> list[str]:
    """The prompts of the validation rows: training writes them to validation/prompts.json (prompt{j}_... is
    prompt j); the run's config as a fallback for a run from before that file."""
    try:
        prompts = json.loads((run / "validation" / "prompts.json").read_text())
    except (OSError, ValueError):
        prompts = (load_config(run).get("train") or {}).get("validation_prompt") or []
    return [str(p) for p in prompts] if isinstance(prompts, list) else []


def prompt_of(image: str, prompts: list[str]) -> str:
    m = re.match(r"prompt(\d+)_", image)
    return prompts[int(m.group(1))] if m and int(m.group(1)) < len(prompts) else ""


def progress(run: Path) -> dict:
    """Step / total, it/s, time left, loss curve, validation images, checkpoints and the log's last lines."""
    cfg = load_config(run)
    total = (cfg.get("train") or {}).get("max_train_steps")
    text = log_tail(run)
    bar = last_bar(text)
    checkpoints = [int(p.name.rsplit("-", 1)[-1]) for p in list_checkpoints(run)]
    stats = RunDir(run).read_stats() or {}
    state = state_of(run)
    live = state in ("running", "stopping")
    training = bool(bar and bar["phase"] == "train")
    step = bar["step"] if training else (checkpoints[-1] if checkpoints else 0)
    if state == "finished":
        step = stats.get("steps", total)
    prompts = validation_prompts(run)
    validation = []
    for s in validation_steps_on_disk(run):
        images = sorted(p.name for p in step_dir(run, s).glob("prompt*.png"))
        validation.append({"step": s, "images": [f"validation/step_{s}/{n}" for n in images],
                           "prompts": [prompt_of(n, prompts) for n in images]})
    job = read_job(run)
    return {
        "state": state, "step": step, "total": total,
        # before the first train bar a live run is loading, or making class images: no step rate or time left
        # belongs to it then ("0:00 left" beside "step 0" was the class images' own bar)
        "phase": (bar["phase"] if bar else "starting") if live else None,
        "phase_step": bar["step"] if bar else None, "phase_total": bar["total"] if bar else None,
        # a stopped or failed run has no rate any more; a finished one shows its average (train_stats.json)
        "it_s": (bar["it_s"] if training else None) if live else stats.get("it_s") if state == "finished" else None,
        "seconds_left": bar["seconds_left"] if live and training else None,
        # Stop pressed before step 1: the signal waits for the first step (see Queue.stop)
        "stop_waits": bool(state == "stopping" and job.get("stop_pending")),
        "loss": loss_curve(run), "validation": validation, "checkpoints": checkpoints,
        "validation_warning": read_warning(run),  # samples that stopped changing: the report says it too
        "log": log_lines(text), "report": RunDir(run).report_file.is_file(),
        "returncode": job.get("returncode"),
    }


# ---------------------------------------------------------------------------------------------------------------
# the queue


class Queue:
    """One training process at a time; the others wait in the order they were queued (their job.json says so).

    A thread looks every `interval` seconds: it notes the exit code of a process it started, and starts the
    oldest queued run when no run in the runs folder is training.
    """

    def __init__(self, runs_dir: Path, interval: float = 0.5):
        self.runs_dir = runs_dir
        self.interval = interval
        self.children: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="peftbooth-ui-queue", daemon=True)

    def runs(self) -> list[Path]:
        if not self.runs_dir.is_dir():
            return []
        return sorted((p for p in self.runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: p.name)

    def queued(self) -> list[str]:
        """Names of the queued runs, oldest first."""
        jobs = [(read_job(p), p.name) for p in self.runs()]
        return [name for _, name in sorted((j.get("queued_at", 0), n) for j, n in jobs if j.get("state") == "queued")]

    def enqueue(self, run: Path, resume: bool) -> None:
        with self.lock:
            write_job(run, {"state": "queued", "resume": resume, "queued_at": time.time()})
        # started by the queue's thread within `interval` seconds, never from a request's own thread

    def delete(self, run: Path) -> None:
        """Remove a run folder that nothing trains or waits to train: moved to a hidden name first (one atomic
        rename, so the list never shows half a folder), then removed."""
        with self.lock:  # the queue's thread takes the same lock before it starts a run
            state = state_of(run)
            if state in ("running", "stopping", "queued"):
                raise UsageError(f"run {run.name}: {state}; stop it before deleting it")
            hidden = hide(run)
        shutil.rmtree(hidden, ignore_errors=True)

    def stop(self, run: Path) -> str:
        """Queued: leave the queue. Training: SIGINT, so it finishes the step, writes a checkpoint, exits 130.

        Training only checkpoints on a signal once its loop runs (from step 1 on); before that (loading, class
        images, the step-0 samples) a signal would end it with nothing to resume, so the signal waits, in the
        job file, until the progress bar shows a step done.
        """
        with self.lock:
            job = read_job(run)
            if job.get("state") == "queued":
                write_job(run, {**job, "state": "cancelled"})
                return "cancelled"
            if not running_pid(run):
                return "not running"
            write_job(run, {**job, "stop_requested": True, "stop_pending": True})
            self._signal_stop(run)
            return "stopping"

    def _signal_stop(self, run: Path) -> None:
        job = read_job(run)
        pid = running_pid(run)
        bar = last_bar(log_tail(run))
        in_loop = bar is not None and bar["phase"] == "train" and bar["step"] >= 1
        if pid and (in_loop or not (run / UI_DIR / LOG).is_file()):  # a CLI run: no log to tell, signal now
            os.kill(pid, signal.SIGINT)
            write_job(run, {**job, "stop_pending": False})

    def tick(self) -> None:
        with self.lock:
            for name, proc in list(self.children.items()):
                code = proc.poll()
                if code is not None:
                    run = self.runs_dir / name
                    write_job(run, {**read_job(run), "state": "done", "returncode": code, "ended_at": time.time()})
                    del self.children[name]
            busy = [p for p in self.runs() if running_pid(p)]
            for p in busy:
                if read_job(p).get("stop_pending"):
                    self._signal_stop(p)
            if busy:
                return
            queued = self.queued()
            if queued:
                self._start(self.runs_dir / queued[0])

    def _start(self, run: Path) -> None:
        job = read_job(run)
        cmd = [sys.executable, "-m", "peftbooth", "train", "--config", str(RunDir(run).config_file)]
        if job.get("resume"):
            cmd += ["--resume", "latest"]
        log = open(run / UI_DIR / LOG, "ab")
        try:
            log.write(f"{COMMAND}peftbooth {' '.join(cmd[3:])}\n".encode())
            log.flush()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    cwd=str(run), start_new_session=True)
        finally:
            log.close()
        self.children[run.name] = proc
        write_job(run, {"state": "started", "resume": bool(job.get("resume")), "pid": proc.pid,
                        "queued_at": job.get("queued_at"), "started_at": time.time(), "command": cmd[1:]})

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception as e:  # noqa: BLE001 - the queue must outlive one bad run folder
                print(f"peftbooth ui: queue: {type(e).__name__}: {e}", file=sys.stderr)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self._stop.set()
