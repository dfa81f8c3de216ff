"""--train-token-embedding: the identifier's own input vector, trained beside the adapters, saved, resumed and
swapped in and out at generation. The tiny model's tokenizer has one token per character, so its one-token
identifier here is the one-letter word 'z'."""

import json

import pytest
import torch
from conftest import draw_photos, tiny_config
from safetensors.torch import load_file

from peftbooth.adapters.token_embedding import IdentifierEmbedding, identifier_id
from peftbooth.cli import main
from peftbooth.config.sections import UsageError
from peftbooth.inference.pipeline import AdapterPipeline
from peftbooth.training.loop import train

TOKEN = {"data.instance_prompt": "a photo of z dog", "train.train_text_encoder": True,
         "train.train_token_embedding": "z", "train.max_train_steps": 3, "train.learning_rate": 1e-2}


def test_splice_replaces_only_the_identifier_and_trains_only_its_row():
    torch.manual_seed(0)
    table = torch.nn.Embedding(10, 4).requires_grad_(False)
    frozen = table.weight.clone()
    rows = IdentifierEmbedding(table, [7])
    assert torch.equal(rows.weight, frozen[[7]])  # starts at the pretrained row
    table.register_forward_hook(rows.splice)
    with torch.no_grad():
        rows.weight += 1.0
    ids = torch.tensor([[1, 7, 3], [7, 7, 2]])
    out = table(ids)  # (2, 3, 4)
    expected = frozen[ids].clone()
    expected[ids == 7] = frozen[7] + 1.0
    assert torch.allclose(out, expected)
    out.sum().backward()
    assert torch.equal(rows.weight.grad, torch.full((1, 4), 3.0))  # three occurrences, d(sum)/d(row) = 1 each
    assert table.weight.grad is None and torch.equal(table.weight, frozen)


