"""The `--num-processes` launcher: signals to it stop every worker with a checkpoint and leave nothing running,
its own checkpoints resume under it, and its flags; DDP with LoHa module dropout; refused engines."""

import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from conftest import draw_photos
from safetensors.torch import load_file

from peftbooth.training.checkpoint import LOCK, list_checkpoints

ENV = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_CPU")}


def train_cmd(model, photos, out, *extra):
    return [sys.executable, "-m", "peftbooth", "train", "--model", model, "--instance-data-dir", str(photos),
            "--instance-prompt", "a photo of sks dog", "--resolution", "32", "--report-to", "none",
            "--output-dir", str(out), "--learning-rate", "0.01", *extra]


def adapters(out, parts=("unet",)):
    return {f"{p}/{k}": v for p in parts for k, v in load_file(out / p / "adapter_model.safetensors").items()}


def stop_launcher(cmd, log, signum, after_step: int) -> tuple[int, list[psutil.Process]]:
    """Start `cmd` (a launcher), wait until training is past step `after_step`, send `signum` to the launcher
    alone; return its exit code and every process it had started."""
    launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=ENV)
    deadline = time.time() + 300
    while launcher.poll() is None and time.time() < deadline:
        steps = [int(s) for s in re.findall(r"\| *(\d+)/\d+ \[", log.read_text())]
        if steps and max(steps) > after_step:
            break
        time.sleep(0.05)
    assert launcher.poll() is None, log.read_text()[-3000:]
    started = psutil.Process(launcher.pid).children(recursive=True)
    assert len(started) == 2, started
    launcher.send_signal(signum)
    return launcher.wait(timeout=180), started


