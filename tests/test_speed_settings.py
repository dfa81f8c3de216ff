"""Speed settings change how the maths runs, not what it gives: --compile (one graph with adapters), --compile-mode
and --channels-last train the adapters the plain eager run trains; fp16's gradient scaler works over the frozen
fp16 / fp32 adapter split; the unavailable cases (no compiler, CUDA graphs off CUDA, bf16 on a GPU without it;
fp16 on the CPU is a row of test_cli's bad inputs) say so."""

import warnings

import pytest
import torch
from conftest import tiny_config
from peft import LoHaConfig, get_peft_model
from safetensors.torch import load_file
from test_cli import train_argv

from peftbooth.adapters import factored
from peftbooth.adapters.inject import attach
from peftbooth.adapters.peft_config import UNET_PRESETS
from peftbooth.cli import main
from peftbooth.config.sections import TrainConfig
from peftbooth.models.loading import load_components
from peftbooth.training.checkpoint import release_lock
from peftbooth.training.loop import finish, fit
from peftbooth.training.setup import setup

ADAPTERS = ["lora", "loha", "lokr"]
# Runs that differ only in summation order are compared after 3 optimizer steps. Plain Adam would amplify the
# rounding: its first updates are about ±lr whatever the gradient's size, so an element whose gradient is ~0 moves
# by ±lr either way (measured: 7e-5 apart at lr 1e-3). With epsilon 1 Adam's update is ~lr·m, linear in the
# gradient, so rounding stays rounding-sized and a real difference in the maths still shows.
LINEAR_ADAM = {"train.adam_epsilon": 1.0, "train.learning_rate": 0.1, "train.max_train_steps": 3}
AFTER_STEPS = dict(rtol=1e-4, atol=1e-6)


def graphs_of(model, *inputs) -> tuple[int, int, torch.Tensor]:
    """(graphs captured, graph breaks, output) of one call of `model` compiled by dynamo alone (no code generation:
    graph capture is what adapters can break, and it takes seconds instead of a minute on these CPUs)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    out = torch.compile(model, backend="eager")(*inputs)
    # a break dynamo resumes after counts under graph_break; one it cannot resume (a branch inside a loop, a
    # context manager) skips the frame and counts under unimplemented
    breaks = sum(counters["graph_break"].values()) + sum(counters["unimplemented"].values())
    return counters["stats"]["unique_graphs"], breaks, out


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_unet_with_adapters_compiles_to_one_graph(adapter, tiny_model):
    cfg = TrainConfig()
    cfg.unet_adapter.adapter, cfg.unet_adapter.rank, cfg.unet_adapter.target_modules = adapter, 4, "all"
    unet = attach(load_components(tiny_model).unet, cfg.resolved().unet_adapter, UNET_PRESETS, "")
    factored.install(unet)  # as training does by default
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 4, 4, 4, generator=g), torch.tensor([10, 500]), torch.randn(2, 77, 32, generator=g))
    unet.train()
    with torch.no_grad():
        expected = unet(*inputs).sample
        graphs, breaks, out = graphs_of(unet, *inputs)
    assert (graphs, breaks) == (1, 0)
    torch.testing.assert_close(out.sample, expected)


def test_peft_lycoris_forward_breaks_the_graph_and_ours_does_not():
    """The control for the test above: PEFT's LoHa forward tosses a module-dropout coin (`torch.rand(1) > p`) per
    layer, a data-dependent branch that splits the graph; factored.install removes it when module dropout is 0
    and keeps it (PEFT's forward, coin and all) when module dropout is on."""
    def net(module_dropout):
        torch.manual_seed(0)
        return get_peft_model(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU(), torch.nn.Linear(16, 16)),
                              LoHaConfig(r=2, target_modules=["0", "2"], module_dropout=module_dropout))

    x = torch.randn(3, 16)
    peft_forward = net(0.0)
    graphs, breaks, _ = graphs_of(peft_forward, x)
    assert graphs > 1 and breaks >= 2  # a break at each LoHa layer
    ours = net(0.0)
    factored.install(ours)
    graphs, breaks, out = graphs_of(ours, x)
    assert (graphs, breaks) == (1, 0)
    torch.testing.assert_close(out, peft_forward(x))

    tossed = []
    real_rand = torch.rand
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "rand", lambda *a, **k: tossed.append(a) or real_rand(*a, **k))
        ours(x)
        assert tossed == []  # module dropout 0: no coin
        with_dropout = net(0.5)
        factored.install(with_dropout)
        with_dropout(x)
        assert len(tossed) == 2  # module dropout on: PEFT's forward tosses its coin per layer
        with_dropout.eval()
        tossed.clear()
        with_dropout(x)
        assert tossed == []  # ... only while training, as in PEFT


