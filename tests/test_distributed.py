"""Data-parallel training on CPU (2 processes, gloo): same adapters on every rank, same result as one process
with the same global batch, class images split without duplicates, one writer."""

import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import draw_photos
from safetensors.torch import load_file


def argv(tiny_model, photos, out, class_dir, extra):
    return [sys.executable, "-m", "peftbooth", "train", "--model", tiny_model, "--instance-data-dir", str(photos),
            "--instance-prompt", "a photo of sks dog", "--resolution", "32", "--max-train-steps", "3",
            "--report-to", "none", "--output-dir", str(out), "--with-prior-preservation", "--class-prompt",
            "a photo of a dog", "--num-class-images", "3", "--class-image-steps", "2", "--class-data-dir",
            str(class_dir), "--train-text-encoder", "--learning-rate", "0.01", "--random-flip", *extra]


ENV = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}


@pytest.fixture(scope="module")
def one_process(tiny_model, tmp_path_factory):
    """4 photos (2 global batches of 2 per epoch, no padding) and a 1-process run on them with batch 2: what the
    data-parallel runs below must match."""
    root = tmp_path_factory.mktemp("one")
    photos = draw_photos(root / "photos", n=4)
    one = subprocess.run(argv(tiny_model, photos, root / "one", root / "class1", ["--train-batch-size", "2"]),
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    return photos, root / "one"


def assert_same_adapters(out, reference):
    for part in ("unet", "text_encoder"):
        a = load_file(out / part / "adapter_model.safetensors")
        b = load_file(reference / part / "adapter_model.safetensors")
        assert a.keys() == b.keys()
        changed = 0
        for k in a:
            # Two ranks sum the gradient in a different order than one batch of 2, and Adam divides by the
            # gradient's running scale, so an element whose gradient nearly cancels can move by a small fraction of
            # one step (lr 0.01). Allowed: 1 % of one step; measured up to 3.2e-5 on another CPU (1 of 128 elements).
            torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)
            changed += int(a[k].abs().sum() > 0)
        assert changed  # trained, not both still at their zero init