def test_signals_to_the_launcher_stop_every_worker_and_the_run_resumes_exactly(tiny_model, tmp_path):
    """SIGTERM (a scheduler, `kill`, a Stop button) and SIGINT to the launcher of a 2-process run: every worker
    checkpoints and stops, the launcher exits 143 / 130 as one process does, nothing is left running, the lock is
    released; `--resume latest` under the launcher accepts its checkpoints (it used to count 1 process, not 2)
    and ends with the adapters of an uninterrupted 2-process run, bit for bit."""
    photos = draw_photos(tmp_path / "photos", n=4)
    settings = ["--num-processes", "2", "--max-train-steps", "40", "--logging-steps", "2", "--random-flip",
                "--dropout", "0.1"]  # dropout: the workers' RNG states must be restored too
    reference = subprocess.run(train_cmd(tiny_model, photos, tmp_path / "ref", *settings), capture_output=True,
                               text=True, env=ENV, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]

    out, log = tmp_path / "run", tmp_path / "log"
    code, started = stop_launcher(train_cmd(tiny_model, photos, out, *settings), log, signal.SIGTERM, 0)
    err = log.read_text()
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert err.count("SIGTERM: finishing at most 2 steps, then writing a checkpoint") == 2, err[-3000:]
    assert not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not (out / LOCK).exists()
    [first] = list_checkpoints(out)

    code, started = stop_launcher(train_cmd(tiny_model, photos, out, *settings, "--resume", "latest"), log,
                                  signal.SIGINT, int(first.name.removeprefix("checkpoint-")))
    err = log.read_text()
    assert code == 128 + signal.SIGINT, err[-3000:]
    assert "number of processes" not in err
    assert err.count("SIGINT: finishing at most 2 steps") == 2, err[-3000:]
    assert not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not (out / LOCK).exists()
    assert len(list_checkpoints(out)) == 2

    resumed = subprocess.run(train_cmd(tiny_model, photos, out, *settings, "--resume", "latest"),
                             capture_output=True, text=True, env=ENV, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = adapters(out), adapters(tmp_path / "ref")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ddp_with_loha_module_dropout_matches_one_process(tiny_model, tmp_path):
    """Module dropout leaves the dropped layers without a gradient; DDP used to stop at step 2 ('Expected to have
    finished reduction'). Every rank tosses the same coins, so 2 processes drop what one process with the same
    global batch drops, and train the same adapters (the 2-process test's tolerance)."""
    photos = draw_photos(tmp_path / "photos", n=4)
    settings = ["--adapter", "loha", "--module-dropout", "0.5", "--max-train-steps", "3"]
    two = subprocess.run(train_cmd(tiny_model, photos, tmp_path / "two", *settings, "--num-processes", "2",
                                   "--train-batch-size", "1"), capture_output=True, text=True, env=ENV, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "adapter weights identical on all 2 processes" in two.stdout
    one = subprocess.run(train_cmd(tiny_model, photos, tmp_path / "one", *settings, "--train-batch-size", "2"),
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = adapters(tmp_path / "two"), adapters(tmp_path / "one")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# the launcher's parts


def test_launcher_flags_are_checked_and_dropped_from_the_workers_command(capsys):
    from peftbooth.cli import main
    from peftbooth.training.distributed import worker_argv

    assert worker_argv(["train", "--num-processes", "2", "--nnodes=2", "--node-rank", "1", "--master-addr",
                        "10.0.0.1", "--master-port=29501", "--rank", "4"]) == ["train", "--rank", "4"]
    for flags, message in [
        (["--num-processes", "0"], "--num-processes must be >= 1 (got 0)"),
        (["--nnodes", "2"], "--nnodes > 1 needs --master-addr: the address of the machine with --node-rank 0"),
        (["--nnodes", "2", "--node-rank", "2", "--master-addr", "h"], "--node-rank must be from 0 to --nnodes - 1 = 1"),
        (["--master-port", "70000"], "--master-port must be from 1 to 65535 (got 70000)"),
    ]:
        assert main(["train", "--instance-data-dir", "x", "--instance-prompt", "p", *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_exit_code_is_a_single_processes():
    from peftbooth.training.distributed import exit_code

    assert exit_code([0, 0], []) == 0
    assert exit_code([143, 143], [signal.SIGTERM]) == 143
    assert exit_code([130, 0], [signal.SIGINT]) == 130  # one rank was past its last step
    assert exit_code([-9, 143], [signal.SIGTERM]) == 137  # a worker that had to be killed is a failure
    assert exit_code([1, -9], []) == 1


def test_a_stop_signal_delivered_twice_at_once_is_one_stop(monkeypatch):
    """A scheduler signals every process and the launcher passes its copy on: the worker sees SIGTERM twice
    within a moment. That is one stop (checkpoint first), not a user insisting (exit at once)."""
    from peftbooth.training import signals

    exits = []
    monkeypatch.setattr(signals.os, "_exit", exits.append)
    s = signals.StopSignals()
    s._handle(signal.SIGTERM, None)
    s._handle(signal.SIGTERM, None)
    assert s.received == signal.SIGTERM and exits == []
    s.received_at -= signals.DUPLICATE_S + 0.5
    s._handle(signal.SIGTERM, None)
    assert exits == [128 + signal.SIGTERM]


# ---------------------------------------------------------------------------------------------------------------
# engines


@pytest.mark.parametrize("variable, message", [("ACCELERATE_USE_FSDP", "FSDP_REFUSED"),
                                               ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED_REFUSED")])
def test_fsdp_and_deepspeed_are_refused_before_any_work(tiny_model, photos, tmp_path, monkeypatch, capsys,
                                                        variable, message):
    from peftbooth.cli import main
    from peftbooth.training import distributed

    monkeypatch.setenv(variable, "true")  # what `accelerate launch --config_file` sets for its workers
    out = tmp_path / "run"
    code = main(["train", "--model", tiny_model, "--instance-data-dir", str(photos), "--instance-prompt", "p",
                 "--output-dir", str(out)])
    assert code == 2
    assert capsys.readouterr().err == f"peftbooth train: error: {getattr(distributed, message)}\n"
    assert not out.exists()


def accelerate_launch_env(config_file) -> dict:
    """The environment `accelerate launch --config_file F -m peftbooth train` gives its workers (nothing started)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "-m", "peftbooth", "train"])
    args = _validate_launch_command(args)[0]
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = []
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


def test_every_example_accelerate_config_is_accepted():
    from pathlib import Path

    from peftbooth.training.distributed import check_engine

    examples = sorted((Path(__file__).parents[1] / "examples" / "accelerate").glob("*.yaml"))
    assert examples
    for example in examples:
        check_engine(accelerate_launch_env(example))  # raises UsageError for a refused engine


def test_the_refused_engines_configs_are_refused_with_their_line(tmp_path):
    from peftbooth.config.sections import UsageError
    from peftbooth.training.distributed import DEEPSPEED_REFUSED, FSDP_REFUSED, check_engine

    fsdp = tmp_path / "fsdp.yaml"
    fsdp.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nfsdp_config:\n"
                    "  fsdp_sharding_strategy: SHARD_GRAD_OP\nnum_machines: 1\nnum_processes: 2\n")
    deepspeed = tmp_path / "deepspeed.yaml"
    deepspeed.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\ndeepspeed_config:\n"
                         "  zero_stage: 2\nnum_machines: 1\nnum_processes: 2\n")
    for config, line in [(fsdp, FSDP_REFUSED), (deepspeed, DEEPSPEED_REFUSED)]:
        with pytest.raises(UsageError) as e:
            check_engine(accelerate_launch_env(config))
        assert str(e.value) == line
