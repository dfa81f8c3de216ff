"""`peftbooth ui` in real headless Chromium (Debian's chromium, driven by Playwright through executable_path).

One test walks the whole flow of the issue: start the server on a free port, upload photos, see a bad setting
refused beside its field, start a tiny-model run with validation, see progress and a validation image, Stop (a
checkpoint exists), Resume, restart the UI while the run goes on (it is still shown running), see it finish,
generate an image, download a kohya export. The page must log no console errors and make no request to anywhere
but 127.0.0.1.

Where the browser is missing the test skips, except under CI (CI=true), where it fails: CI installs it.
PEFTBOOTH_UPDATE_SCREENSHOT=1 refreshes docs/ui-screenshot.png in tests/test_ui_world.py (the new-run form).
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import draw_photos
from PIL import Image

from peftbooth.ui.runs import alive

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SLOW = 600_000  # ms: a training process's start, samples and steps on a busy 2-core machine (CI: seconds)
DOCS_SHOT = Path(__file__).resolve().parent.parent / "docs" / "ui-screenshot.png"


def need_browser():
    problem = None
    if not os.path.exists(CHROMIUM):
        problem = f"{CHROMIUM} not installed (Debian packages 'chromium' and 'chromium-driver')"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problem = "the playwright package is not installed (pip install -e '.[test]')"
    if problem:
        if os.environ.get("CI") or os.environ.get("PEFTBOOTH_REQUIRE_BROWSER"):
            pytest.fail(f"CI must run the browser test: {problem}")
        pytest.skip(problem)


def start_ui(runs: Path) -> tuple[subprocess.Popen, str]:
    """`peftbooth ui --port 0` as its own process; returns it and the URL it prints."""
    proc = subprocess.Popen([sys.executable, "-m", "peftbooth", "ui", "--runs-dir", str(runs), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(600)  # the CLI imports torch first: minutes on a busy 2-core machine
    assert lines and "http://127.0.0.1:" in lines[0], f"no URL from peftbooth ui: {lines}"
    # keep draining the output so the server never blocks on a full pipe
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    return proc, lines[0].split(" at ", 1)[1].strip()


def wait_for(probe, seconds: float = 10.0):
    """The first truthy value of probe() within `seconds` (the UI notes an exit code within half a second)."""
    end = time.monotonic() + seconds
    while not (value := probe()) and time.monotonic() < end:
        time.sleep(0.1)
    return value


def test_ui_end_to_end_in_chromium(tmp_path):
    need_browser()
    from playwright.sync_api import expect, sync_playwright

    runs, shots = tmp_path / "runs", tmp_path / "screenshots"
    shots.mkdir()
    photos = draw_photos(tmp_path / "upload", n=3)
    mask = Image.new("L", (48, 40), 0)
    mask.paste(255, (4, 4, 30, 30))
    mask.save(photos / "photo_0.mask.png")  # sorts before photo_0.png: the page must send the photo first
    run = runs / "sks-dog"
    ui, url = start_ui(runs)
    ui2 = None
    console, requests = [], []
    try:
        with sync_playwright() as p:
            # Playwright gives the browser a fresh profile folder of its own (it refuses --user-data-dir in args)
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            context = browser.new_context(viewport={"width": 1200, "height": 1100}, accept_downloads=True)
            page = context.new_page()
            page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: console.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.set_default_timeout(30_000)

            # --- new run: photos, a caption, a bad setting refused beside its field
            page.goto(url)
            expect(page.locator("body[data-ready='1']")).to_be_attached()
            page.fill("#run-name", "sks-dog")
            page.set_input_files("#photo-input", sorted(str(f) for f in photos.glob("*.png")))
            expect(page.locator("#photos .photo")).to_have_count(3)  # the mask is not a photo
            expect(page.locator("#photos .photo span").first).to_have_text("photo_0.png (mask)")
            assert (run / "photos" / "photo_0.mask.png").is_file()
            caption = page.locator("#photos textarea.caption").first
            caption.fill("a photo of sks dog on grass")
            caption.dispatch_event("change")
            page.fill("#f-model-model", "tiny")
            page.fill("#f-data-instance_prompt", "a photo of sks dog")
            expect(page.locator("#f-train-validation_prompt")).to_have_value("a photo of sks dog")
            page.click("#advanced summary")
            page.fill("#f-data-resolution", "30")
            page.click("#start")
            error = page.locator("[data-error-for='data.resolution']")
            expect(error).to_contain_text("--resolution must be")  # TrainConfig.validate's own message
            expect(error).to_contain_text("(got 30)")
            assert not (run / "config.yaml").exists()  # refused before anything was written
            assert (run / "photos" / "photo_0.txt").read_text().strip() == "a photo of sks dog on grass"
            page.fill("#f-data-resolution", "32")
            page.fill("#f-train-max_train_steps", "400")  # long enough that Stop lands mid-run on a fast machine
            page.fill("#f-train-validation_steps", "200")
            page.fill("#f-train-num_validation_images", "1")
            page.fill("#f-train-logging_steps", "1")
            page.fill("#f-train-learning_rate", "0.001")
            page.screenshot(path=str(shots / "1-new-run.png"), full_page=True)
            page.click("#start")

            page.wait_for_url("**#run/sks-dog", timeout=120_000)  # the first check imports torch in the server
            expect(page.locator("#run-state")).to_have_attribute("data-state", "running", timeout=60_000)

            # a second run waits in the queue while this one trains (here it is taken out of the queue again)
            page.evaluate("""async () => {
                const r = await (await fetch('/api/runs', {method: 'POST', body: '{"name": "second"}'})).json();
                const blob = await (await fetch('/runs/sks-dog/photo/photo_0.png')).blob();
                await fetch(`/api/runs/${r.name}/photos?filename=a.png`, {method: 'POST', body: blob});
                await fetch(`/api/runs/${r.name}/start`, {method: 'POST', body: JSON.stringify({values: {
                    'model.model': 'tiny', 'data.instance_prompt': 'a photo of sks cat', 'data.resolution': '32',
                    'train.max_train_steps': '2'}})});
            }""")
            page.click("#nav-runs")
            expect(page.locator("tr[data-run='second'] .state")).to_have_text("queued #1")
            expect(page.locator("tr[data-run='sks-dog'] .state")).to_have_text("running")
            page.goto(url + "#run/second")
            page.click("#stop")
            expect(page.locator("#run-state")).to_have_attribute("data-state", "ready")
            assert not (runs / "second" / "ui" / "train.log").exists()  # it never started

            page.goto(url + "#run/sks-dog")
            # --- progress and a validation image (step 0, before training)
            expect(page.locator("#validation figure[data-step='0'] img.validation-image")).to_have_count(
                1, timeout=SLOW)
            page.wait_for_function("() => Number(document.querySelector('#run-step').dataset.step) >= 1", timeout=SLOW)
            expect(page.locator("#run-step")).to_contain_text("/ 400")
            expect(page.locator("#run-rate")).to_contain_text("it/s")

            # --- Stop: the step finishes, a checkpoint is written, the process exits 130
            page.screenshot(path=str(shots / "2-running.png"), full_page=True)
            page.click("#stop")
            expect(page.locator("#run-state")).to_have_attribute("data-state", "stopped", timeout=SLOW)
            checkpoints = sorted((run / "checkpoints").glob("checkpoint-*"))
            assert checkpoints and (checkpoints[-1] / "unet" / "adapter_model.safetensors").is_file()
            assert not (run / "unet").exists()
            page.wait_for_function("() => document.querySelector('#stop').dataset.checkpoints !== ''")
            assert wait_for(lambda: json.loads((run / "ui" / "job.json").read_text()).get("returncode")) == 130
            stopped_at = int(checkpoints[-1].name.rsplit("-", 1)[1])
            assert 1 <= stopped_at < 400

            # --- Resume; then the UI itself is killed and restarted: the run goes on and is still shown
            page.click("#resume")
            expect(page.locator("#run-state")).to_have_attribute("data-state", "running", timeout=60_000)
            page.goto("about:blank")  # the browser is closed meanwhile: its polls would hit the dead server
            ui.send_signal(signal.SIGKILL)
            ui.wait(30)
            ui2, url2 = start_ui(runs)
            page.goto(url2 + "#run/sks-dog")
            state = page.locator("#run-state")
            expect(state).to_have_attribute("data-state", "running", timeout=30_000)  # found by its pid

            # --- it finishes: the last validation row, the report
            expect(state).to_have_attribute("data-state", "finished", timeout=SLOW)
            expect(page.locator("#validation figure[data-step='400'] img.validation-image")).to_have_count(1)
            expect(page.locator("#run-step")).to_contain_text("step 400 / 400")
            expect(page.locator("#report-link")).to_be_visible()
            assert (run / "unet" / "adapter_model.safetensors").is_file()
            assert "--resume latest" in (run / "ui" / "train.log").read_text()
            page.wait_for_function("() => Number(document.querySelector('#loss-chart').dataset.points) >= 40")

            # --- try it: one image from the finished run
            page.fill("#try-steps", "2")
            page.fill("#try-num", "1")
            page.click("#generate")
            expect(page.locator("#samples img.sample")).to_have_count(1, timeout=SLOW)
            page.wait_for_function("() => document.querySelector('#samples img.sample').naturalWidth > 0")
            assert len(list((run / "ui" / "samples").glob("*.png"))) == 1
            expect(page.locator("#samples .sample-label")).to_contain_text("“a photo of sks dog” · strength 1")

            # --- export for kohya / A1111 / ComfyUI and download it
            page.select_option("#export-format", "kohya")
            page.click("#export")
            expect(page.locator("#export-link")).to_be_visible(timeout=SLOW)
            with page.expect_download() as info:
                page.click("#export-link")
            saved = tmp_path / "download.safetensors"
            info.value.save_as(saved)
            from safetensors import safe_open

            with safe_open(str(saved), "pt") as f:
                keys = list(f.keys())
                assert f.metadata()["ss_network_module"] == "networks.lora"
            assert keys and all(k.startswith("lora_unet_") for k in keys)
            page.screenshot(path=str(shots / "3-finished.png"), full_page=True)

            page.click("#nav-runs")
            expect(page.locator("tr[data-run='sks-dog'] .state")).to_have_text("finished")
            page.screenshot(path=str(shots / "4-runs.png"), full_page=True)
            browser.close()
    finally:
        for proc in (ui, ui2):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(30)
        for job in runs.glob("*/ui/job.json"):  # training runs in its own session: end what this test started
            pid = json.loads(job.read_text()).get("pid")
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert all(shot.stat().st_size > 0 for shot in shots.glob("*.png")) and len(list(shots.glob("*.png"))) == 4
    assert not console, console
    assert requests
    foreign = [u for u in requests if not u.startswith(("data:", "about:")) and urlsplit(u).hostname != "127.0.0.1"]
    assert not foreign, foreign
