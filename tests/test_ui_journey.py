"""What a first-time user meets in `peftbooth ui` (issue 26, items 3, 4, 5, 7), in real headless Chromium.

The server runs in this process on a fixed port, so it can be shut down and started again under an open page.
Runs are written to disk as training would leave them (a config, a job file, a progress bar in the log, a
checkpoint), with a stand-in `peftbooth train` process where one must be alive: the page only reads the run
folder, and these tests are about what it shows and offers, not about training (test_ui_browser.py trains).
"""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import draw_photos
from PIL import Image
from test_ui_browser import CHROMIUM, FLAGS, need_browser

from peftbooth.ui import tryit
from peftbooth.ui.server import make_server

PROMPT = "a photo of sks dog"


# ---------------------------------------------------------------------------------------------------------------
# run folders as training leaves them


def bar(step: int, total: int, left: str = "02:29", rate: str = "9.00it/s", desc: str = "train") -> str:
    return f"{desc}:  10%|#         | {step}/{total} [00:13<{left}, {rate}, loss=0.1]\r"


def fake_run(runs: Path, name: str, job: dict | None = None, log: str | None = None, steps: int = 1500,
             age: float = 0.0) -> Path:
    """A run folder with a config.yaml (and a job file, a log) whose date is `age` seconds ago."""
    run = runs / name
    (run / "ui").mkdir(parents=True, exist_ok=True)
    cfg = {"model": {"model": "tiny"}, "unet_adapter": {"adapter": "lora"},
           "train": {"max_train_steps": steps, "validation_prompt": [PROMPT]}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    if job is not None:
        (run / "ui" / "job.json").write_text(json.dumps(job))
    if log is not None:
        (run / "ui" / "train.log").write_text(f"\n$ peftbooth train --config {run / 'config.yaml'}\n{log}\n")
    stamp = time.time() - age
    for path in (run / "config.yaml", run):
        os.utime(path, (stamp, stamp))
    return run


def finish(run: Path, stats: dict | None = None) -> None:
    (run / "unet").mkdir(exist_ok=True)
    (run / "unet" / "adapter_model.safetensors").write_bytes(b"")
    if stats:
        (run / "train_stats.json").write_text(json.dumps(stats))


def checkpoint(run: Path, step: int) -> None:
    cp = run / "checkpoints" / f"checkpoint-{step}"
    (cp / "unet").mkdir(parents=True)
    for f in ("unet/adapter_model.safetensors", "optimizer.pt", "state.pt", "training_state.json"):
        (cp / f).write_bytes(b"{}")


@pytest.fixture
def trainer():
    """trainer() -> pid of a stand-in `peftbooth train` process (what `runs.alive` looks for); all ended after."""
    procs = []

    def start() -> int:
        procs.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "peftbooth", "train"]))
        return procs[-1].pid

    yield start
    for p in procs:
        p.kill()
        p.wait(10)


class Server:
    """`peftbooth ui`'s server in this process; stop() and start() again keep the runs folder and the port."""

    def __init__(self, runs: Path):
        self.runs, self.port, self.server = runs, 0, None

    def start(self):
        self.server = make_server(self.runs, "127.0.0.1", self.port)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/"


@pytest.fixture
def browser_page(tmp_path):
    """browser_page() -> (new_page, console errors); the browser is closed after the test."""
    need_browser()
    from playwright.sync_api import sync_playwright

    console: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        context = browser.new_context(viewport={"width": 1200, "height": 1000})

        def new_page():
            page = context.new_page()
            page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: console.append(str(e)))
            page.on("dialog", lambda d: d.accept())  # "delete this run?": yes
            page.set_default_timeout(20_000)
            return page

        yield new_page, console
        browser.close()


def open_page(new_page, url: str):
    from playwright.sync_api import expect

    page = new_page()
    page.goto(url)
    expect(page.locator("body[data-ready='1']")).to_be_attached()
    return page


# ---------------------------------------------------------------------------------------------------------------
# 3. never a stale page


