"""Issue 26's dead ends and messages at the API (no browser): names, deleting, starting again, captions, sample
history, fuse and export downloads. The library's heavy calls (fuse, export, sampling) are stood in for: what
is under test is what the UI does around them (test_ui_browser.py runs the real ones)."""

import io
import zipfile

from PIL import Image
from test_ui import call, png_bytes, serve  # noqa: F401 - serve is a fixture
from test_ui_journey import FakePipe, bar, fake_run, finish, trainer  # noqa: F401 - trainer is a fixture

import peftbooth.inference.fuse
import peftbooth.runs.formats
from peftbooth.ui import tryit


def test_a_taken_name_is_refused_and_a_refused_start_creates_nothing(serve):  # noqa: F811
    base, runs = serve()
    assert call(f"{base}/api/runs", "POST", {"name": "dog"})[1] == {"name": "dog"}
    status, r, _ = call(f"{base}/api/runs", "POST", {"name": "dog"})
    assert status == 400 and r["error"] == "run name 'dog': taken by another run; choose another name"
    status, r, _ = call(f"{base}/api/new/start", "POST", {"name": "dog", "values": {}})
    assert status == 400 and "taken" in r["error"]
    status, r, _ = call(f"{base}/api/new/start", "POST", {"name": "cat", "values": {"model.model": "tiny"}})
    assert r["ok"] is False and r["errors"]["data.instance_data_dir"] == [
        "photos: none yet; add at least 1 photo of the subject; 3–10 work best (drop them above, choose files, "
        "or use a folder)"]
    assert "data.instance_prompt" in r["errors"]  # the form's own problems are shown with it
    assert sorted(p.name for p in runs.iterdir()) == ["dog"]


def test_caption_files_upload_beside_their_photo(serve):  # noqa: F811
    base, runs = serve()
    call(f"{base}/api/runs", "POST", {"name": "dog"})
    assert call(f"{base}/api/runs/dog/photos?filename=a.png", "POST", raw=png_bytes())[0] == 200
    status, r, _ = call(f"{base}/api/runs/dog/photos?filename=a.txt", "POST", raw="\ufeffsks dog, on grass\n".encode())
    assert status == 200 and r == {"name": "a.txt"}
    assert call(f"{base}/api/runs/dog")[1]["photos"] == [{"name": "a.png", "caption": "sks dog, on grass",
                                                          "mask": False}]
    status, r, _ = call(f"{base}/api/runs/dog/photos?filename=a.txt", "POST", raw=b"\xff\xfe bad")
    assert status == 400 and r["error"] == "caption 'a.txt': not UTF-8 text"


def test_delete_and_start_again(serve, trainer):  # noqa: F811
    base, runs = serve()
    fake_run(runs, "busy", {"state": "started", "pid": trainer()}, bar(3, 10))
    fake_run(runs, "waiting", {"state": "queued", "queued_at": 1.0}, age=10)
    fake_run(runs, "old", {"state": "done", "returncode": 1}, age=100)
    assert [r["name"] for r in call(f"{base}/api/runs")[1]["runs"]] == ["busy", "waiting", "old"]  # newest first
    for name, state in [("busy", "running"), ("waiting", "queued")]:
        status, r, _ = call(f"{base}/api/runs/{name}", "DELETE")
        assert status == 400 and r["error"] == f"run {name}: {state}; stop it before deleting it"
    assert call(f"{base}/api/runs/waiting/stop", "POST", {})[1] == {"result": "cancelled"}
    assert call(f"{base}/api/runs/waiting")[1]["state"] == "ready"
    assert call(f"{base}/api/runs/waiting/queue", "POST", {})[1] == {"result": "queued"}  # Start, from ready
    assert call(f"{base}/api/runs/old/queue", "POST", {})[1] == {"result": "queued"}  # failed: starts over
    status, r, _ = call(f"{base}/api/runs/busy/queue", "POST", {})
    assert status == 400 and r["error"] == "run busy: cannot be started (it is running)"
    call(f"{base}/api/runs/old/stop", "POST", {})
    assert call(f"{base}/api/runs/old", "DELETE")[1] == {"deleted": "old"}
    assert sorted(p.name for p in runs.iterdir()) == ["busy", "waiting"]  # no hidden leftovers either
    assert call(f"{base}/api/runs/old")[0] == 404


def test_sample_history_keeps_each_image_and_its_settings(serve, monkeypatch):  # noqa: F811
    monkeypatch.setattr(tryit.Studio, "pipeline", lambda self, run: (FakePipe(), ("tiny", None, None, None)))
    base, runs = serve()
    finish(fake_run(runs, "fin"))
    for strength in (1.0, 0.5, 0.0):  # well within one second
        status, r, _ = call(f"{base}/api/runs/fin/generate", "POST",
                            {"prompt": "sks dog", "num_images": 2, "strength": strength, "seed": 7})
        assert status == 200 and len(r["images"]) == 2
    assert len(list((runs / "fin" / "ui" / "samples").glob("*.png"))) == 6
    history = call(f"{base}/api/runs/fin/samples")[1]["samples"]
    assert [(s["strength"], s["index"]) for s in history] == [(0.0, 0), (0.0, 1), (0.5, 0), (0.5, 1), (1.0, 0),
                                                               (1.0, 1)]  # newest first
    assert all(s["prompt"] == "sks dog" and s["seed"] == 7 and s["mix_run"] is None for s in history)
    assert len({s["src"] for s in history}) == 6 and all(call(base + s["src"])[0] == 200 for s in history)


