"""Never lose a run: exact resume, atomic checkpoints, signals, NaN handling and the output-folder lock."""

import errno
import importlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from peftbooth.cli import main
from peftbooth.config.sections import UsageError
from peftbooth.training.checkpoint import CheckpointError, list_checkpoints
from peftbooth.training.loop import train
from peftbooth.training.signals import TrainingInterrupted

train_module = importlib.import_module("peftbooth.training.loop")  # the module that calls training_step


def adapter_tensors(out):
    found = {}
    for part in ("unet", "text_encoder"):
        f = out / part / "adapter_model.safetensors"
        if f.exists():
            found.update({f"{part}/{k}": v for k, v in load_file(f).items()})
    return found


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def signal_at_step(monkeypatch, k: int, signum=signal.SIGTERM):
    """Deliver `signum` to this process during the k-th training step (the real handler runs)."""
    real, calls = train_module.training_step, []

    def step(run, batch):
        calls.append(1)
        if len(calls) == k:
            signal.raise_signal(signum)
        return real(run, batch)

    monkeypatch.setattr(train_module, "training_step", step)


RESUME_CASES = [(a, prior, te) for a in ("lora", "loha", "lokr") for prior in (False, True) for te in (False, True)]


@pytest.mark.parametrize("adapter, prior, te", RESUME_CASES,
                         ids=[f"{a}-{'prior' if p else 'noprior'}-{'te' if t else 'unet'}" for a, p, t in RESUME_CASES])
def test_resume_after_clean_stop_is_bitwise_identical(tiny_model, photos, tmp_path, monkeypatch, adapter, prior, te):
    settings = {
        "unet_adapter.adapter": adapter, "train.train_text_encoder": te, "train.max_train_steps": 5,
        "train.lr_scheduler": "cosine", "train.lr_warmup_steps": 1, "data.random_flip": True,
        "data.with_prior_preservation": prior, "data.class_prompt": "a photo of a dog", "data.num_class_images": 2,
        "data.class_data_dir": str(tmp_path / "class"), "train.seed": 7,
    }
    reference = adapter_tensors(train(tiny_config(tiny_model, photos, tmp_path / "ref", **settings)))

    out = tmp_path / "run"
    signal_at_step(monkeypatch, 2)  # 3 photos per epoch: the resumed part crosses an epoch boundary
    with pytest.raises(TrainingInterrupted) as stop:
        train(tiny_config(tiny_model, photos, out, **settings))
    assert stop.value.exit_code == 128 + signal.SIGTERM
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-000002"]
    assert not (out / "unet").exists()  # not a finished run
    monkeypatch.undo()
    resumed = train(tiny_config(tiny_model, photos, out, **settings, **{"train.resume": "latest"}))
    assert_bitwise_equal(adapter_tensors(resumed), reference)


def test_resume_with_accumulation_and_random_crops(tiny_model, photos, tmp_path, monkeypatch):
    settings = {"train.gradient_accumulation_steps": 2, "data.center_crop": False, "data.random_flip": True,
                "train.max_train_steps": 4, "train.checkpointing_steps": 1}
    reference = adapter_tensors(train(tiny_config(tiny_model, photos, tmp_path / "ref", **settings)))
    out = tmp_path / "run"
    signal_at_step(monkeypatch, 3, signal.SIGINT)  # the 3rd micro-batch = the first of optimizer step 2
    with pytest.raises(TrainingInterrupted) as stop:
        train(tiny_config(tiny_model, photos, out, **settings))
    assert stop.value.exit_code == 130
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-000001", "checkpoint-000002"]
    resumed = train(tiny_config(tiny_model, photos, out, **settings, **{"train.resume": str(list_checkpoints(out)[-1])}))
    assert_bitwise_equal(adapter_tensors(resumed), reference)


@pytest.mark.parametrize("extra", [{"unet_adapter.dropout": 0.5},
                                   {"data.dataloader_num_workers": 2, "data.center_crop": False}],
                         ids=["dropout", "two-workers"])
