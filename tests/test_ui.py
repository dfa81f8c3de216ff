"""`peftbooth ui` without a browser: the form from the dataclasses, the CLI's checks, confinement, token.

The server runs in this process on a free port and is spoken to with urllib, as the page would. Uploads (photos,
captions, masks) are in tests/test_ui_uploads.py, which imports this module's helpers and `serve` fixture.
"""

import dataclasses
import io
import json
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import draw_photos
from PIL import Image

from peftbooth.cli import main
from peftbooth.config.checks import validate
from peftbooth.config.dicts import SECTIONS, from_dict
from peftbooth.config.sections import UsageError
from peftbooth.ui import files, schema
from peftbooth.ui.runs import last_bar, state_of
from peftbooth.ui.server import TOKEN_ENV, make_server


@pytest.fixture
def serve(tmp_path, monkeypatch):
    """serve(host=..., allowed=...) -> (base URL, runs folder); every server is shut down after the test."""
    servers = []

    def start(host="127.0.0.1", allowed=()):
        runs = tmp_path / "runs"
        server = make_server(runs, host, 0, [Path(a) for a in allowed])
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://{host}:{server.server_address[1]}", runs

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def call(url, method="GET", body=None, raw=None, headers=None):
    """(status, parsed JSON or bytes, response headers) of one request."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, content, hdrs = r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        status, content, hdrs = e.code, e.read(), e.headers
    try:
        return status, json.loads(content), hdrs
    except ValueError:
        return status, content, hdrs


def png_bytes(size=(40, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def new_run(base, name="dog"):
    status, data, _ = call(f"{base}/api/runs", "POST", {"name": name})
    assert status == 200
    return data["name"]


# ---------------------------------------------------------------------------------------------------------------
# the form is the config dataclasses


def test_form_has_every_train_option_with_its_help_and_choices():
    fields = {f["key"]: f for f in schema.form_fields()}
    expected = {f"{s}.{f.name}": f for s, (cls, _) in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert set(fields) == set(expected) - set(schema.MANAGED)
    for key, f in fields.items():
        meta = expected[key].metadata
        assert f["help"] == meta["help"] and f["choices"] == list(meta.get("choices") or ())
    assert fields["text_encoder_adapter.rank"]["flag"] == "--text-encoder-rank"
    assert fields["train.mixed_precision"]["choices"] == ["no", "fp16", "bf16"]
    assert fields["train.validation_prompt"]["type"] == "list"
    # presets only set fields that exist
    for values in [*schema.PRESETS.values(), schema.LOW_MEMORY]:
        assert set(values) <= set(fields)


def test_settings_problems_land_beside_their_fields_and_nothing_is_written(serve, tmp_path):
    base, runs = serve()
    name = new_run(base)
    call(f"{base}/api/runs/{name}/photos?filename=a.png", "POST", raw=png_bytes())
    values = {"model.model": "tiny", "data.resolution": "33", "train.max_train_steps": "0", "data.with_prior_preservation": True,
              "text_encoder_adapter.rank": "0", "train.train_text_encoder": True, "unet_adapter.rank": "x"}
    status, r, _ = call(f"{base}/api/runs/{name}/start", "POST", {"values": values})
    assert status == 200 and r["ok"] is False
    assert r["errors"] == {"unet_adapter.rank": ["--rank must be int (got 'x')"]}  # types first, as --config does
    values["unet_adapter.rank"] = "4"
    status, r, _ = call(f"{base}/api/runs/{name}/start", "POST", {"values": values})
    # the messages are validate's own, each under the field it names
    cfg = from_dict({"model": {"model": "tiny"}, "data": {"resolution": 33, "with_prior_preservation": True,
                     "instance_data_dir": "x"}, "unet_adapter": {"rank": 4},
                     "text_encoder_adapter": {"rank": 0}, "train": {"max_train_steps": 0, "output_dir": "o",
                                                                   "train_text_encoder": True}}).resolved()
    with pytest.raises(UsageError) as e:
        validate(cfg)
    problems = schema.split_problems(str(e.value))
    expected_keys = {"data.instance_prompt", "data.resolution", "data.class_prompt", "train.max_train_steps",
                     "text_encoder_adapter.rank"}
    assert expected_keys <= set(r["errors"])  # and nothing is lost: every problem is shown somewhere
    assert sorted(m for msgs in r["errors"].values() for m in msgs) == sorted(problems)
    assert r["errors"]["data.class_prompt"][0].startswith("--with-prior-preservation needs --class-prompt")
    assert r["errors"]["text_encoder_adapter.rank"][0].startswith("--text-encoder-rank")
    assert sorted(p.name for p in (runs / name).iterdir()) == ["photos", "ui"]
    assert [p.name for p in (runs / name / "ui").iterdir()] == ["form.json"]  # no config, no job; "Edit" reads this
    assert json.loads((runs / name / "ui" / "form.json").read_text()) == values


def test_train_input_checks_run_before_start(serve, tmp_path):
    """train.check_inputs's problems (here: a corrupt photo; a bad model folder) are shown and nothing written."""
    base, runs = serve()
    name = new_run(base)
    call(f"{base}/api/runs/{name}/photos?filename=a.png", "POST", raw=png_bytes())
    (runs / name / "photos" / "b.png").write_bytes(b"not a png")  # put there behind the UI's back
    ok = {"model.model": "tiny", "data.instance_prompt": "a photo of sks dog", "data.resolution": "32"}
    status, r, _ = call(f"{base}/api/runs/{name}/check", "POST", {"values": ok})
    assert list(r["errors"]) == ["data.instance_data_dir"]
    assert "b.png: not a readable image" in r["errors"]["data.instance_data_dir"][0]
    (runs / name / "photos" / "b.png").unlink()
    status, r, _ = call(f"{base}/api/runs/{name}/check", "POST",
                        {"values": {**ok, "model.model": str(tmp_path / "nowhere" / "model")}})
    assert r["errors"] == {"model.model": [f"--model {tmp_path / 'nowhere' / 'model'}: no such folder"]}
    assert not (runs / name / "config.yaml").exists()
    status, r, _ = call(f"{base}/api/runs/{name}/check", "POST", {"values": ok})
    assert r["ok"] is True and not (runs / name / "config.yaml").exists()  # check writes nothing


