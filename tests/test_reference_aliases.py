"""Commands written for the DreamBooth example scripts work with `peftbooth train`: the example commands of
diffusers' examples/dreambooth/README.md and of PEFT's LoRA DreamBooth guide, with only the model swapped for the
tiny one and the paths for local ones, resolve to the same settings as peftbooth's own spellings."""

import shlex

import pytest
import yaml
from conftest import draw_photos

from peftbooth.cli import main

# diffusers examples/dreambooth/README.md, "Training with prior-preservation loss" (train_dreambooth.py)
DIFFUSERS_PRIOR = """
  --pretrained_model_name_or_path=$MODEL_NAME  \\
  --instance_data_dir=$INSTANCE_DIR \\
  --class_data_dir=$CLASS_DIR \\
  --output_dir=$OUTPUT_DIR \\
  --with_prior_preservation --prior_loss_weight=1.0 \\
  --instance_prompt="a photo of sks dog" \\
  --class_prompt="a photo of dog" \\
  --resolution=512 \\
  --train_batch_size=1 \\
  --gradient_accumulation_steps=1 \\
  --learning_rate=5e-6 \\
  --lr_scheduler="constant" \\
  --lr_warmup_steps=0 \\
  --num_class_images=200 \\
  --max_train_steps=800
"""
# the same README, "Fine-tune text encoder with the UNet"
DIFFUSERS_TEXT_ENCODER = """
  --pretrained_model_name_or_path=$MODEL_NAME  \\
  --train_text_encoder \\
  --instance_data_dir=$INSTANCE_DIR \\
  --class_data_dir=$CLASS_DIR \\
  --output_dir=$OUTPUT_DIR \\
  --with_prior_preservation --prior_loss_weight=1.0 \\
  --instance_prompt="a photo of sks dog" \\
  --class_prompt="a photo of dog" \\
  --resolution=512 \\
  --train_batch_size=1 \\
  --use_8bit_adam \\
  --gradient_checkpointing \\
  --learning_rate=2e-6 \\
  --lr_scheduler="constant" \\
  --lr_warmup_steps=0 \\
  --num_class_images=200 \\
  --max_train_steps=800
"""
# the same README, "Training with Low-Rank Adaptation of Large Language Models (LoRA)" (train_dreambooth_lora.py)
DIFFUSERS_LORA = """
  --pretrained_model_name_or_path=$MODEL_NAME  \\
  --instance_data_dir=$INSTANCE_DIR \\
  --output_dir=$OUTPUT_DIR \\
  --instance_prompt="a photo of sks dog" \\
  --resolution=512 \\
  --train_batch_size=1 \\
  --gradient_accumulation_steps=1 \\
  --checkpointing_steps=100 \\
  --learning_rate=1e-4 \\
  --report_to="wandb" \\
  --lr_scheduler="constant" \\
  --lr_warmup_steps=0 \\
  --max_train_steps=500 \\
  --validation_prompt="A photo of sks dog in a bucket" \\
  --validation_epochs=50 \\
  --seed="0" \\
  --push_to_hub
"""
# PEFT's guide "DreamBooth fine-tuning with LoRA" (examples/lora_dreambooth/train_dreambooth.py)
PEFT_LORA = """
  --pretrained_model_name_or_path=$MODEL_NAME  \\
  --instance_data_dir=$INSTANCE_DIR \\
  --class_data_dir=$CLASS_DIR \\
  --output_dir=$OUTPUT_DIR \\
  --train_text_encoder \\
  --with_prior_preservation --prior_loss_weight=1.0 \\
  --num_dataloader_workers=1 \\
  --instance_prompt="a photo of sks dog" \\
  --class_prompt="a photo of dog" \\
  --resolution=512 \\
  --train_batch_size=1 \\
  --lr_scheduler="constant" \\
  --lr_warmup_steps=0 \\
  --num_class_images=200 \\
  --use_lora \\
  --lora_r 16 \\
  --lora_alpha 27 \\
  --lora_text_encoder_r 16 \\
  --lora_text_encoder_alpha 17 \\
  --learning_rate=1e-4 \\
  --gradient_accumulation_steps=1 \\
  --gradient_checkpointing \\
  --max_train_steps=800
"""


