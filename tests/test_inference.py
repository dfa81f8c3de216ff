"""One base pipeline, several adapters: switching, mixing and unloading give the images they should."""

import numpy as np
import pytest
from conftest import draw_photos, tiny_config
from PIL import Image

from peftbooth.cli import main
from peftbooth.inference.pipeline import AdapterPipeline
from peftbooth.training.loop import train

GEN = dict(prompt="a photo of sks dog", num_images=2, seed=3, steps=2, height=32, width=32)


@pytest.fixture(scope="module")
def two_runs(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    photos = draw_photos(root / "photos")
    a = train(tiny_config(tiny_model, photos, root / "dog-lora", **{
        "unet_adapter.adapter": "lora", "train.train_text_encoder": True, "train.max_train_steps": 3,
        "train.learning_rate": 1e-2}))
    b = train(tiny_config(tiny_model, photos, root / "dog-lokr", **{
        "unet_adapter.adapter": "lokr", "unet_adapter.target_modules": "attn-ff", "train.max_train_steps": 3,
        "train.learning_rate": 1e-2}))
    return a, b


def pixels(images):
    return np.stack([np.asarray(i, dtype=np.int16) for i in images])


def test_switch_mix_and_unload_on_one_pipeline(tiny_model, two_runs):
    a, b = two_runs
    pipe = AdapterPipeline(tiny_model)
    base = pixels(pipe.generate(**GEN))
    pipe.load_adapter(a, "a")
    pipe.load_adapter(b, "b")
    assert set(pipe.adapters) == {"a", "b"} and pipe.adapters["a"] == {"unet", "text_encoder"}
    pipe.set_adapters({"a": 1.0})
    img_a = pixels(pipe.generate(**GEN))
    pipe.set_adapters({"b": 1.0})
    img_b = pixels(pipe.generate(**GEN))
    pipe.set_adapters({"a": 0.5, "b": 0.5})
    mix = pixels(pipe.generate(**GEN))
    assert not np.array_equal(img_a, img_b)
    assert not np.array_equal(mix, img_a) and not np.array_equal(mix, img_b)
    assert not np.array_equal(img_a, base)
    pipe.set_adapters({"a": 1.0})  # switching back is exact
    np.testing.assert_array_equal(pixels(pipe.generate(**GEN)), img_a)
    pipe.disable_adapters()
    np.testing.assert_array_equal(pixels(pipe.generate(**GEN)), base)

    # each equals that adapter loaded alone on a fresh pipeline, same seed
    for run, expected in [(a, img_a), (b, img_b)]:
        alone = AdapterPipeline(tiny_model)
        alone.load_adapter(run)
        np.testing.assert_array_equal(pixels(alone.generate(**GEN)), expected)

    # unloading puts the original layers back: the base output returns
    pipe.unload("a")
    pipe.unload("b")
    assert not pipe.adapters
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert not any(isinstance(m, BaseTunerLayer) for m in pipe.pipe.unet.modules())
    np.testing.assert_array_equal(pixels(pipe.generate(**GEN)), base)


def test_mix_is_base_plus_the_weighted_sum_of_deltas(tiny_model, two_runs):
    """Numerically, at every adapted layer: mix(x) = base(x) + sum_i w_i * (adapter_i(x) - base(x)), here for a
    LoRA and a LoKr adapter at 0.7 and 0.5 (each delta measured with that adapter alone at weight 1)."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = AdapterPipeline(tiny_model)
    pipe.load_adapter(two_runs[0], "a")
    pipe.load_adapter(two_runs[1], "b")
    layers = {n: m for n, m in pipe.pipe.unet.named_modules()
              if isinstance(m, BaseTunerLayer) and isinstance(m.get_base_layer(), torch.nn.Linear)}
    g = torch.Generator().manual_seed(0)
    inputs = {n: torch.randn(3, m.get_base_layer().in_features, generator=g) for n, m in layers.items()}

    def outputs(weights):
        pipe.set_adapters(weights)
        with torch.no_grad():
            return {n: m(inputs[n]) for n, m in layers.items()}

    base, a, b, mix = outputs({}), outputs({"a": 1.0}), outputs({"b": 1.0}), outputs({"a": 0.7, "b": 0.5})
    both = [n for n in layers if (a[n] - base[n]).abs().max() > 1e-4 and (b[n] - base[n]).abs().max() > 1e-4]
    assert both  # layers where both adapters act (attention: LoRA and LoKr on the same module)
    for n in layers:
        torch.testing.assert_close(mix[n], base[n] + 0.7 * (a[n] - base[n]) + 0.5 * (b[n] - base[n]),
                                   rtol=1e-5, atol=1e-6)


def test_strength_zero_is_the_base_model(tiny_model, two_runs):
    pipe = AdapterPipeline(tiny_model)
    base = pixels(pipe.generate(**GEN))
    pipe.load_adapter(two_runs[0], "a")
    pipe.set_adapters({"a": 0.0})
    np.testing.assert_allclose(pixels(pipe.generate(**GEN)), base, atol=1)


def test_generate_cli_writes_pngs_and_grid(tiny_model, two_runs, tmp_path):
    a, b = two_runs
    out = tmp_path / "gen"
    code = main(["generate", "--model", tiny_model, "--adapter", str(a), "--adapter", f"other={b}",
                 "--prompt", "a photo of sks dog", "--num-images", "2", "--steps", "2", "--height", "32",
                 "--width", "32", "--include-base", "--output-dir", str(out)])
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["base_00.png", "base_01.png", "base_grid.png", "dog-lora_00.png", "dog-lora_01.png",
                     "dog-lora_grid.png", "grid.png", "other_00.png", "other_01.png", "other_grid.png"]
    assert Image.open(out / "grid.png").size == (64, 96)  # 2 columns x 3 rows of 32 px

    mixed = tmp_path / "mixed"
    assert main(["generate", "--model", tiny_model, "--adapter", f"x={a}", "--adapter", f"y={b}", "--mix", "x=0.7",
                 "y=0.5", "--prompt", "p", "--num-images", "1", "--steps", "2", "--height", "32", "--width", "32",
                 "--output-dir", str(mixed)]) == 0
    assert sorted(p.name for p in mixed.iterdir()) == ["grid.png", "mix_00.png", "mix_grid.png"]


@pytest.mark.parametrize("argv, message", [
    (["--adapter", "/no/such/run"], "--adapter /no/such/run: no such folder"),
    (["--mix", "nope=0.5"], "--mix nope: no --adapter of that name"),
    (["--mix", "x=heavy"], "--mix x=heavy: expected NAME=WEIGHT"),
])
def test_generate_bad_input(tiny_model, tmp_path, capsys, argv, message):
    out = tmp_path / "gen"
    code = main(["generate", "--model", tiny_model, "--prompt", "p", "--output-dir", str(out), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_pickle_only_adapter_is_refused(tiny_model, two_runs, tmp_path, capsys):
    import shutil

    run = tmp_path / "pickled"
    shutil.copytree(two_runs[1], run)
    (run / "unet" / "adapter_model.safetensors").rename(run / "unet" / "adapter_model.bin")
    code = main(["generate", "--model", tiny_model, "--adapter", str(run), "--prompt", "p",
                 "--output-dir", str(tmp_path / "gen")])
    err = capsys.readouterr().err
    assert code == 2 and "only pickle weights (adapter_model.bin), which are not loaded for safety" in err


def test_adapter_weights_that_match_no_module_are_refused(tiny_model, two_runs, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from peftbooth.config.sections import UsageError

    run = tmp_path / "renamed"
    shutil.copytree(two_runs[1], run)
    weights = run / "unet" / "adapter_model.safetensors"
    state = load_file(weights)
    first = sorted(state)[0]
    state[first.replace("down_blocks", "side_blocks")] = state.pop(first)
    save_file(state, weights)
    pipe = AdapterPipeline(tiny_model)
    # one weight lands nowhere, and the module it belonged to misses it: both are counted
    with pytest.raises(UsageError, match=r"2 adapter weights do not match this base model, e\.g\. .*side_blocks"):
        pipe.load_adapter(run)
