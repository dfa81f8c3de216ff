"""A first-time user in Chromium: drop the world's subject photos, pick the world model, write the prompts, press
Start with every other setting as the form fills it, and see the subject in the validation samples at night and
on the road, contexts none of the photos show.

The form's defaults follow the model (peftbooth.models.defaults: the world's recipe). Before, they were SD's (1e-4,
rank 4, attention only, 512 px): the samples never changed and the subject never appeared. The evaluator of the
world (peftbooth.world.evaluator, as `peftbooth eval` uses it) scores the last validation step; the threshold was
set below the worst of seeds measured apart (docs/ui.md, "Defaults that follow the model").

Set PEFTBOOTH_UPDATE_SCREENSHOT=1 to refresh docs/ui-screenshot.png (the new-run form with the world's defaults).
"""

import os
import shutil

import yaml
from PIL import Image
from test_ui_browser import CHROMIUM, DOCS_SHOT, FLAGS, SLOW, need_browser, start_ui

from peftbooth.world import MODEL_DIR
from peftbooth.world.evaluator import judge, load_evaluator
from peftbooth.world.recipe import LEARNING_RATES
from peftbooth.world.scenes import write_subject_photos

PROMPTS = ["a photo of a sks ball at night", "a photo of a sks ball on the road"]
# Share of the last step's samples (2 prompts x 2 seeds) the evaluator calls the subject. CLI runs with the same
# settings, seeds 0-2 (chosen on): 1.00 each; seeds 3-4 (kept apart): 0.75, 1.00 (docs/ui.md); on the rebuilt
# world UNet seeds 0-4 1.00 each, at 500 steps and again at the recipe's 1500 (steps 750 and 1500 both 1.00 for
# seeds 0-4). 0.5 leaves a sample of margin below the worst. This test is seed 0.
THRESHOLD = 0.5


def test_a_new_user_with_the_forms_defaults_sees_the_subject_in_new_contexts(tmp_path, monkeypatch):
    need_browser()
    # one torch thread in the UI's training process (it inherits the environment): on a shared 2-core machine the
    # default threads oversubscribe, measured 11 s a step against 0.35 s with one
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    from playwright.sync_api import expect, sync_playwright

    runs, photos = tmp_path / "runs", tmp_path / "photos"
    write_subject_photos(photos)  # 5 photos with NAME.txt captions and NAME.mask.png masks
    ui, url = start_ui(runs)
    console = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: console.append(str(e)))
            page.set_default_timeout(60_000)
            page.goto(url)
            expect(page.locator("body[data-ready='1']")).to_be_attached()
            # the main form: what a user decides, in words with the flag beside; the rest under Advanced
            main = page.locator("#main-fields")
            expect(main.locator("label[for='f-train-max_train_steps']")).to_contain_text("Training steps")
            expect(main.locator("label[for='f-train-max_train_steps'] code")).to_have_text("--max-train-steps")
            expect(main.locator("#f-data-resolution")).to_be_visible()
            expect(main.locator("#f-train-learning_rate")).to_have_count(0)
            expect(page.locator("#preset option[value='']")).to_have_text("the base model's defaults")

            page.fill("#run-name", "sks-ball")
            page.set_input_files("#photo-input", sorted(str(f) for f in photos.iterdir()))
            expect(page.locator("#photos .photo")).to_have_count(5)
            page.fill("#f-model-model", "world")
            page.press("#f-model-model", "Tab")  # a change: the form asks for the world's defaults
            expect(page.locator("#f-data-resolution")).to_have_value("32")
            expect(page.locator("#f-train-learning_rate")).to_have_value(str(LEARNING_RATES["lora"]))
            expect(page.locator("#f-data-masked_loss")).to_be_checked()  # every photo came with its mask
            expect(page.locator("#model-defaults")).to_contain_text("defaults from the world model")
            page.fill("#f-data-instance_prompt", "a photo of a sks ball")
            page.fill("#f-train-validation_prompt", "\n".join(PROMPTS))
            page.click("#advanced summary")
            page.fill("#f-train-validation_steps", "750")  # fewer sampling rounds: the test's time, not training
            page.click("#advanced summary")
            page.screenshot(path=str(tmp_path / "new-run.png"), full_page=True)
            if os.environ.get("PEFTBOOTH_UPDATE_SCREENSHOT"):
                shutil.copy(tmp_path / "new-run.png", DOCS_SHOT)
            page.click("#start")

            page.wait_for_url("**#run/sks-ball", timeout=120_000)
            expect(page.locator("#run-state")).to_have_attribute("data-state", "finished", timeout=SLOW)
            expect(page.locator("#validation figure[data-step='1500'] img")).to_have_count(4)
            expect(page.locator("#validation-warning")).to_be_hidden()  # the samples changed
            browser.close()
    finally:
        ui.terminate()
        ui.wait(30)
    run = runs / "sks-ball"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert (cfg["data"]["resolution"], cfg["train"]["learning_rate"]) == (32, LEARNING_RATES["lora"])
    images = [Image.open(f).convert("RGB") for f in sorted((run / "validation" / "step_1500").glob("prompt*.png"))]
    share = float((judge(load_evaluator(MODEL_DIR), images)["p_subject"] > 0.5).mean())
    assert len(images) == 4 and share >= THRESHOLD, f"subject in {share:.2f} of the samples at night / on the road"
    assert not console, console