def test_start_writes_the_config_the_cli_repeats(serve):
    base, runs = serve()
    name = new_run(base)
    call(f"{base}/api/runs/{name}/photos?filename=a.png", "POST", raw=png_bytes())
    values = {"model.model": "tiny", "data.instance_prompt": "a photo of sks dog", "data.resolution": "32",
              "unet_adapter.adapter": "lokr",
              "train.validation_prompt": ["a photo of sks dog", "  "], "train.max_train_steps": "100000"}
    status, r, _ = call(f"{base}/api/runs/{name}/start", "POST", {"values": values})
    assert r["ok"] is True and r["command"] == f"peftbooth train --config {runs / name / 'config.yaml'}"
    # stop it straight away (queued or starting): only the saved config matters here
    call(f"{base}/api/runs/{name}/stop", "POST", {})
    cfg = from_dict(yaml.safe_load((runs / name / "config.yaml").read_text()))
    assert cfg.train.output_dir == str(runs / name) and cfg.data.instance_data_dir == str(runs / name / "photos")
    assert cfg.unet_adapter.adapter == "lokr" and cfg.unet_adapter.alpha == 4.0  # resolved, as train saves it
    assert cfg.train.validation_prompt == ["a photo of sks dog"]
    assert (cfg.train.resume, cfg.train.overwrite) == (None, False)
    # settings of a started run are fixed
    status, r, _ = call(f"{base}/api/runs/{name}/photos?filename=b.png", "POST", raw=png_bytes())
    assert status == 400 and "already started" in r["error"]


# ---------------------------------------------------------------------------------------------------------------
# confinement


def test_path_traversal_is_refused(serve, tmp_path):
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "key.txt").write_text("TOPSECRET-CONTENT")
    draw_photos(outside / "photos")
    base, runs = serve()
    name = new_run(base)
    (runs / name / "link").symlink_to(outside)  # a symlink inside the run that points out of it
    for path in [f"/runs/{name}/file/../../secret/key.txt", f"/runs/{name}/file/%2e%2e/%2e%2e/secret/key.txt",
                 f"/runs/{name}/file/link/key.txt", f"/runs/{name}/file/{outside / 'key.txt'}",
                 f"/runs/{name}/photo/..%2F..%2Fsecret%2Fkey.txt", "/runs/../file/x", "/static/..%2Fserver.py"]:
        status, r, _ = call(base + path)
        assert status == 404, path
        assert b"TOPSECRET" not in (r if isinstance(r, bytes) else json.dumps(r).encode())
    for typed in [str(outside / "photos"), "../secret/photos", str(runs / name / "link" / "photos")]:
        status, r, _ = call(f"{base}/api/runs/{name}/folder", "POST", {"path": typed})
        assert status == 400 and "outside the folders this UI may read" in r["error"], typed
    assert not (runs / name / "ui" / "draft.json").exists()


def test_folders_given_at_start_may_be_used(serve, tmp_path):
    photos = draw_photos(tmp_path / "shoot" / "photos")
    base, runs = serve(allowed=[tmp_path / "shoot"])
    name = new_run(base)
    status, r, _ = call(f"{base}/api/runs/{name}/folder", "POST", {"path": str(photos)})
    assert status == 200 and [p["name"] for p in r["photos"]] == ["photo_0.png", "photo_1.png", "photo_2.png"]
    status, img, hdrs = call(f"{base}/runs/{name}/photo/photo_1.png")
    assert status == 200 and hdrs["Content-Type"] == "image/png" and img[:4] == b"\x89PNG"
    ok = {"model.model": "tiny", "data.instance_prompt": "a photo of sks dog", "data.resolution": "32"}
    assert call(f"{base}/api/runs/{name}/check", "POST", {"values": ok})[1]["ok"] is True


