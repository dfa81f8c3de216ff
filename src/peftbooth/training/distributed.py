"""Several processes: `train --num-processes N [--nnodes M --node-rank R --master-addr A]`, the engines
peftbooth trains with, and what Accelerate is told about the model.

The launcher starts its N workers itself (static rendezvous: RANK, WORLD_SIZE, MASTER_ADDR, ... in their
environment, as torchrun's `--rdzv-backend static` does) rather than through torchrun, so that it stays the
workers' only parent and decides what they are sent. torchrun answers a worker's exit by sending SIGTERM to the
others, and SIGKILL 30 s later: a rank still releasing the output folder's lock, or still inside a long
checkpoint, was cut short. Here a stop signal reaches every worker exactly once; they agree on a step, write one
checkpoint and exit with the signal's code, which the launcher returns, as a single process does.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..config.sections import UsageError

# flag -> number of values it takes; dropped from the workers' command (they read the environment instead)
LAUNCHER_FLAGS = {"--num-processes": 1, "--nnodes": 1, "--node-rank": 1, "--master-addr": 1, "--master-port": 1}
DEFAULT_PORT = 29500  # torchrun's and Accelerate's
# After a worker fails, the others are blocked in a collective that will never complete: they get this long to
# exit on their own (they may have failed for the same reason), then SIGKILL. After a stop signal the first
# worker leaves only once the checkpoint is complete (a barrier), so the rest follow within seconds.
GRACE_S = 30.0

FSDP_REFUSED = ("FSDP is not supported (Accelerate's FSDP config, ACCELERATE_USE_FSDP): the adapters are a few MB, "
                "so sharding saves nothing, and checkpoints assume whole tensors on every rank; use data parallelism "
                "(DDP): --num-processes N, or accelerate launch --config_file examples/accelerate/multi_gpu.yaml")
DEEPSPEED_REFUSED = ("DeepSpeed is not supported (Accelerate's DeepSpeed config, ACCELERATE_USE_DEEPSPEED): it takes one "
                     "model per run where peftbooth trains two with --train-text-encoder, and ZeRO shards the "
                     "optimizer state that checkpoints save whole; use data parallelism (DDP): --num-processes N, "
                     "or accelerate launch --config_file examples/accelerate/multi_gpu.yaml")


def add_launcher_flags(p) -> None:
    p.add_argument("--num-processes", type=int, default=1,
                   help="data-parallel processes on this machine (like accelerate launch --num_processes)")
    p.add_argument("--nnodes", type=int, default=1, help="machines taking part (run the same command on each, "
                   "with its own --node-rank); see docs/distributed.md")
    p.add_argument("--node-rank", type=int, default=0, help="this machine's number, 0 to --nnodes - 1")
    p.add_argument("--master-addr", default=None, help="address of machine 0, which every machine can reach "
                   "(needed with --nnodes > 1)")
    p.add_argument("--master-port", type=int, default=None,
                   help=f"a free port on machine 0 (default {DEFAULT_PORT} with --nnodes > 1, else any free port)")


def world_size(args) -> int:
    """Processes of the whole run from the launcher flags (checked: UsageError naming the flag)."""
    if args.num_processes < 1:
        raise UsageError(f"--num-processes must be >= 1 (got {args.num_processes})")
    if args.nnodes < 1:
        raise UsageError(f"--nnodes must be >= 1 (got {args.nnodes})")
    if not 0 <= args.node_rank < args.nnodes:
        raise UsageError(f"--node-rank must be from 0 to --nnodes - 1 = {args.nnodes - 1} (got {args.node_rank})")
    if args.nnodes > 1 and not args.master_addr:
        raise UsageError("--nnodes > 1 needs --master-addr: the address of the machine with --node-rank 0")
    if args.master_port is not None and not 1 <= args.master_port <= 65535:
        raise UsageError(f"--master-port must be from 1 to 65535 (got {args.master_port})")
    return args.num_processes * args.nnodes


def worker_argv(argv: list[str]) -> list[str]:
    """The command line without the launcher's flags (`--flag V` or `--flag=V`)."""
    rest, skip = [], 0
    for a in argv:
        if skip:
            skip -= 1
        elif a in LAUNCHER_FLAGS:
            skip = LAUNCHER_FLAGS[a]
        elif a.split("=", 1)[0] not in LAUNCHER_FLAGS:
            rest.append(a)
    return rest