def test_resume_with_dropout_or_data_workers_is_bitwise_identical(tiny_model, photos, tmp_path, monkeypatch, extra):
    """LoRA dropout draws from the global torch RNG, so the checkpoint's RNG state must be restored (the control:
    without it the resumed run ends elsewhere); with 2 data-loader workers (random crops: pixels are loaded in the
    workers) the resumed data still matches."""
    from peftbooth.training import checkpoint

    settings = {"train.max_train_steps": 4, "data.random_flip": True, "train.seed": 5, **extra}
    reference = adapter_tensors(train(tiny_config(tiny_model, photos, tmp_path / "ref", **settings)))
    out = tmp_path / "run"
    signal_at_step(monkeypatch, 2)
    with pytest.raises(TrainingInterrupted):
        train(tiny_config(tiny_model, photos, out, **settings))
    monkeypatch.undo()
    if "unet_adapter.dropout" in extra:
        shutil.copytree(out, tmp_path / "no-rng")
    resumed = train(tiny_config(tiny_model, photos, out, **settings, **{"train.resume": "latest"}))
    assert_bitwise_equal(adapter_tensors(resumed), reference)
    if "unet_adapter.dropout" in extra:
        monkeypatch.setattr(checkpoint, "set_rng_state", lambda state: None)
        wrong = adapter_tensors(train(tiny_config(tiny_model, photos, tmp_path / "no-rng", **settings,
                                                  **{"train.resume": "latest"})))
        assert any(not torch.equal(wrong[k], reference[k]) for k in reference)


def test_checkpoints_total_limit_keeps_newest(tiny_model, photos, tmp_path):
    out = train(tiny_config(tiny_model, photos, tmp_path / "run", **{
        "train.max_train_steps": 4, "train.checkpointing_steps": 1, "train.checkpoints_total_limit": 2}))
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-000003", "checkpoint-000004"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-000003", "checkpoint-000004"]
    files = {p.relative_to(out / "checkpoints" / "checkpoint-000004").as_posix()
             for p in (out / "checkpoints" / "checkpoint-000004").rglob("*") if p.is_file()}
    assert {"unet/adapter_model.safetensors", "optimizer.pt", "state.pt", "rng-0.pt", "training_state.json"} <= files
    state = json.loads((out / "checkpoints" / "checkpoint-000004" / "training_state.json").read_text())
    assert state["step"] == 4 and state["config"]["train"]["max_train_steps"] == 4


