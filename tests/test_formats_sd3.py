"""SD3 / SD 3.5 runs: export --format diffusers (StableDiffusion3Pipeline.load_lora_weights), --format kohya (the
sd-scripts / ComfyUI single file with fused qkv) and import of such a file, each checked on generated images
against the PEFT adapters applied directly (tiny SD 3.5 model, two steps at 64 x 64)."""

from __future__ import annotations

import pytest
import torch
from formats_helpers import header
from formats_sd3_helpers import (
    SD3_PARTS,
    SD3_PROMPT,
    SD3_TARGETS,
    SD3_TE_TARGETS,
    comfy_apply,
    sd3_adapter,
    sd3_images,
    sd3_peft_images,
    sd3_pipeline,
    tiny_sd3_model,
    write_sd3_run,
)
from safetensors.torch import load_file, save_file

from peftbooth.config.sections import UsageError
from peftbooth.runs.formats import export_run, import_kohya

model = tiny_sd3_model  # the shared fixture, under the name the tests ask for
TOL = 1e-4

# transformer config, text-encoder config (None: transformer only)
LORA_RUNS = {
    "plain": lambda: (sd3_adapter(), sd3_adapter(targets=SD3_TE_TARGETS, alpha=2.0)),
    # per-module ranks and alphas, rsLoRA: q / k / v of one fused layer with different ranks and scales
    "patterns_rslora": lambda: (sd3_adapter(r=4, alpha=3.0, use_rslora=True, rank_pattern={"to_k": 2},
                                            alpha_pattern={"add_v_proj": 5.0}), None),
    # only q and v adapted: the fused layer has a zero block for k
    "q_and_v": lambda: (sd3_adapter(targets=["to_q", "to_v"]), None),
}


@pytest.fixture(scope="module")
def runs(model, tmp_path_factory):
    root, cache = tmp_path_factory.mktemp("sd3-runs"), {}

    def make(name: str, build=None):
        if name not in cache:
            transformer, te = (build or LORA_RUNS[name])()
            cache[name] = write_sd3_run(model, root / name, transformer, te, seed=len(cache))
        return cache[name]

    return make


@pytest.fixture(scope="module")
def base_images(model):
    return sd3_images(sd3_pipeline(model))


def assert_same_images(got, want, base):
    assert (want - base).abs().max() > 1e-2  # the adapter changes the images, so equality means something
    assert (got - want).abs().max() <= TOL


@pytest.mark.parametrize("name", list(LORA_RUNS))
def test_diffusers_export_loads_in_the_sd3_pipeline(name, runs, model, base_images, tmp_path):
    run = runs(name)
    path = export_run(run, "diffusers", tmp_path / "out")
    keys = load_file(path).keys()
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys
    assert "transformer.transformer_blocks.0.attn2.to_q.lora_B.weight" in keys  # SD 3.5's MMDiT-X attention
    if (run / "text_encoder_2").is_dir():
        assert "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys
    pipe = sd3_pipeline(model)
    pipe.load_lora_weights(str(path))
    assert_same_images(sd3_images(pipe), sd3_peft_images(model, run), base_images)


def test_load_lora_weights_gives_what_peftbooth_generate_gives(runs, model, tmp_path):
    """The done-when of issue 25: diffusers' own SD3 pipeline with the exported file draws the images
    `peftbooth generate` (AdapterPipeline) draws with the run, same seed and settings."""
    import numpy as np

    from peftbooth.inference.pipeline import AdapterPipeline

    run = runs("plain")
    path = export_run(run, "diffusers", tmp_path / "out")
    ours = AdapterPipeline(model, max_sequence_length=32)
    ours.load_adapter(run)
    kw = dict(num_inference_steps=2, guidance_scale=4.0, height=64, width=64)
    mine = ours.generate(SD3_PROMPT, num_images=1, seed=3, steps=2, guidance_scale=4.0, height=64, width=64)[0]
    pipe = sd3_pipeline(model)
    pipe.load_lora_weights(str(path))
    theirs = pipe(SD3_PROMPT, generator=torch.Generator().manual_seed(3), max_sequence_length=32, **kw).images[0]
    base = sd3_pipeline(model)(SD3_PROMPT, generator=torch.Generator().manual_seed(3), max_sequence_length=32,
                               **kw).images[0]
    a, b, c = (np.asarray(x, dtype=np.int16) for x in (mine, theirs, base))
    assert np.abs(a - c).max() > 10  # the adapter changes the images: equality below means something
    assert np.abs(a - b).max() <= 1  # uint8 rounding of the same float images