def train_and_load(run, folder) -> dict[str, torch.Tensor]:
    """Train and save `run` (output folder `folder`); return the saved UNet adapter. The adapters must really have
    moved, so that two runs agreeing means something."""
    trainable = [p for p in run.unet.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    finish(run, fit(run))
    release_lock(run.lock)
    moved = max((p.detach() - b).abs().max().item() for p, b in zip(trainable, before))
    assert moved > 100 * AFTER_STEPS["atol"]
    return load_file(folder / "unet" / "adapter_model.safetensors")


def assert_same_adapters(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, **AFTER_STEPS)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_compiled_training_matches_eager(adapter, tiny_model, photos, tmp_path, monkeypatch):
    """--compile trains the same adapters as eager (to fp tolerance) and saves them under PEFT's own names (no
    `_orig_mod.` of the compiled wrapper). Dynamo + AOT autograd without code generation (`aot_eager`): the
    inductor backend compiles the same graphs but takes a minute on these CPUs (measured 67 s)."""
    real_compile = torch.compile
    modes = []

    def aot_eager(model, mode=None, **kw):
        modes.append(mode)
        return real_compile(model, backend="aot_eager", **kw)

    monkeypatch.setattr(torch, "compile", aot_eager)
    torch._dynamo.reset()
    runs = {}
    for name, extra in [("eager", {}), ("compiled", {"train.compile": True})]:
        run = setup(tiny_config(tiny_model, photos, tmp_path / name, **LINEAR_ADAM, **extra,
                                **{"unet_adapter.adapter": adapter}))
        assert isinstance(run.unet, torch._dynamo.eval_frame.OptimizedModule) == (name == "compiled")
        runs[name] = train_and_load(run, tmp_path / name)
    assert modes == [None]  # --compile-mode default: torch.compile's own default
    assert not any("_orig_mod" in k for k in runs["compiled"])
    assert_same_adapters(runs["compiled"], runs["eager"])


@pytest.mark.parametrize("case", ["loha", "lokr", "lokr-decompose-both"])
def test_factored_layers_compile_to_one_graph_with_peft_gradients(case):
    """The factored LoHa/LoKr maths (layers wide enough to take it, unlike the tiny UNet's) under dynamo and AOT
    autograd: one graph, and the outputs and gradients of PEFT's eager forward."""
    from test_factored import CASES, peft_net, run
    from torch._dynamo.utils import counters

    reference = peft_net(CASES[case])
    model = peft_net(CASES[case])
    factored.install(model)
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(2, 5, 256, generator=g), torch.randn(2, 96, 9, 9, generator=g))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager")
    tokens, image, grads = run(compiled, inputs)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"] and not counters["unimplemented"]
    ref_tokens, ref_image, ref_grads = run(reference, inputs)
    torch.testing.assert_close(tokens, ref_tokens, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(image, ref_image, rtol=1e-4, atol=1e-5)
    grads = {name.removeprefix("_orig_mod."): grad for name, grad in grads.items()}  # the compiled wrapper's names
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-3, atol=1e-5)


def test_compile_unavailable_warns_and_trains_eagerly(tiny_model, photos, tmp_path, monkeypatch):
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    with pytest.warns(UserWarning, match=r"^--compile: torch.compile is not supported on this Python/platform; "
                                         r"training eagerly$"):
        run = setup(tiny_config(tiny_model, photos, tmp_path / "run", **{"train.compile": True}))
    assert not isinstance(run.unet, torch._dynamo.eval_frame.OptimizedModule)
    assert fit(run)["steps"] == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning is for a machine without CUDA")