def worker_env(args, local_rank: int, port: int) -> dict[str, str]:
    from ..precision import default_device

    env = dict(os.environ)
    if default_device().type == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"  # Accelerate joins CPU processes (gloo) only when told to use the CPU
    env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun does: N processes must not each take every core
    env.update(RANK=str(args.node_rank * args.num_processes + local_rank), LOCAL_RANK=str(local_rank),
               WORLD_SIZE=str(world_size(args)), LOCAL_WORLD_SIZE=str(args.num_processes),
               GROUP_RANK=str(args.node_rank), MASTER_ADDR=args.master_addr or "127.0.0.1", MASTER_PORT=str(port))
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, argv: list[str], output_dir: Path) -> int:
    """Run this command as this machine's share of the run's processes; return what a single process would.

    Every worker is in a session of its own, so a terminal's Ctrl-C reaches the launcher alone and is passed on
    once (a second copy would mean 'exit at once' to a worker). SIGINT and SIGTERM are passed on as they are,
    SIGHUP (the terminal closed) as SIGTERM.
    """
    port = args.master_port or (DEFAULT_PORT if args.nnodes > 1 else free_port())
    cmd = [sys.executable, "-m", "peftbooth", *worker_argv(argv)]
    workers = [subprocess.Popen(cmd, env=worker_env(args, i, port), start_new_session=True)
               for i in range(args.num_processes)]
    sent: list[int] = []

    def pass_on(signum, frame):
        sig = signal.SIGTERM if signum == signal.SIGHUP else signum
        sent.append(sig)
        for w in workers:
            if w.poll() is None:
                w.send_signal(sig)

    previous = {s: signal.signal(s, pass_on) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        codes = supervise(workers, sent)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for w in workers:  # only reached with workers left by an exception in the launcher itself
            if w.poll() is None:
                w.kill()
                w.wait()
        from .checkpoint import release_lock_of

        release_lock_of(output_dir, [w.pid for w in workers])  # a worker that had to be killed held it
    return exit_code(codes, sent)


def supervise(workers: list[subprocess.Popen], sent: list[int]) -> list[int]:
    """Wait for every worker; once one has failed (or left after a stop signal), give the rest GRACE_S, then
    SIGKILL. Returns their exit codes (negative: killed by that signal)."""
    deadline = None
    while any(w.poll() is None for w in workers):
        ended = [w.returncode for w in workers if w.returncode is not None]
        if deadline is None and any(c != 0 for c in ended):
            deadline = time.monotonic() + GRACE_S
        if deadline is not None and time.monotonic() > deadline:
            for w in workers:
                if w.poll() is None:
                    print(f"peftbooth train: worker {w.pid} did not exit {GRACE_S:.0f} s after another one "
                          "ended; killing it", file=sys.stderr, flush=True)
                    w.kill()
        time.sleep(0.1)
    return [w.returncode for w in workers]


def exit_code(codes: list[int], sent: list[int]) -> int:
    """0 when every worker finished; 128 + signal when a signal passed on stopped them (as one process exits);
    else the first failure's code (a worker killed by signal s: 128 + s)."""
    codes = [128 - c if c < 0 else c for c in codes]
    if all(c == 0 for c in codes):
        return 0
    stopped = {128 + s for s in sent}
    failures = [c for c in codes if c and c not in stopped]
    return failures[0] if failures else next(c for c in codes if c)


# ---------------------------------------------------------------------------------------------------------------
# engines and Accelerate's kwargs


def check_engine(environ=os.environ) -> None:
    """Refuse Accelerate's FSDP and DeepSpeed (what `accelerate launch --config_file` sets) before any work."""
    if environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise UsageError(FSDP_REFUSED)
    if environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise UsageError(DEEPSPEED_REFUSED)


def uses_module_dropout(cfg) -> bool:
    parts = [cfg.unet_adapter] + ([cfg.text_encoder_adapter] if cfg.train.train_text_encoder else [])
    return any(p.adapter in ("loha", "lokr") and (p.module_dropout or 0) > 0 for p in parts)


def accelerator_kwargs(cfg) -> dict:
    """Extra arguments of `Accelerator(...)` for this run (`cfg` resolved).

    LoHa/LoKr module dropout skips a whole layer's update for a step: its weights get no gradient, and
    DistributedDataParallel, unless told to look for such weights, waits for them and fails at the next step.
    Every rank tosses the same coins (PEFT draws them from the global torch RNG, which every rank seeds and
    advances alike), so the same layers are skipped on all ranks, as one process with the global batch skips them;
    a weight skipped everywhere keeps no gradient and AdamW leaves it, as it does in one process. The search
    for unused weights costs a walk over the autograd graph each step, so only runs with module dropout pay it.
    """
    from accelerate.utils import DistributedDataParallelKwargs

    if uses_module_dropout(cfg):
        return {"kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=True)]}
    return {}