def test_two_processes_match_one_process_with_the_same_global_batch(tiny_model, one_process, tmp_path):
    photos, reference = one_process
    two = subprocess.run(argv(tiny_model, photos, tmp_path / "two", tmp_path / "class2",
                              ["--train-batch-size", "1", "--num-processes", "2"]),
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "adapter weights identical on all 2 processes" in two.stdout
    assert two.stdout.count("adapters written to") == 1  # rank 0 alone reports and writes
    names = sorted(p.name[:11] for p in (tmp_path / "class2").iterdir())
    assert names == ["class-00000", "class-00001", "class-00002"]  # split across ranks, none made twice
    assert_same_adapters(tmp_path / "two", reference)


def test_two_nodes_match_one_process_with_the_same_global_batch(tiny_model, one_process, tmp_path):
    """Two "machines" (two launchers with --nnodes 2, one process each, meeting on 127.0.0.1) train as one process
    with the same global batch does. Both write into one output and class folder, as machines sharing storage."""
    import socket

    photos, reference = one_process
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [subprocess.Popen(argv(tiny_model, photos, tmp_path / "two", tmp_path / "class2", [
        "--train-batch-size", "1", "--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1",
        "--master-port", str(port)]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        for rank in (0, 1)]
    (out0, err0), (out1, err1) = (node.communicate(timeout=600) for node in nodes)
    assert [node.returncode for node in nodes] == [0, 0], (err0 + err1)[-3000:]
    assert "adapter weights identical on all 2 processes" in out0
    assert_same_adapters(tmp_path / "two", reference)


def test_two_processes_train_sdxl_with_both_text_encoders(tmp_path):
    """SDXL under DistributedDataParallel with adapters on both text encoders: every adapter weight gets a gradient
    (an unused one would stall the gradient exchange), both ranks end identical, all three adapters are saved."""
    from peftbooth.models.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "sdxl", shape="tiny-sdxl")
    photos = draw_photos(tmp_path / "photos", n=2)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    cmd = argv(str(model), photos, tmp_path / "two", tmp_path / "class", ["--num-processes", "2"])
    cmd[cmd.index("--resolution") + 1] = "64"
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "adapter weights identical on all 2 processes" in run.stdout
    for part in ("unet", "text_encoder", "text_encoder_2"):
        assert (tmp_path / "two" / part / "adapter_model.safetensors").is_file()


class CountingAccelerator:
    """Stands in for Accelerate's gather across `num_processes` processes that all received `peers_signal`: the
    tests count the gathers (each a host sync on a GPU)."""

    def __init__(self, num_processes: int, peers_signal: int = 0):
        self.num_processes, self.peers_signal, self.device, self.gathered_at = num_processes, peers_signal, "cpu", []

    def gather(self, t):
        self.gathered_at.append(self.step)
        return torch.cat([t, torch.tensor([self.peers_signal])])


def stops(signals, acc, steps, signal_at, checkpoints=()):
    """Run `steps` optimizer steps; the signal arrives during step `signal_at`; return the step that stops."""
    import signal

    for step in range(1, steps + 1):
        if step == signal_at:
            signals._handle(signal.SIGTERM, None)
        acc.step = step
        if signals.agreed(acc, step, step in checkpoints):
            return step
    return None


def test_several_processes_agree_on_a_signal_every_few_steps_not_every_step(capsys):
    """Agreeing on a stop signal is a gather and a host sync: with several processes it happens at every 10th
    step (fewer with --logging-steps below 10) and at checkpoints, not every step; alone, never."""
    import signal

    from peftbooth.training.signals import SIGNAL_STEPS, StopSignals

    assert SIGNAL_STEPS == 10
    acc = CountingAccelerator(2)
    assert stops(StopSignals(every=10), acc, 25, signal_at=None, checkpoints={13}) is None
    assert acc.gathered_at == [10, 13, 20]
    acc = CountingAccelerator(2)
    assert stops(StopSignals(every=10), acc, 25, signal_at=3) == 10  # this process got it: all stop at step 10
    assert "SIGTERM: finishing at most 10 steps, then writing a checkpoint" in capsys.readouterr().err
    acc = CountingAccelerator(2, peers_signal=signal.SIGTERM)  # only another process got it
    assert stops(StopSignals(every=4), acc, 25, signal_at=None) == 4
    alone = CountingAccelerator(1)
    assert stops(StopSignals(), alone, 25, signal_at=3) == 3 and alone.gathered_at == []
    assert "SIGTERM: finishing this step, then writing a checkpoint" in capsys.readouterr().err


def test_sigterm_to_both_processes_checkpoints_at_the_agreed_step(tiny_model, tmp_path):
    """A scheduler's SIGTERM to every worker of a 2-process run: both finish steps up to the next multiple of
    10, one checkpoint is written there, and both stop after it."""
    import signal
    import time

    import psutil

    from peftbooth.training.checkpoint import list_checkpoints

    photos = draw_photos(tmp_path / "photos", n=4)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    out, log = tmp_path / "run", tmp_path / "log"
    cmd = [sys.executable, "-m", "peftbooth", "train", "--model", tiny_model, "--instance-data-dir", str(photos),
           "--instance-prompt", "a photo of sks dog", "--resolution", "32", "--max-train-steps", "100000",
           "--report-to", "none", "--output-dir", str(out), "--num-processes", "2", "--checkpointing-steps", "0"]
    launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=env)
    try:
        deadline = time.time() + 300
        # a finished step 1: both ranks are inside the loop (it took their gradient exchange), signal handlers set
        while (not re.search(r"\| *[1-9]\d*/100000", log.read_text()) and launcher.poll() is None
               and time.time() < deadline):
            time.sleep(0.05)
        workers = psutil.Process(launcher.pid).children()  # the launcher starts its workers itself (distributed.py)
        assert len(workers) == 2, log.read_text()[-2000:]
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        # the signal did not pass through the launcher: it returns the workers' own exit code, SIGTERM's 143
        assert launcher.wait(timeout=120) == 143
    finally:  # a failed assertion must not leave a 100000-step run training
        for p in ([*psutil.Process(launcher.pid).children(recursive=True), psutil.Process(launcher.pid)]
                  if launcher.poll() is None else []):
            p.kill()
    err = log.read_text()
    assert err.count("SIGTERM: finishing at most 10 steps, then writing a checkpoint") == 2, err[-3000:]
    [checkpoint] = list_checkpoints(out)
    step = int(checkpoint.name.removeprefix("checkpoint-"))
    assert step > 0 and step % 10 == 0
    assert f"SIGTERM: stopped after a checkpoint at {checkpoint};" in err
    assert not list((out / "checkpoints").glob(".tmp-*"))  # written whole: no rank left before the rename
