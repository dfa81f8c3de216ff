"""Model card and sharing. The Hub cannot be reached from the test machines: what is checked is exactly which
files would be uploaded and that pushing is refused, clearly and before any work, without a token or offline."""

import json
from pathlib import Path

import yaml
from conftest import tiny_config

from peftbooth.cli import main
from peftbooth.runs.hub import files_to_upload
from peftbooth.training.loop import train


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
    # a local folder is no base model the Hub can link to: the key is left out, not filled with a path
    assert "base_model" not in meta and meta["instance_prompt"] == "a photo of sks dog"
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


def test_card_base_model_is_only_a_hub_id(tiny_model):
    from peftbooth.config.sections import TrainConfig
    from peftbooth.runs.hub import model_card

    stats = {"steps": 1, "final_loss": 0.1}
    for model, expected in [("stable-diffusion-v1-5/stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
                            ("tiny", None), (tiny_model, None), ("./models/sd15", None), ("/abs/path/model", None)]:
        cfg = TrainConfig()
        cfg.model.model, cfg.data.instance_prompt = model, "a photo of sks dog"
        meta = front_matter(model_card(cfg.resolved(), stats, Path("run")))
        assert meta.get("base_model") == expected, model


def test_pushed_repo_loads_with_diffusers_load_lora_weights(tiny_model, photos, tmp_path, capsys, monkeypatch):
    """`push --output DIR` lays the repo out as it would be uploaded; diffusers' own loader, given that folder as
    it would be given 'user/name', loads the adapters at their trained strength."""
    run = train(tiny_config(tiny_model, photos, tmp_path / "run", **{
        "train.train_text_encoder": True, "unet_adapter.alpha": 8.0, "train.learning_rate": 1e-2,
        "train.max_train_steps": 3}))
    listed = files_to_upload(run)
    assert "pytorch_lora_weights.safetensors" in listed
    repo = tmp_path / "repo"
    assert main(["push", str(run), "me/dog", "--output", str(repo)]) == 0
    assert sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()) == listed
    assert not (run / "pytorch_lora_weights.safetensors").exists()  # the run folder itself is left as it was

    import torch
    from peft import PeftModel

    from peftbooth.models.loading import load_components, load_pipeline

    pipe = load_pipeline(tiny_model)
    pipe.load_lora_weights(str(repo))  # what pipe.load_lora_weights("me/dog") does with the downloaded repo
    c = load_components(tiny_model)
    unet = PeftModel.from_pretrained(c.unet, run / "unet").eval()
    te = PeftModel.from_pretrained(c.text_encoder, run / "text_encoder").eval()
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(1, 4, 4, 4, generator=g), torch.tensor([500]), torch.randn(1, 77, 32, generator=g)
    ids = torch.randint(0, 99, (1, 77), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, ctx).sample, unet(x, t, ctx).sample, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(pipe.text_encoder(ids)[0], te(ids)[0], rtol=1e-4, atol=1e-5)
        pipe.unload_lora_weights()
        assert (pipe.unet(x, t, ctx).sample - unet(x, t, ctx).sample).abs().max() > 1e-4  # the adapter mattered

    # a LoHa run has no diffusers-format file to offer: only its PEFT folders are shared
    loha = train(tiny_config(tiny_model, photos, tmp_path / "loha", **{"unet_adapter.adapter": "loha"}))
    assert "pytorch_lora_weights.safetensors" not in files_to_upload(loha)
    assert main(["push", str(run), "me/dog", "--output", str(repo)]) == 2  # an existing folder is not overwritten
    assert "already exists" in capsys.readouterr().err

    # push itself hands the Hub client exactly that layout (the Hub is out of reach here: the client records)
    import huggingface_hub

    uploads = []

    class RecordingApi:
        def __init__(self, token):
            assert token == "hf_test"

        def create_repo(self, repo_id, **kw):
            return type("Url", (str,), {"repo_id": "me/" + repo_id if "/" not in repo_id else repo_id})("https://x")

        def upload_folder(self, folder_path, repo_id, allow_patterns, **kw):
            found = sorted(p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file())
            uploads.append((repo_id, sorted(allow_patterns), found))

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    assert main(["push", str(run), "dog"]) == 0  # a bare name: the token's own namespace
    assert uploads == [("me/dog", listed, listed)]
