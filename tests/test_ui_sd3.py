"""Stable Diffusion 3.5 Medium in the web UI's new-run form (no browser): offered in the model list beside SDXL,
accepted by the same checks as `peftbooth train`, with its family (sd3.5) and its defaults shown as any other
model's (peftbooth.models.defaults)."""

import pytest
import yaml
from conftest import draw_photos
from test_ui import call, new_run, serve  # noqa: F401 (serve: the fixture)
from test_ui_defaults import form_values

from peftbooth.models.defaults import SD3_TARGETS
from peftbooth.ui import schema

SD35 = "stabilityai/stable-diffusion-3.5-medium"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
GIVEN = ["model.model", "data.instance_prompt"]


@pytest.fixture(scope="module")
def tiny_sd35(tmp_path_factory) -> str:
    from peftbooth.models.tiny_sd3 import build_tiny_sd3_model

    return str(build_tiny_sd3_model(tmp_path_factory.mktemp("models") / "tiny-sd3.5", shape="tiny-sd3.5"))


def upload_photos(base, name, folder) -> None:
    for f in sorted(folder.glob("*.png")):
        status, r, _ = call(f"{base}/api/runs/{name}/photos?filename={f.name}", "POST", raw=f.read_bytes())
        assert status == 200, r


def test_the_model_list_offers_sd35_medium_beside_sdxl(serve):
    base, _ = serve()
    status, r, _ = call(f"{base}/api/schema")
    assert status == 200
    assert r["models"][:2] == ["tiny", "world"] and SDXL in r["models"] and SD35 in r["models"]
    assert set(schema.HUB_MODELS) <= set(r["models"])


@pytest.mark.parametrize("model, family", [(SD35, "sd3.5"), (SDXL, "sdxl")])
def test_defaults_of_a_hub_model_name_its_family(serve, model, family):
    base, _ = serve()
    status, r, _ = call(f"{base}/api/defaults", "POST", {"values": form_values(model__model=model), "given": []})
    assert status == 200 and r["family"] == family
    assert r["values"]["data.resolution"] == 1024
    assert r["line"].startswith(f"defaults from the {family} model")  # the page shows this line under the form


def test_sd35_defaults_are_the_reference_recipe_and_never_replace_what_the_user_set(serve):
    base, _ = serve()
    values = form_values(model__model=SD35, train__learning_rate="0.0001", data__resolution="512")
    status, r, _ = call(f"{base}/api/defaults", "POST",
                        {"values": values, "given": ["train.learning_rate", "data.resolution"]})
    assert status == 200 and r["family"] == "sd3.5"
    assert "train.learning_rate" not in r["values"] and "data.resolution" not in r["values"]
    assert r["values"]["unet_adapter.target_modules"] == SD3_TARGETS
    assert (r["values"]["unet_adapter.rank"], r["values"]["train.max_train_steps"]) == (4, 500)
    assert r["values"]["model.max_sequence_length"] == 77
    assert r["values"]["train.weighting_scheme"] == "logit_normal"
    assert r["values"]["train.precondition_outputs"] is True
    fresh = call(f"{base}/api/defaults", "POST", {"values": form_values(model__model=SD35), "given": []})[1]
    assert fresh["values"]["train.learning_rate"] == 4e-4


def test_sd35_hub_id_passes_the_checks_and_its_config_records_the_recipe(serve, tmp_path):
    base, runs = serve()
    name = new_run(base, "sd35")
    upload_photos(base, name, draw_photos(tmp_path / "photos"))
    values = form_values(model__model=SD35, data__instance_prompt="a photo of sks dog")
    status, r, _ = call(f"{base}/api/runs/{name}/check", "POST", {"values": values, "given": GIVEN})
    assert status == 200 and r["ok"], r
    assert not (runs / name / "config.yaml").exists()  # check writes nothing
    # the config.yaml Start would write (the run itself downloads the model, not tested offline)
    cfg, errors = schema.check_run(values, str(runs / name / "photos"), str(runs / name), GIVEN)
    assert errors == {}
    saved = yaml.safe_load(schema.config_yaml(cfg))
    assert saved["model"]["model"] == SD35 and saved["data"]["resolution"] == 1024
    assert (saved["train"]["learning_rate"], saved["unet_adapter"]["target_modules"]) == (4e-4, SD3_TARGETS)


def test_a_typed_sd35_folder_is_accepted_at_its_own_size(serve, tmp_path, tiny_sd35):
    base, _ = serve()
    status, r, _ = call(f"{base}/api/defaults", "POST",
                        {"values": form_values(model__model=tiny_sd35), "given": []})
    assert r["family"] == "sd3.5" and r["values"]["data.resolution"] == 64  # transformer 32 x tiny VAE factor 2
    name = new_run(base, "typed")
    upload_photos(base, name, draw_photos(tmp_path / "photos"))
    values = form_values(model__model=tiny_sd35, data__instance_prompt="a photo of sks dog")
    status, r, _ = call(f"{base}/api/runs/{name}/check", "POST", {"values": values, "given": GIVEN})
    assert status == 200 and r["ok"], r  # a diffusers SD3 folder: transformer/, no unet/
    cfg, errors = schema.check_run(values, str(tmp_path / "photos"), str(tmp_path / "run"), GIVEN)
    assert errors == {} and cfg.data.resolution == 64 and cfg.train.learning_rate == 4e-4
