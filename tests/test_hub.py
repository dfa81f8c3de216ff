"""Model card and sharing. The Hub cannot be reached from the test machines: what is checked is exactly which
files would be uploaded and that pushing is refused, clearly and before any work, without a token or offline."""

import json

import yaml

from conftest import tiny_config
from peftbooth.cli import main
from peftbooth.hub import files_to_upload
from peftbooth.train import train


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_model_card_of_a_run(tiny_model, photos, tmp_path):
    out = tmp_path / "run"
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "step_0.png").write_bytes(b"png")  # the card links the samples it finds
    train(tiny_config(tiny_model, photos, out, **{
        "unet_adapter.adapter": "loha", "train.train_text_encoder": True, "data.with_prior_preservation": True,
        "data.class_prompt": "a photo of a dog", "data.num_class_images": 1}))
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == tiny_model and meta["instance_prompt"] == "a photo of sks dog"
    assert {"dreambooth", "loha", "text-to-image"} <= set(meta["tags"]) and meta["license"] == "other"
    assert "UNet adapter: loha, rank 4, alpha 4.0" in card and "text-encoder adapter: loha" in card
    assert "prior preservation: `a photo of a dog`, 1 class images" in card
    assert "![step_0](samples/step_0.png)" in card
    # train() also leaves the offline proxies and the report in the run folder
    proxies = json.loads((out / "proxies.json").read_text())
    assert proxies["instance"]["loss_before"] > 0 and proxies["class"]["drift"] >= 0
    assert "<img" in (out / "report.html").read_text()


def test_exactly_these_files_are_uploaded(tmp_path):
    run = tmp_path / "run"
    for rel in ["README.md", "config.yaml", "unet/adapter_config.json", "unet/adapter_model.safetensors",
                "text_encoder/adapter_config.json", "text_encoder/adapter_model.safetensors", "samples/a.png",
                "validation/step_10/0.png", "checkpoints/checkpoint-5/unet/adapter_model.safetensors",
                "class_images/class-00000-ab.png", "logs/peftbooth/events.out", ".staging-x/README.md",
                "unet/.partial.tmp", "notes.txt"]:
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text("x")
    assert files_to_upload(run) == [
        "README.md", "config.yaml", "samples/a.png", "text_encoder/adapter_config.json",
        "text_encoder/adapter_model.safetensors", "unet/adapter_config.json", "unet/adapter_model.safetensors",
        "validation/step_10/0.png",
    ]
    assert main(["push", str(run), "me/dog", "--dry-run"]) == 0


def test_push_is_refused_offline_and_without_token(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    (run / "unet").mkdir(parents=True)
    (run / "unet" / "adapter_model.safetensors").write_text("x")
    assert main(["push", str(run), "me/dog"]) == 2  # the tests run with HF_HUB_OFFLINE=1
    assert "HF_HUB_OFFLINE is set, so nothing can be uploaded" in capsys.readouterr().err

    import huggingface_hub.constants as constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"), raising=False)
    assert main(["push", str(run), "me/dog"]) == 2
    err = capsys.readouterr().err
    assert "no Hugging Face token; set HF_TOKEN in the environment or run `hf auth login`" in err

    assert main(["push", str(run), "not a repo"]) == 2
    assert "repo id 'not a repo' must look like 'user/name'" in capsys.readouterr().err
    assert main(["push", str(tmp_path), "me/dog"]) == 2
    assert "is not a finished run" in capsys.readouterr().err


def test_train_push_to_hub_refused_before_any_work(tiny_model, photos, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["train", "--model", tiny_model, "--instance-data-dir", str(photos), "--instance-prompt", "p",
                 "--output-dir", str(out), "--push-to-hub", "me/dog"])
    assert code == 2 and "HF_HUB_OFFLINE is set" in capsys.readouterr().err
    assert not out.exists()
