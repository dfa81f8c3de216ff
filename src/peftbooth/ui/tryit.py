"""'Try it', export and fuse for finished runs, through the library's own functions.

The base model is loaded once (one `AdapterPipeline` per base model and VAE, the last one kept); each run's
adapters are loaded onto it the first time they are asked for, then switched or mixed by weight.
"""

from __future__ import annotations

import secrets
import shutil
import threading
import time
from pathlib import Path

from ..config.sections import UsageError
from ..runs.atomic import atomic_file, read_json, write_json
from ..runs.rundir import RunDir
from .files import UI_DIR
from .runs import load_config

SAMPLES = "samples"
EXPORTS = "exports"
LIMITS = {"num_images": (1, 8), "steps": (1, 150), "seed": (0, 2**31 - 1), "guidance_scale": (0.0, 100.0),
          "guidance_cutoff": (0.0, 1.0)}


def number(body: dict, key: str, default, typ, flag: str):
    value = body.get(key, default)
    if value in (None, ""):
        value = default
    try:
        value = typ(value)
    except (TypeError, ValueError):
        raise UsageError(f"{flag} must be a number (got {value!r})") from None
    low, high = LIMITS.get(key, (None, None))
    if low is not None and not low <= value <= high:
        raise UsageError(f"{flag} must be between {low} and {high} (got {value})")
    return value


def finished(run: Path) -> Path:
    if not RunDir(run).is_finished():
        raise UsageError(f"run {run.name}: not finished yet (no unet/ adapter)")
    return run


class Studio:
    """The loaded base model and adapters, used by one request at a time."""

    def __init__(self):
        self.lock = threading.Lock()
        self.base: tuple | None = None
        self.pipe = None
        self.loaded: set[str] = set()

    def pipeline(self, run: Path):
        model = load_config(run).get("model") or {}
        base = (model.get("model") or "tiny", model.get("revision"), model.get("variant"), model.get("vae"))
        if self.base != base:
            from ..inference.pipeline import AdapterPipeline

            self.pipe, self.loaded, self.base = None, set(), None  # the old model is freed before the new loads
            self.pipe = AdapterPipeline(base[0], base[1], base[2], vae=base[3])
            self.base = base
        return self.pipe, base

    def forget(self, name: str) -> None:
        """A deleted run's adapters must not stay loaded under a name a new run may take: reload next time."""
        with self.lock:
            if name in self.loaded:
                self.pipe, self.loaded, self.base = None, set(), None

    def generate(self, runs_dir: Path, run: Path, body: dict) -> list[dict]:
        """Images for the run (at `strength`), optionally mixed with a second run; -> their history entries."""
        prompt = str(body.get("prompt") or "").strip()
        if not prompt:
            raise UsageError("prompt: give a prompt, e.g. the instance prompt")
        seed = number(body, "seed", 0, int, "seed")
        steps = number(body, "steps", 25, int, "steps")
        from ..world.metrics import sampling_defaults

        # the model's own guidance where the form leaves it empty, checked before any model is loaded
        default_scale, default_cutoff = sampling_defaults((load_config(run).get("model") or {}).get("model") or "tiny")
        guidance = number(body, "guidance_scale", default_scale, float, "guidance")
        cutoff = number(body, "guidance_cutoff", default_cutoff, float, "guidance cutoff")
        num_images = number(body, "num_images", 1, int, "number of images")
        strength = number(body, "strength", 1.0, float, "strength")
        weights = {run.name: strength}
        other = None
        if body.get("mix_run"):
            from .files import run_dir

            other = finished(run_dir(runs_dir, str(body["mix_run"])))
            if other.name == run.name:
                raise UsageError("mix: choose a different run to mix with")
            weights[other.name] = number(body, "mix_weight", 0.5, float, "mix weight")
        with self.lock:
            pipe, base = self.pipeline(finished(run))
            for r in [run] + ([other] if other else []):
                rmodel = load_config(r).get("model") or {}
                if (rmodel.get("model") or "tiny") != base[0]:
                    raise UsageError(f"mix: run {r.name} was trained on {rmodel.get('model')}, not {base[0]}")
                if r.name not in self.loaded:
                    pipe.load_adapter(r, r.name)
                    self.loaded.add(r.name)
            pipe.set_adapters(weights)
            images = pipe.generate(prompt, num_images=num_images, seed=seed, steps=steps, guidance_scale=guidance,
                                   negative_prompt=str(body.get("negative_prompt") or "") or None,
                                   guidance_cutoff=cutoff)
        return save_samples(run, images, {
            "prompt": prompt, "negative_prompt": str(body.get("negative_prompt") or ""), "seed": seed,
            "steps": steps, "guidance_scale": guidance, "guidance_cutoff": cutoff, "strength": strength,
            "mix_run": other.name if other else None, "mix_weight": weights.get(other.name) if other else None})


def save_samples(run: Path, images: list, settings: dict) -> list[dict]:
    """RUN/ui/samples/STAMP-RANDOM-II.png, each with its settings in STAMP-RANDOM-II.json beside it: the run's
    sample history. The random part keeps two generations in the same second from overwriting each other (by
    the second alone, 3 generations in 2 s gave 6 images but 4 files). The image is written before its JSON, and
    the history lists JSON files, so it never names a missing image."""
    out = run / UI_DIR / SAMPLES
    out.mkdir(parents=True, exist_ok=True)
    stamp, batch, created = time.strftime("%Y%m%d-%H%M%S"), secrets.token_hex(4), time.time()
    entries = []
    for i, img in enumerate(images):
        path = out / f"{stamp}-{batch}-{i:02d}.png"
        with atomic_file(path) as tmp:
            img.save(tmp, format="PNG")
        entry = {**settings, "index": i, "count": len(images), "created": created,
                 "image": path.relative_to(run).as_posix()}
        write_json(path.with_suffix(".json"), entry)
        entries.append(entry)
    return entries


def sample_history(run: Path) -> list[dict]:
    """Every generated image of the run with its settings, newest first."""
    folder = run / UI_DIR / SAMPLES
    entries = []
    for f in folder.glob("*.json") if folder.is_dir() else []:
        entry = read_json(f)
        if entry and (run / str(entry.get("image", ""))).is_file():
            entries.append(entry)
    return sorted(entries, key=lambda e: (-float(e.get("created") or 0), e.get("image", "")))


def export(run: Path, fmt: str) -> Path:
    """RUN/ui/exports/<fmt>/...: the file (diffusers, kohya) or, for peft, a zip of the folders."""
    from ..runs.formats import FORMATS, export_run

    if fmt not in FORMATS:
        raise UsageError(f"format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    target = run / UI_DIR / EXPORTS / fmt
    path = export_run(finished(run), fmt, target if fmt != "peft" else target / run.name, overwrite=True)
    if fmt == "peft":
        archive = shutil.make_archive(str(target / run.name), "zip", root_dir=target, base_dir=run.name)
        return Path(archive)
    return path


FUSED = "fused"


def fuse(run: Path, scale: float, overwrite: bool = False) -> Path:
    """RUN/ui/fused/: a full diffusers pipeline with the adapters merged in; an earlier one is only replaced
    when asked (the page asks first)."""
    from ..inference.fuse import fuse_run

    target = run / UI_DIR / FUSED
    if target.exists() and not overwrite:
        raise Exists(f"fuse: {target} exists already (fused earlier); replace it, or download it as it is")
    return fuse_run(None, finished(run), target, scale=scale, overwrite=True)


class Exists(UsageError):
    pass
