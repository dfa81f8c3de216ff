"""The CLI leaves what it did not make alone: `generate` does not overwrite images without --overwrite (as `export`
does), library warnings are hidden only where we know them, and --compile's error suppression stays inside the
compiled UNet's calls."""

import warnings

import torch

from peftbooth.cli import main, quiet_libraries

GEN = ["--prompt", "a photo of a dog", "--num-images", "1", "--steps", "1", "--height", "32", "--width", "32"]


def test_generate_refuses_to_overwrite_images_without_overwrite(tiny_model, tmp_path, capsys):
    out = tmp_path / "gen"
    assert main(["generate", "--model", tiny_model, *GEN, "--output-dir", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["base_00.png", "base_grid.png", "grid.png"]
    capsys.readouterr()

    assert main(["generate", "--model", tiny_model, *GEN, "--seed", "5", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"peftbooth generate: error: --output-dir {out}: already holds grid.png and 2 more this command "
                   "writes; pass --overwrite or choose another folder"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched

    (out / "notes.txt").write_text("mine")
    assert main(["generate", "--model", tiny_model, *GEN, "--seed", "5", "--overwrite", "--output-dir", str(out)]) == 0
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after["base_00.png"] != before["base_00.png"]  # another seed, really rewritten
    assert after["notes.txt"] == b"mine"


def test_only_known_library_warnings_are_hidden():
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        quiet_libraries()
        warnings.warn("some library's plan to change an API", FutureWarning)
        warnings.warn("a library's note to its own developers", DeprecationWarning)
        warnings.warn("Could not find a config file in /x - will assume that the vocabulary was not modified.",
                      UserWarning)
        warnings.warn("__array__ implementation doesn't accept a copy keyword, so passing copy=False failed.",
                      DeprecationWarning)
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
    messages = [str(w.message) for w in seen]
    assert messages == ["some library's plan to change an API", "a library's note to its own developers"]


class _Acc:
    device = torch.device("cpu")


def test_compile_suppresses_errors_only_inside_the_compiled_calls():
    import torch._dynamo

    from peftbooth.training.speed import maybe_compile

    seen = []

    @torch._dynamo.disable  # runs eagerly, so it reads the config as it is during the call
    def probe():
        seen.append(torch._dynamo.config.suppress_errors)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, x):
            probe()
            return self.lin(x) * 2

    assert torch._dynamo.config.suppress_errors is False
    net = Net()
    compiled = maybe_compile(net, _Acc())
    assert compiled is not net  # compiled here (a C++ compiler is installed)
    x = torch.ones(1, 2)
    torch.testing.assert_close(compiled(x), net(x))
    assert seen[0] is True and seen[-1] is False  # inside the compiled call, then the eager call
    assert torch._dynamo.config.suppress_errors is False  # the process-wide setting is untouched