def test_cuda_graph_mode_off_cuda_warns(tiny_model, photos, tmp_path, monkeypatch):
    """--compile-mode reduce-overhead on the CPU: torch.compile gets the mode, and the user is told CUDA graphs are
    off here."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: seen.append(mode) or model)
    with pytest.warns(UserWarning, match=r"^--compile-mode reduce-overhead: CUDA graphs need a CUDA device; "
                                         r"compiled without them on cpu$"):
        setup(tiny_config(tiny_model, photos, tmp_path / "run",
                          **{"train.compile": True, "train.compile_mode": "reduce-overhead"}))
    assert seen == ["reduce-overhead"]


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_channels_last_trains_like_contiguous(adapter, tiny_model, photos, tmp_path):
    """--channels-last changes only the memory layout: the frozen conv weights are NHWC during training, the
    adapters (saved with safetensors, which needs contiguous tensors) are not, and the trained adapters agree."""
    runs = {}
    for name, extra in [("contiguous", {}), ("channels_last", {"train.channels_last": True})]:
        run = setup(tiny_config(tiny_model, photos, tmp_path / name, **{
            "unet_adapter.adapter": adapter, "unet_adapter.target_modules": "all", **LINEAR_ADAM, **extra}))
        conv = run.components.unet.conv_in
        frozen = conv.base_layer.weight if hasattr(conv, "base_layer") else conv.weight
        assert frozen.is_contiguous(memory_format=torch.channels_last) == (name == "channels_last")
        assert frozen.is_contiguous() == (name == "contiguous")
        assert all(p.is_contiguous() for p in run.unet.parameters() if p.requires_grad)
        runs[name] = train_and_load(run, tmp_path / name)
    assert_same_adapters(runs["channels_last"], runs["contiguous"])


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])  # fused: the trainer's AdamW on CUDA
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_fp16_gradient_scaler_works_with_frozen_fp16_and_fp32_adapters(adapter, fused):
    """fp16 training (Accelerate's GradScaler on CUDA) over the trainer's dtype split. torch's CPU autocast and
    GradScaler stand in for CUDA's here; fp16 training itself is refused on the CPU (test_cli). The scaler unscales
    fp32 adapter gradients (it refuses fp16 ones: the control), gives the fp32 gradients, and skips a step whose
    scaled gradients overflowed in the fp16 activations, leaving the adapters as they were."""
    from peft import LoKrConfig, LoraConfig
    from test_factored import peft_net

    from peftbooth.precision import Precision, place_frozen

    targets = ["proj", "conv", "pointwise"]
    config = {"lora": LoraConfig(r=4, lora_alpha=4, target_modules=targets),
              "loha": LoHaConfig(r=4, alpha=4, target_modules=targets),
              "lokr": LoKrConfig(r=4, alpha=4, target_modules=targets)}[adapter]
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(2, 5, 256, generator=g), torch.randn(2, 96, 9, 9, generator=g))

    def scaled_backward(model, scaler, fp16=True):
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            tokens, image = model(*inputs)
        loss = tokens.float().pow(2).mean() + image.float().pow(2).mean()
        scaler.scale(loss).backward()

    reference = peft_net(config)  # fp32 throughout: the gradients fp16 training should approximate
    scaled_backward(reference, torch.amp.GradScaler("cpu", enabled=False), fp16=False)
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}

    model = peft_net(config)
    factored.install(model)
    place_frozen(model, Precision(torch.device("cpu"), torch.float16, torch.float16))
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {p.dtype for p in trained.values()} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.float16}
    optimizer = torch.optim.AdamW(trained.values(), lr=1e-2, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    scaled_backward(model, scaler)
    scaler.unscale_(optimizer)
    for name, p in trained.items():
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, expected[name], rtol=2e-2, atol=2e-2 * expected[name].abs().max().item())
    before = {n: p.detach().clone() for n, p in trained.items()}
    scaler.step(optimizer)
    scaler.update()
    assert all(not torch.equal(p, before[n]) for n, p in trained.items())  # a normal step moves every adapter

    optimizer.zero_grad()
    before = {n: p.detach().clone() for n, p in trained.items()}
    overflow = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # far past fp16's 65504 in the activations' grads
    scaled_backward(model, overflow)
    overflow.unscale_(optimizer)  # as clipping does before the step
    overflow.step(optimizer)
    overflow.update()
    assert all(torch.equal(p, before[n]) for n, p in trained.items())  # the step was skipped
    assert overflow.get_scale() == 2.0**39  # and the scale backed off

    half = peft_net(config)  # the control: adapters in fp16 too, as a plain .half() would leave them
    half.half()
    fp16_grads = torch.amp.GradScaler("cpu")
    scaled_backward(half, fp16_grads)
    with pytest.raises(ValueError, match="^Attempting to unscale FP16 gradients.$"):
        fp16_grads.unscale_(torch.optim.AdamW([p for p in half.parameters() if p.requires_grad]))


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_gradient_checkpointing_trains_like_without(adapter, tiny_model, photos, tmp_path):
    """--gradient-checkpointing (the memory target's setting) recomputes activations in the backward pass; the
    adapters inside the checkpointed blocks, UNet and text encoder, still get their gradients and train to the same
    weights. (A reentrant checkpoint whose inputs need no gradient would leave them untrained.)"""
    runs = {}
    for name, extra in [("plain", {}), ("checkpointed", {"train.gradient_checkpointing": True})]:
        run = setup(tiny_config(tiny_model, photos, tmp_path / name, **{
            "unet_adapter.adapter": adapter, "text_encoder_adapter.adapter": adapter,
            "train.train_text_encoder": True, **LINEAR_ADAM, **extra}))
        assert run.components.unet.is_gradient_checkpointing == (name == "checkpointed")
        assert run.components.text_encoder.is_gradient_checkpointing == (name == "checkpointed")
        unet = train_and_load(run, tmp_path / name)
        runs[name] = {**unet, **load_file(tmp_path / name / "text_encoder" / "adapter_model.safetensors")}
    assert_same_adapters(runs["checkpointed"], runs["plain"])


def test_bf16_on_a_gpu_without_bf16_exits_2(tiny_model, photos, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may reach for the (absent) GPU before the refusal
        rc = main(train_argv(tiny_model, photos, out, "--mixed-precision", "bf16"))
    stdout, stderr = capsys.readouterr()
    assert rc == 2
    assert stderr.strip() == ("peftbooth train: error: --mixed-precision bf16: this GPU has no bf16 support; "
                              "use --mixed-precision fp16")
    assert not out.exists()




def test_unet_moves_to_the_device_after_the_caches_are_built(tiny_model, photos, tmp_path, monkeypatch):
    """The UNet's weights go to the device only after the VAE has encoded the photos (the largest activations
    before training) and the VAE and text encoder have been moved off it: they never share the device's memory."""
    import importlib

    from peftbooth.training.cache import LatentCache, TextCache

    setup_module = importlib.import_module("peftbooth.training.setup")  # the module, not its function setup()

    events = []
    real_move, real_latents, real_text = setup_module.place_frozen, LatentCache.build, TextCache.build
    monkeypatch.setattr(setup_module, "place_frozen",
                        lambda model, *a: events.append(type(model).__name__) or real_move(model, *a))
    monkeypatch.setattr(LatentCache, "build",
                        classmethod(lambda cls, *a: events.append("latent cache") or real_latents(*a)))
    monkeypatch.setattr(TextCache, "build",
                        classmethod(lambda cls, *a: events.append("text cache") or real_text(*a)))
    monkeypatch.setattr(setup_module, "offload", lambda model, device: events.append(f"offload {type(model).__name__}"))
    setup(tiny_config(tiny_model, photos, tmp_path / "run"))
    assert events == ["CLIPTextModel", "latent cache", "offload AutoencoderKL", "text cache",
                      "offload CLIPTextModel", "PeftModel"]


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])  # fused: the trainer's AdamW on CUDA
def test_fp16_overflow_steps_are_neither_counted_nor_scheduled(fused, tiny_model, photos, tmp_path, monkeypatch):
    """A real fit() under fp16 with a gradient scaler (CPU autocast and GradScaler("cpu") standing in for CUDA's,
    installed where Accelerate puts its own). The scale starts far too high, so the first steps overflow and the
    scaler skips them; only steps that updated the weights count towards --max-train-steps and the lr schedule.
    With the fused AdamW the optimizer's step() runs even for a skipped step (the kernel skips the update)."""
    import importlib

    from accelerate.optimizer import AcceleratedOptimizer

    loop = importlib.import_module("peftbooth.training.loop")  # training_step's caller
    setup_module = importlib.import_module("peftbooth.training.setup")  # make_optimizer's caller
    real_step = loop.training_step

    def fp16_step(run, batch):
        with torch.autocast("cpu", dtype=torch.float16):
            return real_step(run, batch)

    monkeypatch.setattr(loop, "training_step", fp16_step)
    if fused:
        monkeypatch.setattr(setup_module, "make_optimizer", lambda params, t, device: torch.optim.AdamW(params, fused=True))
    run = setup(tiny_config(tiny_model, photos, tmp_path / "run", **{
        "train.max_train_steps": 3, "train.lr_scheduler": "linear", "train.max_grad_norm": 1.0}))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**30)  # a few halvings from fp16's usable range
    inner = run.optimizer.optimizer
    run.accelerator.scaler = scaler
    run.optimizer = AcceleratedOptimizer(inner, device_placement=False, scaler=scaler)
    run.accelerator.unscale_gradients = lambda optimizer=None: scaler.unscale_(inner)  # as clipping does in fp16
    params = [p for p in run.unet.parameters() if p.requires_grad]
    updated, real_optimizer_step = [], run.optimizer.step

    def optimizer_step(*a, **k):
        before = [p.detach().clone() for p in params]
        real_optimizer_step(*a, **k)
        updated.append(any(not torch.equal(p.detach(), b) for p, b in zip(params, before)))

    run.optimizer.step = optimizer_step
    stats = fit(run)
    assert stats["steps"] == 3
    assert updated.count(True) == 3 and updated[-1]  # three real updates, the last one ends the run
    # the first step overflows at 2^30; a later one may too (how large an fp16 gradient gets depends on the CPU's
    # kernels: on one Intel Xeon a step after the first real update overflowed again at 2^22)
    assert not updated[0] and updated.count(False) >= 1
    assert scaler.get_scale() < 2.0**30
    assert run.lr_scheduler.last_epoch == 3  # scheduled once per real update
    assert run.lr_scheduler.get_last_lr()[0] == 0.0  # linear decay ends exactly at the last real update
