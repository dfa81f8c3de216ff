"""The JSON API behind the page: one method per route (the routes are listed in server.py).

A mixin of the request handler, so each method has the request (`self.json_body()`, `self.send_json`) and the
shared `self.app` (runs folder, queue, loaded models). Every refusal is a UsageError with one line that names
the field or the run, which the page shows where it belongs.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config.sections import ADAPTER_TYPES, UsageError
from ..runs.atomic import read_json, write_json
from ..runs.rundir import RunDir
from . import files, runs, schema, tryit

FORM = "form.json"  # RUN/ui/form.json: a draft's last checked form values, so "Edit" brings them back


def taken(name: str) -> UsageError:
    return UsageError(f"run name {name!r}: taken by another run; choose another name")


class Api:
    app = None  # set on the handler class by make_server

    def api_schema(self, query):
        self.send_json({"fields": schema.form_fields(), "presets": schema.PRESETS, "preset_labels": schema.PRESET_LABELS,
                        "low_memory": schema.LOW_MEMORY,
                        "models": [*schema.MODEL_CHOICES, *schema.HUB_MODELS], "adapters": list(ADAPTER_TYPES),
                        "limits": {"photo_bytes": files.MAX_UPLOAD_BYTES, "photos": files.MAX_PHOTOS,
                                   "min_photos": files.MIN_PHOTOS, "best_photos": list(files.BEST_PHOTOS),
                                   "photo_rule": files.PHOTO_RULE}})

    def api_runs(self, query):
        queue = self.app.queue.queued()
        rows = [runs.summary(p, queue) for p in self.app.queue.runs()]
        rows.sort(key=lambda r: (-r["time"], r["name"]))  # newest first
        self.send_json({"runs": rows, "queue": queue})

    def api_new_run(self, query):
        """A draft folder, made when the first photo (or a folder) is given; a taken name is refused, never
        changed behind the user's back."""
        name = files.run_name(str(self.json_body().get("name") or "run"))
        self.app.runs_dir.mkdir(parents=True, exist_ok=True)
        run = self.app.runs_dir / name
        try:
            run.mkdir()
        except FileExistsError:
            raise taken(name) from None
        (run / files.UI_DIR).mkdir()
        self.send_json({"name": run.name})

    def api_run(self, query, name):
        self.send_json(self.app.detail(self.app.run(name)))

    def api_delete(self, query, name):
        run = self.app.run(name)
        self.app.queue.delete(run)  # refuses a run that trains or waits to
        self.app.studio.forget(name)
        self.send_json({"deleted": name})

    def editable(self, run: Path) -> None:
        if RunDir(run).config_file.is_file():
            raise UsageError(f"run {run.name}: already started; its photos and settings are fixed")

    def api_upload(self, query, name):
        run = self.app.run(name)
        self.editable(run)
        filename = (query.get("filename") or [""])[0]
        data = self.body(limit=files.MAX_UPLOAD_BYTES)
        draft = read_json(run / files.UI_DIR / "draft.json") or {}
        if draft.get("instance_data_dir"):
            raise UsageError("this run uses a folder of photos; clear the folder to upload instead")
        path = files.store_upload(run / files.PHOTOS, filename, data)
        self.send_json({"name": path.name})

    def api_folder(self, query, name):
        run = self.app.run(name)
        self.editable(run)
        typed = str(self.json_body().get("path") or "").strip()
        draft_file = run / files.UI_DIR / "draft.json"
        if not typed:
            draft_file.unlink(missing_ok=True)
            return self.send_json({"photo_dir": str(run / files.PHOTOS)})
        folder = files.confined(typed, self.app.roots, "folder")
        if not folder.is_dir():
            raise UsageError(f"folder {typed}: no such folder")
        files.atomic_write(draft_file, json.dumps({"instance_data_dir": str(folder)}))
        self.send_json({"photo_dir": str(folder), "photos": files.photos_of(folder)})

    def api_caption(self, query, name):
        run = self.app.run(name)
        self.editable(run)
        body = self.json_body()
        folder = self.app.photo_dir(run)
        files.confined(str(folder), self.app.roots, "folder")  # the allowed folders may have changed since
        files.write_caption(folder, str(body.get("photo") or ""), str(body.get("caption") or ""))
        self.send_json({"ok": True})

    def api_check(self, query, name, start: bool = False):
        """Check a draft's settings as `peftbooth train` would; with start, write config.yaml and queue the run."""
        run = self.app.run(name)
        self.editable(run)
        body = self.json_body()
        self.check(run, body.get("values") or {}, start, body.get("given"))

    def api_start(self, query, name):
        self.api_check(query, name, start=True)

    def api_check_new(self, query, start: bool = False):
        """The same, before any photo was given (no draft folder yet). Nothing is created: a refused Start leaves
        no folder behind and does not take the name (no photos: it is always refused)."""
        body = self.json_body()
        name = files.run_name(str(body.get("name") or "run"))
        run = self.app.runs_dir / name
        if run.exists():
            raise taken(name)
        self.check(run, body.get("values") or {}, start, body.get("given"))

    def api_start_new(self, query):
        self.api_check_new(query, start=True)

    def api_defaults(self, query):
        """The base model's defaults for the fields the user has not set (`given`), for the page to show."""
        body = self.json_body()
        run = self.app.runs_dir / files.run_name(str(body.get("name") or "run"))
        folder = self.app.photo_dir(run) if run.is_dir() else None
        values, given = body.get("values"), body.get("given")
        if not isinstance(values, dict) or not isinstance(given, list):
            raise UsageError("expected {values: {...}, given: [...]}")
        self.send_json(schema.model_defaults(values, [str(k) for k in given], folder and str(folder)))

    def check(self, run: Path, values, start: bool, given=None) -> None:
        folder = self.app.photo_dir(run)
        # `given` (the fields the user set) lets the base model's defaults fill the rest, as `train` does
        given = [str(k) for k in given] if isinstance(given, list) else None
        cfg, errors = schema.check_run(values, str(folder), str(run), given)
        problem = files.photos_problem(folder)
        if problem:  # in words, also on an empty form (where validate's problems stop the checks before photos)
            errors = {"data.instance_data_dir": [problem], **{k: v for k, v in errors.items()
                                                              if k != "data.instance_data_dir"}}
        if run.is_dir() and isinstance(values, dict):
            write_json(run / files.UI_DIR / FORM, values)
        if errors:  # a result, not a failure of the request: the page shows each beside its field
            return self.send_json({"ok": False, "errors": errors})
        if start:
            files.atomic_write(RunDir(run).config_file, schema.config_yaml(cfg))
            self.app.queue.enqueue(run, resume=False)
        self.send_json({"ok": True, "name": run.name, "command": f"peftbooth train --config {RunDir(run).config_file}",
                        "note": files.photos_note(folder)})

    def api_queue(self, query, name):
        """Start a run whose config is written: one taken out of the queue (ready), or one that failed before
        its first checkpoint (it starts over)."""
        run = self.app.run(name)
        state = runs.state_of(run)
        if state not in ("ready", "failed") or not RunDir(run).config_file.is_file():
            raise UsageError(f"run {name}: cannot be started (it is {state})")
        self.app.queue.enqueue(run, resume=False)
        self.send_json({"result": "queued"})

    def api_stop(self, query, name):
        self.send_json({"result": self.app.queue.stop(self.app.run(name))})

    def api_resume(self, query, name):
        run = self.app.run(name)
        state = runs.state_of(run)
        if state not in ("stopped", "failed") or not runs.list_checkpoints(run):
            raise UsageError(f"run {name}: nothing to resume (it is {state}, with no checkpoint)")
        self.app.queue.enqueue(run, resume=True)
        self.send_json({"result": "queued"})

    def api_samples(self, query, name):
        run = self.app.run(name)
        self.send_json({"samples": [self.sample(name, e) for e in tryit.sample_history(run)]})

    def sample(self, name: str, entry: dict) -> dict:
        return {**entry, "src": f"/runs/{name}/file/{entry['image']}"}

    def api_generate(self, query, name):
        run = self.app.run(name)
        entries = self.app.studio.generate(self.app.runs_dir, run, self.json_body())
        samples = [self.sample(name, e) for e in entries]
        self.send_json({"images": [s["src"] for s in samples], "samples": samples})

    def api_export(self, query, name):
        run = self.app.run(name)
        fmt = str(self.json_body().get("format") or "")
        path = tryit.export(run, fmt)
        rel = path.relative_to(run).as_posix()
        # the download names the run: every diffusers export is otherwise 'pytorch_lora_weights.safetensors'
        as_name = f"{name}-{fmt}{''.join(path.suffixes[-1:])}"
        self.send_json({"path": str(path), "filename": as_name,
                        "download": f"/runs/{name}/file/{rel}?download=1&as={as_name}"})

    def api_fuse(self, query, name):
        run = self.app.run(name)
        body = self.json_body()
        scale = tryit.number(body, "scale", 1.0, float, "scale")
        path = tryit.fuse(run, scale, overwrite=body.get("overwrite") is True)
        self.send_json({"path": str(path), "download": f"/runs/{name}/fused.zip"})
