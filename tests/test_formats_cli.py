"""The export / import / fuse commands on the command line (SD 1.x run)."""

from __future__ import annotations

import pytest
from formats_helpers import KOHYA_LORA_VARIANTS, LYCORIS_VARIANTS, sd_make_run

from peftbooth.config.sections import UsageError
from peftbooth.runs.formats.commands import add_commands

# the shared fixtures (formats_helpers), under the names the tests ask for
make_run = sd_make_run


def test_cli_commands(make_run, tiny_model, tmp_path, capsys):
    from peftbooth.cli import Parser

    parser = Parser(prog="peftbooth")
    add_commands(parser.add_subparsers(dest="command", required=True, parser_class=Parser))
    run = make_run("kohya-lora-plain", **KOHYA_LORA_VARIANTS["plain"])

    def call(*argv) -> int:
        args = parser.parse_args([str(a) for a in argv])
        return args.func(args)

    kohya = tmp_path / "a.safetensors"
    assert call("export", run, "--format", "kohya", "--output", kohya) == 0 and kohya.is_file()
    assert call("import", kohya, "--output", tmp_path / "imp", "--model", tiny_model) == 0
    assert (tmp_path / "imp" / "unet" / "adapter_config.json").is_file()
    assert call("fuse", run, "--output", tmp_path / "fused", "--scale", "0.5") == 0
    assert (tmp_path / "fused" / "model_index.json").is_file()
    assert "written to" in capsys.readouterr().out
    with pytest.raises(UsageError, match="use --format kohya"):
        call("export", make_run("loha", **{"unet_adapter.target_modules": "all", **LYCORIS_VARIANTS["loha"]}),
             "--format", "diffusers", "--output", tmp_path / "x")
    with pytest.raises(SystemExit) as e:  # argparse refuses an unknown format with exit code 2
        call("export", run, "--format", "ckpt", "--output", tmp_path / "y")
    assert e.value.code == 2
