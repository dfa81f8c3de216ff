"""Plain `torchrun --nproc_per_node 2 -m peftbooth train ...` on a machine without a GPU trains as --num-processes 2
does: one run, both ranks in one process group, one writer (it used to give two lone processes and 'in use by
another run')."""

import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import draw_photos


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only launcher case; with a GPU torchrun uses it")
def test_plain_torchrun_on_cpu_trains_as_one_run(tiny_model, tmp_path):
    photos = draw_photos(tmp_path / "photos", n=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_CPU")}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "-m", "peftbooth", "train", "--model", tiny_model, "--instance-data-dir", str(photos),
           "--instance-prompt", "a photo of sks dog", "--resolution", "32", "--max-train-steps", "2",
           "--report-to", "none", "--output-dir", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "in use by another run" not in run.stderr
    assert "adapter weights identical on all 2 processes" in run.stdout
    assert run.stdout.count("adapters written to") == 1
    assert (out / "unet" / "adapter_model.safetensors").is_file()