def test_page_says_reconnecting_while_the_server_restarts_and_then_shows_the_truth(tmp_path, browser_page, trainer):
    from playwright.sync_api import expect

    new_page, console = browser_page
    runs = tmp_path / "runs"
    a = fake_run(runs, "a", {"state": "started", "pid": trainer()}, bar(121, 1500))
    b = fake_run(runs, "b", {"state": "queued", "queued_at": 1.0})
    server = Server(runs).start()
    page_a = open_page(new_page, server.url + "#run/a")
    page_b = open_page(new_page, server.url + "#run/b")
    expect(page_a.locator("#run-step")).to_have_text("step 121 / 1500")
    expect(page_a.locator("#run-eta")).to_have_text("2:29 left")
    expect(page_a.locator("#stop")).to_be_enabled()
    expect(page_b.locator("#queue-pos")).to_have_text("queued, #1")
    expect(page_a.locator("#conn")).to_be_hidden()

    server.stop()
    for page in (page_a, page_b):  # unreachable: said, and nothing can be pressed
        expect(page.locator("#conn")).to_be_visible()
        expect(page.locator("#conn")).to_contain_text("reconnecting")
        expect(page.locator("#stop")).to_be_disabled()
        expect(page.locator("#delete")).to_be_disabled()
    # meanwhile run a finishes and run b leaves the queue and trains
    finish(a, {"steps": 1500, "it_s": 9.1})
    (a / "ui" / "job.json").write_text(json.dumps({"state": "done", "returncode": 0}))
    (b / "ui" / "job.json").write_text(json.dumps({"state": "started", "pid": trainer()}))
    (b / "ui" / "train.log").write_text(bar(588, 1500, "01:42", "8.50it/s"))
    time.sleep(1.5)  # a few failed polls: the backoff must not have given up
    server.start()

    for page in (page_a, page_b):
        expect(page.locator("#conn")).to_be_hidden(timeout=15_000)
    expect(page_a.locator("#run-state")).to_have_attribute("data-state", "finished")
    expect(page_a.locator("#finished-panel")).to_be_visible()
    expect(page_a.locator("#generate")).to_be_enabled()
    expect(page_b.locator("#run-state")).to_have_attribute("data-state", "running")
    expect(page_b.locator("#queue-pos")).to_have_text("")
    expect(page_b.locator("#run-step")).to_have_text("step 588 / 1500")
    expect(page_b.locator("#run-rate")).to_have_text("8.50 it/s")
    expect(page_b.locator("#run-eta")).to_have_text("1:42 left")
    expect(page_b.locator("#stop")).to_be_enabled()
    server.stop()
    # the browser's own note of each refused connection is expected; nothing else may go wrong
    assert not [c for c in console if "ERR_CONNECTION_REFUSED" not in c], console


# ---------------------------------------------------------------------------------------------------------------
# 4. dead ends: every state has a way forward


