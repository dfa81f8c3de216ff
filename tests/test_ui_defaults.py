"""The new-run form's defaults follow the base model, and its main part shows what a user must decide (no browser;
tests/test_ui_world.py runs a world model in Chromium with the defaults)."""

import yaml
from test_ui import call, new_run, serve  # noqa: F401 (serve: the fixture)

from peftbooth.ui import schema
from peftbooth.world.recipe import LEARNING_RATES, RANKS


def form_values(**changes) -> dict:
    """What the page sends: every field at its dataclass default (as the inputs show it), with `changes`."""
    values = {f["key"]: ("" if f["default"] is None else f["default"]) for f in schema.form_fields()}
    values.update({k.replace("__", "."): v for k, v in changes.items()})
    return values


def test_main_form_holds_what_a_user_decides_in_words_with_the_flag():
    fields = {f["key"]: f for f in schema.form_fields()}
    main = {k for k, f in fields.items() if f["main"]}
    # photos and the preset sit above these; the adapter type, sample interval and the rest are under Advanced
    assert main == {"model.model", "data.instance_prompt", "data.with_prior_preservation", "data.class_prompt",
                    "data.resolution", "train.max_train_steps", "train.validation_prompt"}
    for f in fields.values():
        assert f["label"] and not f["label"].startswith("-") and "_" not in f["label"], f
    assert fields["train.max_train_steps"]["label"] == "Training steps"
    assert fields["train.max_train_steps"]["flag"] == "--max-train-steps"
    # presets are named for what they do, and none overrides the model's learning rate
    assert set(schema.PRESET_LABELS) == {"", *schema.PRESETS}
    assert all(" " in label for label in schema.PRESET_LABELS.values())
    assert not any("train.learning_rate" in p for p in schema.PRESETS.values())


def test_defaults_follow_the_model_and_never_replace_what_the_user_set(serve, tmp_path):
    base, runs = serve()
    values = form_values(model__model="world", train__learning_rate="0.0005")
    status, r, _ = call(f"{base}/api/defaults", "POST", {"values": values, "given": ["train.learning_rate"]})
    assert status == 200 and r["family"] == "world"
    assert r["values"]["data.resolution"] == 32 and r["values"]["unet_adapter.rank"] == RANKS["lora"]
    assert r["values"]["train.train_text_encoder"] is True
    assert "train.learning_rate" not in r["values"]  # the user's 5e-4 stands
    assert r["line"].startswith("defaults from the world model")
    status, tiny, _ = call(f"{base}/api/defaults", "POST", {"values": form_values(model__model="tiny"), "given": []})
    assert tiny["values"] == {"data.resolution": 64}  # a random model has no recipe, only its own size


def test_start_with_the_forms_defaults_trains_the_worlds_recipe(serve, tmp_path):
    from peftbooth.world.scenes import write_subject_photos

    base, runs = serve()
    name = new_run(base, "ball")
    write_subject_photos(tmp_path / "photos")
    # photos first, then their masks (a mask needs its photo)
    for f in sorted((tmp_path / "photos").glob("*.png"), key=lambda f: f.name.endswith(".mask.png")):
        status, r, _ = call(f"{base}/api/runs/{name}/photos?filename={f.name}", "POST", raw=f.read_bytes())
        assert status == 200, r
    values = form_values(model__model="world", data__instance_prompt="a photo of a sks ball")
    status, r, _ = call(f"{base}/api/runs/{name}/check", "POST",
                        {"values": values, "given": ["model.model", "data.instance_prompt"]})
    assert status == 200 and r["ok"], r
    status, r, _ = call(f"{base}/api/runs/{name}/start", "POST",
                        {"values": values, "given": ["model.model", "data.instance_prompt"]})
    assert r["ok"], r
    call(f"{base}/api/runs/{name}/stop", "POST", {})  # only the saved config matters here
    cfg = yaml.safe_load((runs / name / "config.yaml").read_text())  # the values the run uses, recorded
    assert (cfg["data"]["resolution"], cfg["train"]["learning_rate"]) == (32, LEARNING_RATES["lora"])
    assert (cfg["unet_adapter"]["target_modules"], cfg["train"]["max_train_steps"]) == ("all", 1500)
    assert cfg["data"]["masked_loss"] is True  # every uploaded photo has its mask