def test_diffusers_export_refuses_loha(runs, tmp_path):
    run = runs("loha", lambda: (sd3_adapter("loha", targets=["to_out.0"]), None))
    with pytest.raises(UsageError, match="--format diffusers holds LoRA only") as e:
        export_run(run, "diffusers", tmp_path / "x")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", list(LORA_RUNS))
def test_kohya_export_is_read_by_comfyui_rules(name, runs, model, base_images, tmp_path):
    run = runs(name)
    path = export_run(run, "kohya", tmp_path / "out.safetensors")
    tensors = load_file(path)
    qkv = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    assert tensors[f"{qkv}.lora_up.weight"].shape[0] == 3 * 32  # one fused layer for to_q / to_k / to_v
    assert not any(".to_q" in k or "_to_q" in k for k in tensors)
    if name == "plain":
        for key in ("lora_unet_joint_blocks_0_context_block_attn_qkv", "lora_unet_joint_blocks_0_x_block_attn2_qkv",
                    "lora_unet_joint_blocks_0_x_block_attn_proj", "lora_unet_joint_blocks_0_context_block_mlp_fc2",
                    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                    "lora_te2_text_model_encoder_layers_2_mlp_fc1"):
            assert f"{key}.alpha" in tensors, key
    assert header(path)["ss_base_model_version"].startswith("sd3")
    pipe = sd3_pipeline(model)
    comfy_apply(pipe, path)
    assert_same_images(sd3_images(pipe), sd3_peft_images(model, run), base_images)


def peft_deltas(folder) -> dict:
    """{module: scale * B @ A} of a LoRA folder: what it adds to each layer."""
    from peftbooth.runs.formats.common import read_adapter

    adapter = read_adapter(folder, folder.name)
    return {m: adapter.scale(m) * p["lora_B.weight"].double() @ p["lora_A.weight"].double()
            for m, p in adapter.modules.items()}


@pytest.mark.parametrize("name", list(LORA_RUNS))
def test_kohya_import_round_trip(name, runs, model, base_images, tmp_path):
    run = runs(name)
    path = export_run(run, "kohya", tmp_path / "out.safetensors")
    out = import_kohya(path, tmp_path / "imported", model)
    for part in SD3_PARTS:
        assert (run / part).is_dir() == (out / part).is_dir(), part
        if not (run / part).is_dir():
            continue
        if name == "plain":  # equal ranks: the very tensors come back
            a, b = load_file(run / part / "adapter_model.safetensors"), load_file(out / part / "adapter_model.safetensors")
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a), part
        want, got = peft_deltas(run / part), peft_deltas(out / part)
        assert want.keys() == got.keys()  # q_and_v: no k layer appears
        assert all((want[m] - got[m]).abs().max() < 1e-6 for m in want), part
    assert_same_images(sd3_peft_images(model, out), sd3_peft_images(model, run), base_images)


def test_loha_and_lokr_on_unfused_layers_round_trip(runs, model, base_images, tmp_path):
    targets = ["to_out.0", "to_add_out", "ff.net.0.proj", "ff_context.net.2"]
    for kind in ("loha", "lokr"):
        run = runs(f"{kind}-unfused", lambda k=kind: (sd3_adapter(k, targets=targets, r=2, alpha=3.0),
                                                      sd3_adapter(k, targets=SD3_TE_TARGETS, r=2)))
        path = export_run(run, "kohya", tmp_path / f"{kind}.safetensors")
        pipe = sd3_pipeline(model)
        comfy_apply(pipe, path)
        want = sd3_peft_images(model, run)
        assert_same_images(sd3_images(pipe), want, base_images)
        out = import_kohya(path, tmp_path / f"{kind}-imported", model)
        assert_same_images(sd3_peft_images(model, out), want, base_images)