def test_every_state_has_a_way_forward(tmp_path, browser_page, trainer):
    from playwright.sync_api import expect

    new_page, console = browser_page
    runs = tmp_path / "runs"
    fake_run(runs, "alpha", {"state": "done", "returncode": 1}, age=3600)  # failed, no checkpoint
    fake_run(runs, "zeta", {"state": "started", "pid": trainer()}, bar(3, 1500), age=60)  # running
    fake_run(runs, "queued", {"state": "queued", "queued_at": 1.0}, age=120)
    photos = draw_photos(tmp_path / "upload", n=1)
    server = Server(runs).start()
    page = open_page(new_page, server.url)

    # a refused Start (no photos, an empty form) creates nothing and keeps the name free; it says why in words
    page.fill("#run-name", "cat")
    page.click("#start")
    expect(page.locator("#photo-errors")).to_contain_text("photos: none yet; add at least 1 photo of the subject")
    assert not (runs / "cat").exists()
    # a taken name is refused with a message, not turned into zeta-1
    page.fill("#run-name", "zeta")
    page.set_input_files("#photo-input", [str(photos / "photo_0.png")])
    expect(page.locator("#run-name-error")).to_contain_text("run name 'zeta': taken by another run")
    assert sorted(p.name for p in runs.iterdir()) == ["alpha", "queued", "zeta"]
    # one photo: accepted (training works), with the same rule the header states
    page.fill("#run-name", "cat")
    expect(page.locator("#run-name-error")).to_have_text("")
    page.set_input_files("#photo-input", [str(photos / "photo_0.png")])
    expect(page.locator("#photos .photo")).to_have_count(1)
    expect(page.locator("#photo-rule")).to_have_text("at least 1 photo of the subject; 3–10 work best")
    page.fill("#f-data-instance_prompt", PROMPT)
    page.fill("#f-model-model", "tiny")
    page.click("#check")
    expect(page.locator("#check-result")).to_contain_text("note: 1 photo: training works, but 3–10 work best")

    # the Runs list: newest first, with delete (not for a run that trains or waits)
    page.reload()
    page.click("#nav-runs")
    expect(page.locator("#runs-table tbody tr")).to_have_count(4)
    names = page.locator("#runs-table tbody tr").evaluate_all("rows => rows.map(r => r.dataset.run)")
    assert names == ["cat", "zeta", "queued", "alpha"]
    expect(page.locator("tr[data-run='zeta'] button.delete")).to_be_disabled()
    expect(page.locator("tr[data-run='queued'] button.delete")).to_be_disabled()
    refused = page.evaluate("async () => (await fetch('/api/runs/zeta', {method: 'DELETE'})).json()")
    assert refused == {"error": "run zeta: running; stop it before deleting it"} and (runs / "zeta").is_dir()

    # a draft's page: no CLI command for a config that does not exist; Edit brings back its photos and form
    page.click("tr[data-run='cat'] a")
    expect(page.locator("#run-state")).to_have_attribute("data-state", "draft")
    expect(page.locator("#command-row")).to_be_hidden()
    page.click("#edit")
    expect(page.locator("#view-new")).to_be_visible()
    expect(page.locator("#run-name")).to_have_value("cat")
    expect(page.locator("#photos .photo")).to_have_count(1)
    expect(page.locator("#f-data-instance_prompt")).to_have_value(PROMPT)
    # ... and Delete removes it (after a confirmation)
    page.goto(server.url + "#run/cat")
    page.click("#delete")
    expect(page.locator("#view-runs")).to_be_visible()
    expect(page.locator("tr[data-run='cat']")).to_have_count(0)
    assert not (runs / "cat").exists()

    # a queued run that is stopped can be started again
    page.goto(server.url + "#run/queued")
    page.click("#stop")
    expect(page.locator("#run-state")).to_have_attribute("data-state", "ready")
    expect(page.locator("#command-row")).to_be_visible()
    page.click("#start-run")
    expect(page.locator("#queue-pos")).to_have_text("queued, #1")
    # a run that failed before its first checkpoint starts over
    page.goto(server.url + "#run/alpha")
    expect(page.locator("#run-state")).to_have_attribute("data-state", "failed")
    expect(page.locator("#resume")).to_be_disabled()
    expect(page.locator("#start-run")).to_have_text("Start over")
    page.click("#start-run")
    expect(page.locator("#run-state")).to_have_attribute("data-state", "queued")
    server.stop()
    # the browser notes each refusal it was given (the taken name, the delete of a running run); nothing else
    assert console == ["Failed to load resource: the server responded with a status of 400 (Bad Request)"] * 2


# ---------------------------------------------------------------------------------------------------------------
# 5. "try it": one file per image, its settings beside it, shown again after a reload


class FakePipe:
    """Stands in for AdapterPipeline: the page and the files are under test here, not the sampler."""

    def load_adapter(self, run, name):
        pass

    def set_adapters(self, weights):
        self.weights = weights

    def generate(self, prompt, num_images=1, seed=0, **kw):
        colour = (int(100 * self.weights["fin"]), seed % 255)
        return [Image.new("RGB", (32, 32), (60 * i, *colour)) for i in range(num_images)]


def test_try_it_keeps_every_image_with_its_settings(tmp_path, browser_page, monkeypatch):
    from playwright.sync_api import expect

    new_page, console = browser_page
    monkeypatch.setattr(tryit.Studio, "pipeline", lambda self, run: (FakePipe(), ("tiny", None, None, None)))
    runs = tmp_path / "runs"
    finish(fake_run(runs, "fin", {"state": "done", "returncode": 0}))
    server = Server(runs).start()
    page = open_page(new_page, server.url + "#run/fin")
    expect(page.locator("#finished-panel")).to_be_visible()
    page.fill("#try-prompt", "a photo of sks dog on the moon")
    page.fill("#try-num", "2")
    for i, strength in enumerate(["1.0", "0.5", "0"]):  # three generations within a second or two
        page.fill("#try-strength", strength)
        page.click("#generate")
        expect(page.locator("#generate-status")).to_have_text("2 image(s)")
        expect(page.locator("#samples .sample-card")).to_have_count(2 * (i + 1))
    files = sorted((runs / "fin" / "ui" / "samples").glob("*.png"))
    assert len(files) == 6  # by the second alone, these overwrote each other
    settings = [json.loads(f.with_suffix(".json").read_text()) for f in files]
    assert sorted(s["strength"] for s in settings) == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]
    assert {s["prompt"] for s in settings} == {"a photo of sks dog on the moon"}

    page.reload()
    expect(page.locator("#samples .sample-card")).to_have_count(6)
    labels = page.locator("#samples .sample-label").all_text_contents()
    assert [("strength 0" in t and "strength 0." not in t) for t in labels[:2]] == [True, True]  # newest first
    assert all("a photo of sks dog on the moon" in t and "seed 0" in t for t in labels)
    for img in page.locator("#samples img.sample").all():
        assert img.evaluate("i => i.complete && i.naturalWidth") == 32
    server.stop()
    assert not console, console