# ---------------------------------------------------------------------------------------------------------------
# who may talk to the server


def test_other_hosts_need_a_token_from_the_environment(serve, monkeypatch, capsys):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(UsageError, match="needs a token; set PEFTBOOTH_UI_TOKEN"):
        serve(host="127.0.0.2")
    assert main(["ui", "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "--host 0.0.0.0: serving beyond this machine needs a token" in capsys.readouterr().err
    monkeypatch.setenv(TOKEN_ENV, "short")
    with pytest.raises(UsageError, match="at least 16 characters"):
        serve(host="127.0.0.2")


def test_token_is_checked_on_every_request(serve, monkeypatch):
    token = "s3cret-token-of-some-length"
    monkeypatch.setenv(TOKEN_ENV, token)
    base, runs = serve(host="127.0.0.2")  # not 127.0.0.1: the token is required
    for path in ["/", "/api/schema", "/api/runs", "/static/app.js", "/runs/x/file/config.yaml"]:
        assert call(base + path)[0] == 401, path
        assert call(base + path, headers={"X-Peftbooth-Token": token + "x"})[0] == 401
    assert call(f"{base}/api/runs", "POST", {"name": "x"})[0] == 401 and not runs.joinpath("x").exists()
    assert call(f"{base}/api/schema", headers={"X-Peftbooth-Token": token})[0] == 200
    status, page, hdrs = call(f"{base}/?token={token}")
    assert status == 200 and b"<title>peftbooth</title>" in page
    cookie = hdrs["Set-Cookie"].split(";")[0]
    assert "HttpOnly" in hdrs["Set-Cookie"] and "SameSite=Strict" in hdrs["Set-Cookie"]
    assert call(f"{base}/api/runs", headers={"Cookie": cookie})[0] == 200


def test_loopback_server_refuses_foreign_hosts_and_origins(serve):
    base, runs = serve()
    port = base.rsplit(":", 1)[1]
    assert call(f"{base}/api/runs")[0] == 200
    assert call(f"{base}/api/runs", headers={"Host": f"localhost:{port}"})[0] == 200
    # a page elsewhere whose name resolves to 127.0.0.1 (DNS rebinding) sends its own Host
    assert call(f"{base}/api/runs", headers={"Host": f"evil.example:{port}"})[0] == 403
    status, _, _ = call(f"{base}/api/runs", "POST", {"name": "x"}, headers={"Origin": "http://evil.example"})
    assert status == 403 and not (runs / "x").exists()


def test_page_loads_nothing_from_elsewhere(serve):
    base, _ = serve()
    status, page, hdrs = call(base + "/")
    assert "default-src 'self'" in hdrs["Content-Security-Policy"]
    text = page.decode()
    static = Path(schema.__file__).parent / "static"
    for name in ["index.html", "app.js", "run.js", "app.css"]:
        body = (static / name).read_text()
        assert "http://" not in body.replace("http://www.w3.org/2000/svg", "") and "https://" not in body, name
        assert "@import" not in body and "fonts.g" not in body
    assert '<script src="/static/app.js"' in text


# ---------------------------------------------------------------------------------------------------------------
# reading progress from the run folder


def test_progress_bar_parsing():
    log = ("\n$ peftbooth train --config c.yaml\nclass images:  50%|#   | 2/4 [00:02<00:02,  1.00s/it]\r"
           "train:   0%|          | 0/40 [00:00<?, ?it/s]\rtrain:  10%|#         | 4/40 [00:02<00:18,  2.00it/s, "
           "loss=0.1, lr=1e-3]\n")
    assert last_bar(log) == {"phase": "train", "step": 4, "total": 40, "it_s": 2.0, "seconds_left": 18.0}
    assert last_bar(log + "\n$ peftbooth train --config c.yaml --resume latest\nloading\n") is None
    slow = "train:  10%|#         | 4/40 [01:02<1:00:18,  4.00s/it]"
    assert last_bar(slow)["it_s"] == 0.25 and last_bar(slow)["seconds_left"] == 3618.0


def test_states_from_disk(tmp_path):
    run = tmp_path / "r"
    (run / "ui").mkdir(parents=True)
    assert state_of(run) == "draft"
    (run / "config.yaml").write_text("{}")
    assert state_of(run) == "ready"
    files.atomic_write(run / "ui" / "job.json", json.dumps({"state": "queued"}))
    assert state_of(run) == "queued"
    files.atomic_write(run / "ui" / "job.json", json.dumps({"state": "started", "pid": os.getpid()}))
    assert state_of(run) == "failed"  # this pid is alive but is not `peftbooth train`: a reused pid, not ours
    (run / "unet").mkdir()
    (run / "unet" / "adapter_model.safetensors").write_bytes(b"")
    assert state_of(run) == "finished"