class RecordingPipe(FakePipe):
    """Stands in for AdapterPipeline and keeps the sampling settings each generate call was given."""

    def generate(self, prompt, num_images=1, seed=0, **kw):
        self.calls = getattr(self, "calls", []) + [(kw["guidance_scale"], kw["guidance_cutoff"])]
        return [Image.new("RGB", (32, 32)) for _ in range(num_images)]


def test_try_it_samples_a_world_run_as_the_world_metrics_do(serve, monkeypatch):  # noqa: F811
    # an empty guidance field means the model's own: on the world, guidance 5 for the first 40 % of the steps
    # (guided to the end its boxes are stars); on any other model 7.5 on every step; given values are kept
    pipe, loads = RecordingPipe(), []
    monkeypatch.setattr(tryit.Studio, "pipeline", lambda self, run: loads.append(run.name) or (
        pipe, (tryit.load_config(run)["model"]["model"], None, None, None)))
    base, runs = serve()
    for name in ("world", "tiny"):
        run = fake_run(runs, name)
        finish(run)
        (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("model: tiny", f"model: {name}"))
    url = f"{base}/api/runs/world/generate"
    for body in ({}, {"guidance_scale": "", "guidance_cutoff": ""}, {"guidance_scale": 9, "guidance_cutoff": 0.5}):
        assert call(url, "POST", {"prompt": "a photo of a sks box", **body})[0] == 200
    assert call(f"{base}/api/runs/tiny/generate", "POST", {"prompt": "sks dog"})[0] == 200
    assert pipe.calls == [(5.0, 0.4), (5.0, 0.4), (9.0, 0.5), (7.5, 1.0)]
    history = call(f"{base}/api/runs/world/samples")[1]["samples"]
    assert [(s["guidance_scale"], s["guidance_cutoff"]) for s in history] == [(9.0, 0.5), (5.0, 0.4), (5.0, 0.4)]
    status, r, _ = call(url, "POST", {"prompt": "sks dog", "guidance_cutoff": 1.5})
    assert status == 400 and r["error"] == "guidance cutoff must be between 0.0 and 1.0 (got 1.5)"
    assert len(pipe.calls) == 4 and len(loads) == 4  # refused before the model is asked for


def test_fuse_asks_before_replacing_and_offers_a_download(serve, monkeypatch):  # noqa: F811
    calls = []

    def fake_fuse(model, run_dir, output_dir, scale=1.0, overwrite=False):
        calls.append(scale)
        (output_dir / "unet").mkdir(parents=True, exist_ok=True)
        (output_dir / "unet" / "model.safetensors").write_bytes(b"w" * 1000 + bytes([len(calls)]))
        return output_dir

    monkeypatch.setattr(peftbooth.inference.fuse, "fuse_run", fake_fuse)
    base, runs = serve()
    finish(fake_run(runs, "fin"))
    status, r, _ = call(f"{base}/api/runs/fin/fuse", "POST", {"scale": 0.8})
    assert status == 200 and r["download"] == "/runs/fin/fused.zip"
    status, r, _ = call(f"{base}/api/runs/fin/fuse", "POST", {"scale": 0.5})
    assert status == 409 and r["exists"] is True and "exists already" in r["error"] and calls == [0.8]
    assert call(f"{base}/api/runs/fin/fuse", "POST", {"scale": 0.5, "overwrite": True})[0] == 200
    assert calls == [0.8, 0.5]
    status, body, hdrs = call(f"{base}/runs/fin/fused.zip")
    assert status == 200 and hdrs["Content-Disposition"] == 'attachment; filename="fin-fused.zip"'
    with zipfile.ZipFile(io.BytesIO(body)) as z:
        assert z.read("fin-fused/unet/model.safetensors") == b"w" * 1000 + bytes([2])


def test_export_download_is_named_after_the_run(serve, monkeypatch):  # noqa: F811
    def fake_export(run_dir, fmt, output, overwrite=False):
        output.mkdir(parents=True, exist_ok=True)
        (output / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
        return output / "pytorch_lora_weights.safetensors"

    monkeypatch.setattr(peftbooth.runs.formats, "export_run", fake_export)
    base, runs = serve()
    finish(fake_run(runs, "sks-dog"))
    r = call(f"{base}/api/runs/sks-dog/export", "POST", {"format": "diffusers"})[1]
    assert r["filename"] == "sks-dog-diffusers.safetensors"
    status, body, hdrs = call(base + r["download"])
    assert status == 200 and body == b"weights"
    assert hdrs["Content-Disposition"] == 'attachment; filename="sks-dog-diffusers.safetensors"'
    assert r["path"].endswith("pytorch_lora_weights.safetensors")