def test_lycoris_on_fused_qkv_is_refused(runs, tmp_path):
    run = runs("loha-qkv", lambda: (sd3_adapter("loha", targets=["to_q", "to_out.0"]), None))
    with pytest.raises(UsageError, match="fused qkv") as e:
        export_run(run, "kohya", tmp_path / "x.safetensors")
    assert "\n" not in str(e.value)


# --- bad input: one line naming the file or flag


@pytest.fixture(scope="module")
def sd3_file(runs, tmp_path_factory):
    return export_run(runs("plain"), "kohya", tmp_path_factory.mktemp("file") / "plain.safetensors")


def edited(sd3_file, tmp_path, edit):
    tensors = load_file(sd3_file)
    edit(tensors)
    path = tmp_path / "edited.safetensors"
    save_file(tensors, path)
    return path


def refused(path, model, match, tmp_path):
    with pytest.raises(UsageError, match=match) as e:
        import_kohya(path, tmp_path / "out", model)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_import_needs_an_sd3_model(sd3_file, model, tmp_path):
    refused(sd3_file, None, "is an SD3 adapter.*pass --model", tmp_path)


def test_import_refuses_t5_keys(sd3_file, model, tmp_path):
    path = edited(sd3_file, tmp_path, lambda t: t.update({"lora_te3_encoder_block_0_layer_0_SelfAttention_q.alpha":
                                                            torch.tensor(1.0)}))
    refused(path, model, "T5", tmp_path)


def test_import_refuses_wrong_shapes_and_names(sd3_file, model, tmp_path):
    qkv = "lora_unet_joint_blocks_0_x_block_attn_proj.lora_down.weight"
    path = edited(sd3_file, tmp_path, lambda t: t.update({qkv: torch.zeros(4, 48)}))
    refused(path, model, "shape", tmp_path)
    path = edited(sd3_file, tmp_path, lambda t: t.update({"lora_unet_joint_blocks_9_x_block_attn_proj.alpha":
                                                            torch.tensor(1.0),
                                                            "lora_unet_joint_blocks_9_x_block_attn_proj.lora_down"
                                                            ".weight": torch.zeros(4, 32),
                                                            "lora_unet_joint_blocks_9_x_block_attn_proj.lora_up"
                                                            ".weight": torch.zeros(32, 4)}))
    refused(path, model, "match no layer", tmp_path)


def test_import_refuses_lycoris_on_fused_qkv(sd3_file, model, tmp_path):
    name = "lora_unet_joint_blocks_0_x_block_attn_qkv"

    def to_loha(t):
        del t[f"{name}.lora_down.weight"], t[f"{name}.lora_up.weight"]
        t.update({f"{name}.hada_{w}": torch.zeros(96 if w.endswith("a") else 2, 2 if w.endswith("a") else 32)
                  for w in ("w1_a", "w1_b", "w2_a", "w2_b")})

    refused(edited(sd3_file, tmp_path, to_loha), model, "fused qkv", tmp_path)


def test_sd3_file_with_another_model_and_the_reverse(sd3_file, model, tiny_model, tmp_path):
    refused(sd3_file, tiny_model, "is an SD3 adapter.*not an SD3 model", tmp_path)
    sd1 = tmp_path / "sd1.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(2, 32),
               "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(32, 2)},
              sd1)
    refused(sd1, model, "not an SD3 adapter", tmp_path)


def test_cli_export_and_import(runs, model, tmp_path, capsys):
    from peftbooth.cli import Parser
    from peftbooth.runs.formats.commands import add_commands

    parser = Parser(prog="peftbooth")
    add_commands(parser.add_subparsers(dest="command", required=True, parser_class=Parser))

    def call(*argv) -> int:
        args = parser.parse_args([str(a) for a in argv])
        return args.func(args)

    path = tmp_path / "a.safetensors"
    assert call("export", runs("plain"), "--format", "kohya", "--output", path) == 0
    assert call("import", path, "--output-dir", tmp_path / "imp", "--model", model) == 0
    assert (tmp_path / "imp" / "transformer" / "adapter_config.json").is_file()
    assert SD3_TARGETS  # the default targets cover every mapped attention and MLP layer