# ---------------------------------------------------------------------------------------------------------------
# 7. messages and progress


def test_progress_and_messages_say_what_is_true(tmp_path, browser_page, trainer):
    from playwright.sync_api import expect
    from torch.utils.tensorboard import SummaryWriter

    new_page, console = browser_page
    runs = tmp_path / "runs"
    # making class images, before the first training step
    fake_run(runs, "early", {"state": "started", "pid": trainer()}, "loading\n" + bar(20, 50, "00:00", "4.00it/s",
                                                                                       "class images"), steps=300)
    # stopped at step 20 (with its last progress bar, one logged loss, a long output line, a validation row)
    long_line = "Traceback: " + "x" * 400 + " END"
    stopped = fake_run(runs, "stopped", {"state": "done", "returncode": 130}, bar(20, 40) + "\n" + long_line, steps=40)
    checkpoint(stopped, 20)
    with SummaryWriter(str(stopped / "logs" / "peftbooth")) as w:
        w.add_scalar("loss", 0.25, 1)
    (stopped / "validation" / "step_0").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(stopped / "validation" / "step_0" / "prompt00_00.png")
    (stopped / "validation" / "prompts.json").write_text(json.dumps([PROMPT + " on the beach"]))
    upload = draw_photos(tmp_path / "upload", n=1)
    (upload / "photo_0.txt").write_text("a photo of sks dog on grass\n")
    server = Server(runs).start()

    page = open_page(new_page, server.url + "#run/early")
    expect(page.locator("#run-phase")).to_have_text("making class images 20/50")
    expect(page.locator("#run-step")).to_have_text("step 0 / 300")
    expect(page.locator("#run-eta")).to_have_text("")  # not the class images' "0:00 left"
    expect(page.locator("#run-rate")).to_have_text("")
    page.click("#stop")  # before step 1: noted, and said that it waits
    expect(page.locator("#run-state")).to_have_attribute("data-state", "stopping")
    expect(page.locator("#stop-note")).to_contain_text("once the first training step is done")

    page.goto(server.url + "#run/stopped")
    expect(page.locator("#run-state")).to_have_attribute("data-state", "stopped")
    expect(page.locator("#run-step")).to_have_text("step 20 / 40")
    expect(page.locator("#run-rate")).to_have_text("")  # it is not running: no rate
    expect(page.locator("#checkpoints")).to_have_text("step 20")
    expect(page.locator("#loss-chart circle")).to_have_count(1)  # one logged loss is a point
    expect(page.locator("#validation figure[data-step='0'] .val-prompt")).to_have_text(PROMPT + " on the beach")
    log = page.locator("#run-log")
    expect(log).to_contain_text("END")
    assert log.evaluate("e => e.scrollWidth <= e.clientWidth")  # long lines wrap instead of running off

    page.goto(server.url + "#new")
    page.fill("#run-name", "dog")
    page.fill("#photo-folder", str(tmp_path / "nowhere"))
    page.click("#use-folder")
    expect(page.locator("#photo-errors")).to_contain_text("outside the folders this UI may read")
    page.fill("#photo-folder", "")  # an error about the old text goes with it
    expect(page.locator("#photo-errors")).to_have_text("")
    page.set_input_files("#photo-input", [str(upload / "photo_0.txt"), str(upload / "photo_0.png")])
    expect(page.locator("#photos textarea.caption")).to_have_value("a photo of sks dog on grass")
    assert (runs / "dog" / "photos" / "photo_0.txt").is_file()
    server.stop()
    assert console == ["Failed to load resource: the server responded with a status of 400 (Bad Request)"]
