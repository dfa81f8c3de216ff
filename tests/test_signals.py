"""signals.py on its own: the stop exception's exit code and message, how often processes compare signals, and
the teardown that drops DDP wrappers before Accelerate's end_training (no model, no process group)."""

import signal

import torch

from peftbooth.training.signals import SIGNAL_STEPS, TrainingInterrupted, all_true, end_training, signal_interval


class FakeAccelerator:
    def __init__(self, num_processes: int):
        self.num_processes, self.events = num_processes, []
        self.device = torch.device("cpu")

    def wait_for_everyone(self):
        self.events.append("barrier")

    def unwrap_model(self, model):
        return model.module

    def free_memory(self):
        self.events.append("free")

    def end_training(self):
        self.events.append("end")

    def gather(self, t):
        return torch.cat([t, torch.ones_like(t)])  # the other process's flag is true


class Wrapped:
    def __init__(self, module):
        self.module = module


def test_training_interrupted_exit_code_and_message(tmp_path):
    e = TrainingInterrupted(signal.SIGTERM, tmp_path / "checkpoint-3")
    assert e.exit_code == 128 + signal.SIGTERM
    assert str(e).startswith("SIGTERM: stopped after a checkpoint at ") and "--resume latest" in str(e)


def test_signal_interval_alone_every_step_else_at_most_signal_steps():
    assert signal_interval(1, 50) == 1
    assert signal_interval(2, 50) == SIGNAL_STEPS and signal_interval(2, 3) == 3


def test_all_true_alone_and_across_processes():
    assert all_true(FakeAccelerator(1), torch.tensor(True)) is True
    assert all_true(FakeAccelerator(1), torch.tensor(False)) is False
    assert all_true(FakeAccelerator(2), torch.tensor(False)) is False  # this process's flag decides
    assert all_true(FakeAccelerator(2), torch.tensor(True)) is True


def test_end_training_drops_the_wrappers_between_barrier_and_teardown_with_several_processes():
    acc = FakeAccelerator(2)
    end_training(acc, lambda: acc.events.append("release"))
    assert acc.events == ["barrier", "release", "free", "end"]
    alone = FakeAccelerator(1)
    end_training(alone, lambda: alone.events.append("release"))
    assert alone.events == ["end"]  # one process: nothing to work around


def test_a_run_drops_its_wrappers_and_keeps_the_models_they_wrap():
    from types import SimpleNamespace

    from peftbooth.training.setup import Run

    run = SimpleNamespace(accelerator=FakeAccelerator(2), unet=Wrapped("u"), text_encoder=Wrapped("t"),
                          text_encoder_2=None)
    Run.drop_wrappers(run)
    assert (run.unet, run.text_encoder, run.text_encoder_2) == ("u", "t", None)
    sdxl = SimpleNamespace(accelerator=FakeAccelerator(2), unet=Wrapped("u"), text_encoder=Wrapped("t"),
                           text_encoder_2=Wrapped("t2"))
    Run.drop_wrappers(sdxl)
    assert sdxl.text_encoder_2 == "t2"