@pytest.fixture(scope="module")
def token_run(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("token")
    return train(tiny_config(tiny_model, draw_photos(root / "photos"), root / "run", **TOKEN))


def base_table(tiny_model):
    from transformers import CLIPTextModel

    return CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder").get_input_embeddings().weight


def test_training_writes_the_trained_row_and_leaves_the_table(tiny_model, token_run):
    from safetensors import safe_open
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")
    z = identifier_id(tok, "z")
    f = token_run / "token_embeddings.safetensors"
    with safe_open(str(f), framework="pt") as handle:
        assert handle.metadata() == {"token": "z"}
    rows = load_file(f)
    assert list(rows) == ["text_encoder"] and rows["text_encoder"].shape == (1, base_table(tiny_model).shape[1])
    assert not torch.allclose(rows["text_encoder"][0], base_table(tiny_model)[z])  # it was trained
    # the adapter folder holds adapter weights only, not the embedding table
    assert not any("embed" in k for k in load_file(token_run / "text_encoder" / "adapter_model.safetensors"))


def test_generation_swaps_the_row_in_and_out(tiny_model, token_run, tmp_path):
    from transformers import CLIPTokenizer

    z = identifier_id(CLIPTokenizer.from_pretrained(tiny_model, subfolder="tokenizer"), "z")
    pretrained = base_table(tiny_model)[z].detach()
    trained = load_file(token_run / "token_embeddings.safetensors")["text_encoder"][0]
    pipe = AdapterPipeline(tiny_model, device="cpu")
    table = pipe.pipe.text_encoder.get_input_embeddings().weight
    before = table.detach().clone()
    pipe.load_adapter(token_run, "a")
    assert torch.allclose(table[z], trained)
    changed = (table != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [z]  # no other word moved
    pipe.set_adapters({"a": 0.5})
    assert torch.allclose(table[z], pretrained + 0.5 * (trained - pretrained))
    pipe.disable_adapters()
    assert torch.equal(table[z], pretrained)
    pipe.set_adapters({"a": 1.0})
    # a second adapter that trained the same word cannot be mixed with the first: refused, nothing changed
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(token_run, copy)
    pipe.load_adapter(copy, "b")
    with pytest.raises(UsageError, match=r"^--mix: adapters a and b both trained the word 'z'; mix adapters whose "
                                         r"identifiers differ$"):
        pipe.set_adapters({"a": 1.0, "b": 1.0})
    assert pipe.active == {"b": 1.0} and torch.allclose(table[z], trained)
    pipe.unload("b")  # the active one: nothing is active after it, not 'a' switched on behind the caller's back
    assert pipe.active == {} and torch.equal(table[z], pretrained)
    pipe.unload("a")
    assert torch.equal(table[z], pretrained)


def test_a_token_file_for_another_model_is_refused_before_loading(tiny_model, token_run, tmp_path):
    import shutil

    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    shutil.copytree(token_run, bad)
    save_file({"text_encoder": torch.zeros(1, 7)}, str(bad / "token_embeddings.safetensors"), metadata={"token": "z"})
    pipe = AdapterPipeline(tiny_model, device="cpu")
    with pytest.raises(UsageError, match=r"text_encoder embedding has shape \(1, 7\), this model needs \(1, 32\)"):
        pipe.load_adapter(bad, "bad")
    assert pipe.adapters == {} and pipe._peft == {}


@pytest.mark.parametrize("argv, message", [
    (["--instance-prompt", "a photo of z dog", "--train-token-embedding", "z"],
     "--train-token-embedding needs --train-text-encoder"),
    (["--instance-prompt", "a photo of z dog", "--train-token-embedding", "q", "--train-text-encoder"],
     "--train-token-embedding q: the word is not in --instance-prompt 'a photo of z dog'"),
    (["--instance-prompt", "a photo of sks dog", "--train-token-embedding", "sks", "--train-text-encoder"],
     "--train-token-embedding sks: the tokenizer splits it into 3 tokens; choose a word that is one token"),
])
def test_bad_token_embedding_flags_exit_2_before_writing(tiny_model, photos, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    code = main(["train", "--model", tiny_model, "--instance-data-dir", str(photos), "--output-dir", str(out),
                 "--resolution", "32", *argv])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_resume_restores_the_trained_row_bitwise(tiny_model, photos, tmp_path, monkeypatch):
    import signal

    from test_resume import adapter_tensors, assert_bitwise_equal, signal_at_step

    from peftbooth.training.signals import TrainingInterrupted

    settings = {**TOKEN, "train.max_train_steps": 4, "train.seed": 3}

    def tensors(out):
        return {**adapter_tensors(out), **load_file(out / "token_embeddings.safetensors")}

    reference = tensors(train(tiny_config(tiny_model, photos, tmp_path / "ref", **settings)))
    out = tmp_path / "run"
    signal_at_step(monkeypatch, 2, signal.SIGTERM)
    with pytest.raises(TrainingInterrupted):
        train(tiny_config(tiny_model, photos, out, **settings))
    monkeypatch.undo()
    resumed = tensors(train(tiny_config(tiny_model, photos, out, **settings, **{"train.resume": "latest"})))
    assert_bitwise_equal(resumed, reference)
    assert json.loads((out / "train_stats.json").read_text())  # a finished run


def test_export_and_fuse_carry_the_row_or_refuse(tiny_model, token_run, tmp_path, capsys):
    from transformers import CLIPTextModel, CLIPTokenizer

    from peftbooth.inference.fuse import fuse_run
    from peftbooth.runs.formats import export_run

    peft_copy = export_run(token_run, "peft", tmp_path / "peft")
    assert (peft_copy / "token_embeddings.safetensors").read_bytes() == \
        (token_run / "token_embeddings.safetensors").read_bytes()
    for fmt in ("diffusers", "kohya"):
        assert main(["export", str(token_run), "--format", fmt, "--output", str(tmp_path / fmt)]) == 2
        assert "which the " + fmt + " format does not carry; export --format peft" in capsys.readouterr().err
        assert not (tmp_path / fmt).exists()
    fused = fuse_run(tiny_model, token_run, tmp_path / "fused")
    z = identifier_id(CLIPTokenizer.from_pretrained(tiny_model, subfolder="tokenizer"), "z")
    table = CLIPTextModel.from_pretrained(fused, subfolder="text_encoder").get_input_embeddings().weight
    trained = load_file(token_run / "token_embeddings.safetensors")["text_encoder"][0]
    assert torch.allclose(table[z], trained)
    others = torch.ones(table.shape[0], dtype=torch.bool)
    others[z] = False
    assert torch.equal(table[others], base_table(tiny_model)[others])


def test_shared_repo_carries_the_row_and_no_diffusers_file(token_run, tmp_path):
    from peftbooth.runs.hub import stage_repo

    files = stage_repo(token_run, tmp_path / "repo")
    assert "token_embeddings.safetensors" in files and "pytorch_lora_weights.safetensors" not in files
    assert (tmp_path / "repo" / "token_embeddings.safetensors").is_file()
    card = (token_run / "README.md").read_text()
    assert "the identifier `z`'s input embedding, trained" in card and "--format kohya" not in card