def test_resume_refuses_a_different_setup(tiny_model, photos, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    signal_at_step(monkeypatch, 1)
    with pytest.raises(TrainingInterrupted):
        train(tiny_config(tiny_model, photos, out, **{"train.max_train_steps": 3}))
    monkeypatch.undo()
    base = ["train", "--model", tiny_model, "--instance-data-dir", str(photos), "--instance-prompt",
            "a photo of sks dog", "--resolution", "32", "--max-train-steps", "3", "--report-to", "none",
            "--output-dir", str(out), "--resume", "latest"]
    assert main([*base, "--learning-rate", "0.5", "--rank", "8"]) == 2
    err = capsys.readouterr().err
    assert "made with a different setup (train.learning_rate, unet_adapter.alpha, unet_adapter.rank)" in err
    (photos / "photo_0.txt").write_text("another caption")
    assert main([*base, "--learning-rate", "0.001"]) == 2
    assert "instance images (files or captions changed)" in capsys.readouterr().err
    assert not (out / "unet").exists()
    assert main([*base[:-2], "--resume", str(tmp_path / "nowhere")]) == 2
    assert "not a complete peftbooth checkpoint (no such folder)" in capsys.readouterr().err
    assert main([*base, "--learning-rate", "0.001", "--resume-force"]) == 0
    assert (out / "unet" / "adapter_model.safetensors").is_file()


def test_resume_latest_without_checkpoints_is_refused(tiny_model, photos, tmp_path, capsys):
    code = main(["train", "--model", tiny_model, "--instance-data-dir", str(photos), "--instance-prompt", "p",
                 "--output-dir", str(tmp_path / "run"), "--resume", "latest"])
    assert code == 2 and "--resume latest: no complete checkpoint in" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_partial_first_checkpoint_does_not_block_a_fresh_start(tiny_model, photos, tmp_path, capsys):
    """Killed while writing its first checkpoint, a run leaves only a .tmp- folder: `--resume latest` has nothing
    to resume, so the same command without it must start (it did exit 2, 'holds checkpoints of an unfinished
    run', leaving no way on but --overwrite)."""
    out = tmp_path / "run"
    partial = out / "checkpoints" / ".tmp-checkpoint-000001"
    partial.mkdir(parents=True)
    (partial / "rng-0.pt").write_bytes(b"")
    assert main(["train", "--model", tiny_model, "--instance-data-dir", str(photos), "--instance-prompt", "p",
                 "--resolution", "32", "--max-train-steps", "1", "--report-to", "none", "--checkpointing-steps", "1",
                 "--output-dir", str(out)]) == 0
    assert (out / "unet" / "adapter_model.safetensors").is_file()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-000001"] and not partial.exists()

    # a complete checkpoint of an unfinished run is still refused without --resume / --overwrite
    unfinished = tmp_path / "unfinished"
    shutil.copytree(out / "checkpoints", unfinished / "checkpoints")
    capsys.readouterr()
    assert main(["train", "--model", tiny_model, "--instance-data-dir", str(photos), "--instance-prompt", "p",
                 "--output-dir", str(unfinished)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"peftbooth train: error: --output-dir {unfinished}: holds checkpoints of an unfinished run; pass --resume "
        "latest to continue it, or --overwrite to start over (its checkpoints are deleted)")


@pytest.mark.parametrize("policy", ["stop", "skip-step"])
def test_nan_loss(tiny_model, photos, tmp_path, monkeypatch, policy):
    real, calls = train_module.training_step, []

    def step(run, batch):
        calls.append(1)
        loss, inst, prior = real(run, batch)
        if len(calls) == 3:
            loss = loss * float("nan")
        return loss, inst, prior

    monkeypatch.setattr(train_module, "training_step", step)
    cfg = tiny_config(tiny_model, photos, tmp_path / "run", **{
        "train.max_train_steps": 4, "train.checkpointing_steps": 1, "train.logging_steps": 10,
        "train.nan_policy": policy})
    if policy == "stop":
        with pytest.raises(FloatingPointError, match=r"loss became NaN/inf at step 3; the last checkpoint before it"):
            train(cfg)
        assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-000001", "checkpoint-000002"]
    else:
        out = train(cfg)
        assert len(calls) == 5  # one batch skipped, 4 optimizer steps made
        assert all(torch.isfinite(t).all() for t in adapter_tensors(out).values())


def test_full_disk_during_checkpoint_keeps_the_previous_one(tiny_model, photos, tmp_path, monkeypatch):
    from peftbooth.training import checkpoint

    real_save, calls = torch.save, []

    def full_disk(obj, path, *a, **k):
        calls.append(path)
        if len(calls) > 3 and str(path).endswith("optimizer.pt"):  # the second checkpoint's optimizer
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match=r"could not write the checkpoint of step 2 .*No space left on device.*"
                                              r"the previous checkpoint .*checkpoint-000001 is intact"):
        train(tiny_config(tiny_model, photos, out, **{"train.max_train_steps": 3, "train.checkpointing_steps": 1}))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-000001"]
    assert list_checkpoints(out)[0].joinpath("optimizer.pt").stat().st_size > 0


def test_output_folder_lock(tiny_model, photos, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (out / ".peftbooth.lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        with pytest.raises(UsageError, match=rf"in use by another run \(pid {sleeper.pid}\)"):
            train(tiny_config(tiny_model, photos, out))
    finally:
        sleeper.kill()
        sleeper.wait()
    # the holder is gone: the lock is stale and taken over; released at the end
    train(tiny_config(tiny_model, photos, out))
    assert (out / "unet" / "adapter_model.safetensors").is_file() and not (out / ".peftbooth.lock").exists()


# ---------------------------------------------------------------------------------------------------------------
# real processes: SIGTERM, SIGKILL


def cli_args(tiny_model, photos, out, steps, resume=False):
    args = [sys.executable, "-m", "peftbooth", "train", "--model", tiny_model, "--instance-data-dir", str(photos),
            "--instance-prompt", "a photo of sks dog", "--resolution", "32", "--max-train-steps", str(steps),
            "--checkpointing-steps", "1", "--report-to", "none", "--output-dir", str(out), "--seed", "3",
            "--random-flip", "--learning-rate", "0.001"]
    return args + (["--resume", "latest"] if resume else [])


def start_and_wait_for_training(args, log):
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=dict(os.environ))
    deadline = time.time() + 120
    while "train:" not in log.read_text() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    return proc


def test_sigterm_writes_checkpoint_and_exits_143(tiny_model, photos, tmp_path):
    out, log = tmp_path / "run", tmp_path / "log"
    proc = start_and_wait_for_training(cli_args(tiny_model, photos, out, 10_000), log)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    err = log.read_text()
    assert "SIGTERM: stopped after a checkpoint at" in err and "--resume latest" in err
    assert list_checkpoints(out)


def test_sigkill_at_random_moments_always_leaves_a_loadable_checkpoint(tiny_model, photos, tmp_path):
    steps = 30
    reference = tmp_path / "ref"
    subprocess.run(cli_args(tiny_model, photos, reference, steps), check=True, capture_output=True)
    out, rng = tmp_path / "run", random.Random(1)
    for i in range(5):
        proc = start_and_wait_for_training(cli_args(tiny_model, photos, out, steps, bool(list_checkpoints(out))),
                                           tmp_path / f"log{i}")
        time.sleep(rng.uniform(0.0, 1.5))  # during a step or during a checkpoint write (one per step)
        proc.kill()
        if proc.wait() == 0:  # it finished before the kill: nothing left to interrupt
            break
        found = list_checkpoints(out)
        if found:  # the newest complete checkpoint must load
            latest = found[-1]
            load_file(latest / "unet" / "adapter_model.safetensors")
            torch.load(latest / "optimizer.pt", weights_only=True)
            json.loads((latest / "training_state.json").read_text())
    if not (out / "unet").exists():
        subprocess.run(cli_args(tiny_model, photos, out, steps, bool(list_checkpoints(out))), check=True,
                       capture_output=True)
    assert_bitwise_equal(adapter_tensors(out), adapter_tensors(reference))


def test_skip_step_drops_the_whole_accumulated_step(tiny_model, photos, tmp_path, monkeypatch):
    real, calls = train_module.training_step, []

    def step(run, batch):
        calls.append(1)
        loss, inst, prior = real(run, batch)
        return (loss * float("nan") if len(calls) == 1 else loss), inst, prior

    monkeypatch.setattr(train_module, "training_step", step)
    out = train(tiny_config(tiny_model, photos, tmp_path / "run", **{
        "train.max_train_steps": 2, "train.gradient_accumulation_steps": 2, "train.nan_policy": "skip-step"}))
    assert len(calls) == 6  # micro-batches 1-2 dropped together, then 2 clean steps of 2
    assert all(torch.isfinite(t).all() for t in adapter_tensors(out).values())


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_resume_refuses_adapter_weights_that_do_not_fit(tiny_model, photos, tmp_path, capsys, change):
    """A checkpoint lacking some of the model's adapter weights would leave them at a fresh initialisation and
    carry on: refused like extra weights are, naming one, before the loop starts."""
    from safetensors.torch import save_file

    out = train(tiny_config(tiny_model, photos, tmp_path / "run", **{"train.checkpointing_steps": 1}))
    shutil.rmtree(out / "unet")  # the run looks unfinished again: only its checkpoints are left
    f = list_checkpoints(out)[-1] / "unet" / "adapter_model.safetensors"
    weights = load_file(f)
    name = sorted(weights)[0]
    if change == "missing":
        del weights[name]
    else:
        weights[name.replace("lora_A", "lora_Z")] = weights[name].clone()
    save_file(weights, f)
    code = main(["train", "--model", tiny_model, "--instance-data-dir", str(photos), "--instance-prompt",
                 "a photo of sks dog", "--resolution", "32", "--max-train-steps", "2", "--report-to", "none",
                 "--learning-rate", "0.001", "--output-dir", str(out), "--resume", "latest"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"unet weights do not fit this model (1 {change}, e.g. " in err, err
    assert not (out / "unet").exists()


def test_a_process_added_under_resume_force_draws_from_its_own_device(tmp_path, monkeypatch):
    """Every rank's CPU streams are equal (same seed, same draws), so an added process takes rank 0's; but each
    rank draws its GPU randomness from its own device, and rank 0's file holds another device's generator only
    as it was seeded, never drawn from. The added process gets rank 0's own device's state for its device, not
    that untouched one (which would repeat the run's first dropout masks)."""
    from peftbooth.training import checkpoint

    drawn, untouched = torch.tensor([7, 7], dtype=torch.uint8), torch.tensor([1, 1], dtype=torch.uint8)
    torch.save({**checkpoint.rng_state(), "cuda": [drawn, untouched], "cuda_device": 0}, tmp_path / "rng-0.pt")
    torch.save({**checkpoint.rng_state(), "cuda": [untouched, drawn], "cuda_device": 1}, tmp_path / "rng-1.pt")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    own = checkpoint.process_rng_state(tmp_path, 1)  # saved: its own file, as saved
    assert torch.equal(own["cuda"][1], drawn)
    (tmp_path / "rng-1.pt").unlink()  # the checkpoint had 1 process; this is process 1 of 2, on device 1
    added = checkpoint.process_rng_state(tmp_path, 1)
    assert torch.equal(added["cuda"][1], drawn)
    assert torch.equal(added["torch"], torch.load(tmp_path / "rng-0.pt", weights_only=True)["torch"])
