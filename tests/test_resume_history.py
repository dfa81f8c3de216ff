"""A resumed run is one run: its loss history, training time and throughput cover every segment (issue 26.6).

The UI stops a run by SIGTERM and resumes it with `peftbooth train --config RUN/config.yaml --resume latest`, the
same library path as here, so these tests cover its Stop / Resume too.
"""

import importlib
import json
import re
import signal
import time

import pytest
from conftest import draw_photos, tiny_config

from peftbooth.training.checkpoint import STATE_FILE, list_checkpoints
from peftbooth.training.loop import train
from peftbooth.training.signals import TrainingInterrupted

train_module = importlib.import_module("peftbooth.training.loop")

STEPS = 5
SLEEP = 0.3  # added to every training step: a floor under each segment's measured time that a test can count on
SETTINGS = {"train.max_train_steps": STEPS, "train.seed": 3, "data.random_flip": True, "train.logging_steps": 1}


def slow_steps(monkeypatch, stop_at: int | None = None, signum=signal.SIGTERM):
    """Every training step sleeps SLEEP s; the `stop_at`-th step of this segment delivers `signum` (the real
    handler runs: the step finishes, a checkpoint is written, TrainingInterrupted is raised)."""
    real, calls = train_module.training_step, []

    def step(run, batch):
        calls.append(1)
        if len(calls) == stop_at:
            signal.raise_signal(signum)
        time.sleep(SLEEP)
        return real(run, batch)

    monkeypatch.setattr(train_module, "training_step", step)


def stats_of(out):
    return json.loads((out / "train_stats.json").read_text())


def chart_of(out) -> str:
    """The report's loss chart (a PNG data URI: the same points draw the same bytes)."""
    found = re.findall(r'class="chart" src="(data:image/png;base64,[^"]+)"', (out / "report.html").read_text())
    assert len(found) == 1
    return found[0]


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """The uninterrupted run every test compares with: (photos, output folder)."""
    root = tmp_path_factory.mktemp("history")
    photos = draw_photos(root / "photos")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PEFTBOOTH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))  # as conftest's _cache
        slow_steps(mp)
        out = train(tiny_config(tiny_model, photos, root / "ref", **SETTINGS))
    return photos, out


def test_a_run_stopped_twice_reports_as_one_run(tiny_model, reference, tmp_path, monkeypatch):
    photos, ref = reference
    out, walls = tmp_path / "run", []
    for stop_at, signum, resume in [(2, signal.SIGTERM, None), (2, signal.SIGINT, "latest"), (None, None, "latest")]:
        slow_steps(monkeypatch, stop_at, signum)
        cfg = tiny_config(tiny_model, photos, out, **SETTINGS, **({"train.resume": resume} if resume else {}))
        tick = time.perf_counter()
        if stop_at:
            with pytest.raises(TrainingInterrupted):
                train(cfg)
        else:
            train(cfg)
        walls.append(time.perf_counter() - tick)
        monkeypatch.undo()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-000002", "checkpoint-000004"]

    stats, expected = stats_of(out), stats_of(ref)
    # the loss of every step from the first, no gap, each equal to the uninterrupted run's (resume is exact)
    assert [s for s, _ in stats["loss_history"]] == list(range(1, STEPS + 1))
    assert stats["loss_history"] == expected["loss_history"]
    assert stats["steps"] == STEPS and stats["final_loss"] == expected["final_loss"]
    assert stats["segments"] == 3 and expected["segments"] == 1
    # training time is the three segments' together: at least every step's sleep (the last segment alone has one
    # step), and no more than the three processes' wall time
    assert STEPS * SLEEP <= stats["seconds"] <= sum(walls)
    assert stats["it_s"] == pytest.approx(STEPS / stats["seconds"])
    assert stats.get("history_from", 0) == 0 and "note" not in stats

    html = (out / "report.html").read_text()
    assert chart_of(out) == chart_of(ref)  # the chart starts at step 1, as the uninterrupted run's
    assert f"{STEPS} logged points" in html
    assert "3 (stopped and resumed 2 times)" in html


def test_a_checkpoint_without_history_still_resumes(tiny_model, reference, tmp_path, monkeypatch):
    """A checkpoint written before history and time were carried resumes as before; the stats and the report say
    that they cover the run from the resume on."""
    photos, ref = reference
    out = tmp_path / "run"
    slow_steps(monkeypatch, 2)
    with pytest.raises(TrainingInterrupted):
        train(tiny_config(tiny_model, photos, out, **SETTINGS))
    monkeypatch.undo()
    state_file = list_checkpoints(out)[-1] / STATE_FILE
    saved = json.loads(state_file.read_text())
    old = {k: saved[k] for k in ("step", "epoch", "position", "config", "data_fingerprint", "num_processes")}
    state_file.write_text(json.dumps(old, indent=1))  # what the previous version wrote

    slow_steps(monkeypatch)
    train(tiny_config(tiny_model, photos, out, **SETTINGS, **{"train.resume": "latest"}))
    stats = stats_of(out)
    assert stats["loss_history"] == stats_of(ref)["loss_history"][2:]  # steps 3.. only, and exact
    assert stats["history_from"] == 2 and stats["segments"] == 2
    assert "from step 2" in stats["note"]
    assert stats["it_s"] == pytest.approx((STEPS - 2) / stats["seconds"])
    assert (STEPS - 2) * SLEEP <= stats["seconds"]
    assert "from step 2" in (out / "report.html").read_text()