def argv(command: str, tmp_path, model: str) -> list[str]:
    text = (command.replace("$MODEL_NAME", model).replace("$INSTANCE_DIR", str(tmp_path / "photos"))
            .replace("$CLASS_DIR", str(tmp_path / "class")).replace("$OUTPUT_DIR", str(tmp_path / "out")))
    return shlex.split(text.replace("\\\n", " "))


def resolved(capsys, args) -> dict:
    capsys.readouterr()
    rc = main(["train", *args, "--print-config"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return yaml.safe_load(out)


def test_diffusers_prior_preservation_command(tmp_path, capsys, tiny_model):
    cfg = resolved(capsys, argv(DIFFUSERS_PRIOR, tmp_path, tiny_model))
    ours = resolved(capsys, [
        "--model", tiny_model, "--instance-data-dir", str(tmp_path / "photos"), "--class-data-dir",
        str(tmp_path / "class"), "--output-dir", str(tmp_path / "out"), "--with-prior-preservation",
        "--prior-loss-weight", "1.0", "--instance-prompt", "a photo of sks dog", "--class-prompt", "a photo of dog",
        "--resolution", "512", "--train-batch-size", "1", "--gradient-accumulation-steps", "1", "--learning-rate",
        "5e-6", "--lr-scheduler", "constant", "--lr-warmup-steps", "0", "--num-class-images", "200",
        "--max-train-steps", "800"])
    assert cfg == ours
    assert cfg["model"]["model"] == tiny_model and cfg["data"]["num_class_images"] == 200
    assert cfg["train"]["learning_rate"] == 5e-6 and cfg["data"]["with_prior_preservation"] is True


def test_diffusers_text_encoder_command(tmp_path, capsys, tiny_model):
    cfg = resolved(capsys, argv(DIFFUSERS_TEXT_ENCODER, tmp_path, tiny_model))
    t = cfg["train"]
    assert t["train_text_encoder"] and t["use_8bit_adam"] and t["gradient_checkpointing"]
    assert t["learning_rate"] == 2e-6 and t["max_train_steps"] == 800


def test_diffusers_lora_command(tmp_path, capsys, tiny_model):
    args = argv(DIFFUSERS_LORA, tmp_path, tiny_model)
    # the options with no equivalent are named, one line each, exit 2, nothing written
    assert main(["train", *args]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "peftbooth train: error: --report_to wandb: peftbooth logs to TensorBoard or nowhere; use --report-to "
        "tensorboard or none"]
    args[args.index("--report_to=wandb")] = "--report_to=tensorboard"
    assert main(["train", *args]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "peftbooth train: error: --validation_epochs: no equivalent in peftbooth; use --validation-steps"]
    args.remove("--validation_epochs=50")
    cfg = resolved(capsys, args)
    t = cfg["train"]
    assert (t["checkpointing_steps"], t["learning_rate"], t["max_train_steps"], t["seed"]) == (100, 1e-4, 500, 0)
    assert t["validation_prompt"] == ["A photo of sks dog in a bucket"] and t["report_to"] == "tensorboard"
    # --push_to_hub without --hub_model_id: a repo named after the output folder, in the token's namespace
    assert t["push_to_hub"] == "out"
    assert not (tmp_path / "out").exists()


def test_peft_lora_command(tmp_path, capsys, tiny_model):
    cfg = resolved(capsys, argv(PEFT_LORA, tmp_path, tiny_model))
    u, te = cfg["unet_adapter"], cfg["text_encoder_adapter"]
    assert (u["adapter"], u["rank"], u["alpha"]) == ("lora", 16, 27.0)
    assert (te["adapter"], te["rank"], te["alpha"]) == ("lora", 16, 17.0)
    assert cfg["data"]["dataloader_num_workers"] == 1 and cfg["train"]["train_text_encoder"]


def test_peft_adapter_subcommands(tmp_path, capsys, tiny_model):
    """PEFT's stable_diffusion/train_dreambooth.py: `... lokr --unet_r 8 --unet_alpha 4 --te_r 2 ...`."""
    common = ["--pretrained_model_name_or_path", tiny_model, "--instance_data_dir", str(tmp_path), "--output_dir",
              str(tmp_path / "o"), "--instance_prompt", "a photo of sks dog", "--train_text_encoder"]
    cfg = resolved(capsys, [*common, "lokr", "--unet_r", "8", "--unet_alpha", "4", "--unet_rank_dropout", "0.1",
                            "--unet_module_dropout", "0.2", "--unet_decompose_both", "--unet_decompose_factor", "4",
                            "--te_r", "2", "--te_alpha", "1"])
    u, te = cfg["unet_adapter"], cfg["text_encoder_adapter"]
    assert (u["adapter"], u["rank"], u["alpha"], u["dropout"], u["module_dropout"]) == ("lokr", 8, 4.0, 0.1, 0.2)
    assert u["decompose_both"] and u["decompose_factor"] == 4
    assert (te["adapter"], te["rank"], te["alpha"]) == ("lokr", 2, 1.0)
    cfg = resolved(capsys, [*common, "loha", "--unet_r", "4", "--unet_use_effective_conv2d"])
    assert cfg["unet_adapter"]["adapter"] == "loha" and cfg["unet_adapter"]["use_effective_conv2d"]
    assert main(["train", *common, "full"]) == 2
    assert "full fine-tuning is not done here" in capsys.readouterr().err


@pytest.mark.parametrize("flag, message", [
    ("--hub_token=abc", "--hub_token: no equivalent in peftbooth; the token comes from HF_TOKEN"),
    ("--num_train_epochs=3", "--num_train_epochs: no equivalent in peftbooth; give the length as --max-train-steps"),
    ("--enable_xformers_memory_efficient_attention", "--enable_xformers_memory_efficient_attention: no equivalent"),
    ("--instance_data_dri=photos", "--instance_data_dri: no such option"),
])
def test_options_without_equivalent_are_named(flag, message, tmp_path, capsys, tiny_model):
    assert main(["train", "--pretrained_model_name_or_path", tiny_model, flag, "--print-config"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and message in err[0], err


def test_hub_model_id_and_resume_from_checkpoint(tmp_path, capsys, tiny_model):
    cfg = resolved(capsys, ["--pretrained_model_name_or_path", tiny_model, "--output_dir", str(tmp_path / "o"),
                            "--push_to_hub", "--hub_model_id", "me/dog", "--resume_from_checkpoint", "latest",
                            "--text_encoder_lr", "5e-5", "--center_crop"])
    t = cfg["train"]
    assert (t["push_to_hub"], t["resume"], t["text_encoder_learning_rate"]) == ("me/dog", "latest", 5e-5)
    assert cfg["data"]["center_crop"] is True


def test_reference_command_trains(tmp_path, capsys, tiny_model):
    """The diffusers prior-preservation command, sized down (resolution, steps, class images) to run in seconds."""
    draw_photos(tmp_path / "photos", n=2)
    args = argv(DIFFUSERS_PRIOR, tmp_path, tiny_model)
    for old, new in [("--resolution=512", "--resolution=32"), ("--num_class_images=200", "--num_class_images=1"),
                     ("--max_train_steps=800", "--max_train_steps=2"), ("--learning_rate=5e-6", "--learning_rate=1e-3")]:
        args[args.index(old)] = new
    rc = main(["train", *args, "--class_image_steps=1", "--report_to=none"])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "unet" / "adapter_model.safetensors").is_file()
    assert len(list((tmp_path / "class").glob("*.png"))) == 1
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert saved["data"]["class_prompt"] == "a photo of dog" and saved["train"]["max_train_steps"] == 2
