"""A run folder and its layout: the one place that knows which file of a run lives where.

``peftbooth train --output-dir OUT`` writes, and every other command reads::

    OUT/config.yaml              the run's config, replayable with `train --config` (CONFIG_FILE)
    OUT/README.md                the model card
    OUT/unet/ or transformer/    PEFT adapter folders (adapter_config.json + adapter_model.safetensors), one per
    OUT/text_encoder/            adapted part (ADAPTER_PARTS); the denoiser's (unet/, or transformer/ for SD3) is
    OUT/text_encoder_2/          written last, so it marks a finished run; text_encoder_2/ is SDXL's and SD3's
                                 second text encoder (SD3's third, T5, is never trained)
    OUT/token_embeddings.safetensors   the identifier's trained input embedding, with --train-token-embedding
    OUT/train_stats.json         fit()'s statistics, so the report can be rebuilt without the training process
    OUT/proxies.json             the offline proxies computed at the end of training
    OUT/report.html              the static report page
    OUT/validation/              validation grids per step (written by validation.py)
    OUT/checkpoints/             resumable checkpoints (written by checkpoint.py)
    OUT/class_images/            generated class images, unless --class-data-dir says elsewhere
    OUT/eval/                    `peftbooth eval` output: metrics.json or world_metrics.json, images, sheets

A folder written by the PEFT DreamBooth example script (adapter folders, no config.yaml) is read as well: every
reader here treats config.yaml as optional unless it is asked to be strict.

Writers go through runs/atomic.py: everything is written under a hidden name beside its destination and renamed
into place in one step, so a reader (the UI, a second command, a resumed run) never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..config.sections import UsageError
from .atomic import read_json

# adapter folders of a run: the denoiser's (the UNet's; SD3's MMDiT transformer's), then the text encoders' in model
# order (text_encoder_2: SDXL's and SD3's second CLIP)
ADAPTER_PARTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
DENOISERS = ADAPTER_PARTS[:2]  # a run has exactly one of them
UNET, TRANSFORMER = DENOISERS
TEXT_ENCODERS = ADAPTER_PARTS[2:]
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TOKEN_EMBEDDINGS = "token_embeddings.safetensors"  # token_embedding.py writes and reads it
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # never loaded: unpickling can run arbitrary code
CONFIG_FILE = "config.yaml"
MODEL_CARD = "README.md"
STATS_FILE = "train_stats.json"
PROXIES_FILE = "proxies.json"
REPORT_FILE = "report.html"
VALIDATION_DIR = "validation"  # validation/step_N/ (training.validation writes them)
WARNING_FILE = "warning.json"  # validation/warning.json: {"step", "warning"}, read by the report and the UI's run page
CHECKPOINTS_DIR = "checkpoints"
CLASS_IMAGES_DIR = "class_images"
EVAL_DIR = "eval"
EVAL_METRICS_FILE = "metrics.json"  # the DreamBooth protocol's
WORLD_METRICS_FILE = "world_metrics.json"  # a world run's (world.metrics)


@dataclass(frozen=True)
class RunDir:
    """The paths of one run folder and the readers of its files. Reading never writes; nothing is cached, so a
    RunDir of a run in progress sees its files as they are now."""

    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    # --- layout
    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def model_card(self) -> Path:
        return self.path / MODEL_CARD

    @property
    def stats_file(self) -> Path:
        return self.path / STATS_FILE

    @property
    def proxies_file(self) -> Path:
        return self.path / PROXIES_FILE

    @property
    def report_file(self) -> Path:
        return self.path / REPORT_FILE

    @property
    def validation_dir(self) -> Path:
        return self.path / VALIDATION_DIR

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def class_images_dir(self) -> Path:
        return self.path / CLASS_IMAGES_DIR

    def class_images_of(self, class_data_dir: str | Path | None) -> Path:
        """Where the run's class images are: --class-data-dir when given, else OUT/class_images."""
        return Path(class_data_dir) if class_data_dir else self.class_images_dir

    @property
    def eval_dir(self) -> Path:
        return self.path / EVAL_DIR

    @property
    def token_embeddings_file(self) -> Path:
        return self.path / TOKEN_EMBEDDINGS

    def adapter_dir(self, part: str) -> Path:
        if part not in ADAPTER_PARTS:
            raise ValueError(f"no adapter part {part!r}; parts: {', '.join(ADAPTER_PARTS)}")
        return self.path / part

    # --- adapters
    def adapter_parts(self) -> list[str]:
        """The parts that have an adapter folder (an adapter_config.json), in ADAPTER_PARTS order; unchecked."""
        return [p for p in ADAPTER_PARTS if (self.path / p / ADAPTER_CONFIG).is_file()]

    def adapter_folders(self, flag: str = "--adapter") -> dict[str, Path]:
        """{'unet': dir, 'text_encoder': dir?, 'text_encoder_2': dir?}, checked: the folder exists, has a UNet
        adapter, and every adapter has safetensors weights. A folder with nothing but a pickled
        adapter_model.bin is refused rather than unpickled. `flag` names the input in the error."""
        if not self.path.is_dir():
            raise UsageError(f"{flag} {self.path}: no such folder")
        found = {}
        for part in self.adapter_parts():
            folder = self.path / part
            if not (folder / ADAPTER_WEIGHTS).is_file():
                pickles = [f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES]
                why = (f"only pickle weights ({', '.join(pickles)}), which are not loaded for safety" if pickles
                       else f"no {ADAPTER_WEIGHTS}")
                raise UsageError(f"{flag} {folder}: {why}; convert them to safetensors")
            found[part] = folder
        denoisers = [p for p in DENOISERS if p in found]
        if not denoisers:
            raise UsageError(f"{flag} {self.path}: no unet/{ADAPTER_CONFIG} (or transformer/ for SD3); pass a run "
                             "folder written by 'peftbooth train'")
        if len(denoisers) > 1:
            raise UsageError(f"{flag} {self.path}: holds both unet/ and transformer/ adapters; a run adapts one "
                             "denoiser, remove the folder that does not belong")
        return found

    def denoiser_part(self) -> str:
        """'transformer' when the run has an SD3 transformer adapter folder, else 'unet' (unchecked)."""
        return TRANSFORMER if (self.path / TRANSFORMER / ADAPTER_CONFIG).is_file() else UNET

    def is_finished(self) -> bool:
        """The denoiser's folder is moved into place last by training.saving.save: its weights mark a finished
        run."""
        return any((self.path / p / ADAPTER_WEIGHTS).is_file() for p in DENOISERS)

    def adapter_config(self, part: str) -> dict | None:
        """adapter_config.json of one part as a dict; None when missing or unreadable."""
        data = read_json(self.adapter_dir(part) / ADAPTER_CONFIG)
        return data if isinstance(data, dict) else None

    def adapter_types(self) -> list[str]:
        """PEFT types ('LORA', 'LOHA', 'LOKR') of the adapter folders, upper case; '' for an unreadable config."""
        return [str((self.adapter_config(p) or {}).get("peft_type", "")).upper() for p in self.adapter_parts()]

    def adapter_fingerprint(self) -> str | None:
        """sha256 (16 hex) of the adapter weights: ties eval results to the adapter they were computed for."""
        h, found = hashlib.sha256(), False
        for part in ADAPTER_PARTS:
            f = self.path / part / ADAPTER_WEIGHTS
            if f.is_file():
                h.update(part.encode())
                h.update(f.read_bytes())
                found = True
        if found and self.token_embeddings_file.is_file():
            h.update(self.token_embeddings_file.read_bytes())
        return h.hexdigest()[:16] if found else None

    def adapter_sizes(self) -> dict[str, int]:
        """Bytes on disk of each adapter folder."""
        sizes = {}
        for part in ADAPTER_PARTS:
            folder = self.path / part
            if folder.is_dir():
                sizes[part] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        if self.token_embeddings_file.is_file():
            sizes["token_embeddings"] = self.token_embeddings_file.stat().st_size
        return sizes

    # --- config.yaml
    def read_config(self, strict: bool = False, flag: str = "RUN_DIR") -> dict:
        """config.yaml as a dict; {} when there is none. Invalid YAML is a UsageError when `strict` (the caller
        needs the settings), else {} (they only describe the run, e.g. in the report)."""
        import yaml

        try:
            text = self.config_file.read_text()
        except OSError:
            return {}
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            if strict:
                raise UsageError(f"{flag} {self.path}: {CONFIG_FILE} is not valid YAML "
                                 f"({str(e).splitlines()[0]})") from e
            return {}
        return data if isinstance(data, dict) else {}

    def config_text(self) -> str | None:
        try:
            return self.config_file.read_text()
        except OSError:
            return None

    def setting(self, section: str, name: str, default=None, strict: bool = False):
        """One value of config.yaml (`section.name`), `default` when missing or null."""
        value = (self.read_config(strict).get(section) or {}).get(name)
        return default if value is None else value

    def recorded_base_model(self) -> tuple[str | None, Path | None]:
        """(base model, file it was read from): config.yaml, else the UNet adapter's own record (PEFT's
        base_model_name_or_path, e.g. in a folder of the PEFT example script); (None, None) if neither has one.
        Invalid YAML in config.yaml is a UsageError: a base model guessed past a broken config is no answer."""
        import yaml

        if self.config_file.is_file():
            try:
                data = yaml.safe_load(self.config_file.read_text()) or {}
            except yaml.YAMLError as e:
                raise UsageError(f"{self.config_file}: not valid YAML ({str(e).splitlines()[0]})") from e
            model = base_model_of(data if isinstance(data, dict) else {}, {})
            if model:
                return model, self.config_file
        denoiser = self.denoiser_part()
        model = base_model_of({}, self.adapter_config(denoiser) or {})
        if model:
            return model, self.adapter_dir(denoiser) / ADAPTER_CONFIG
        return None, None

    # --- the other files
    def read_stats(self) -> dict | None:
        return read_json(self.stats_file)

    def read_proxies(self) -> dict | None:
        return read_json(self.proxies_file)

    def read_eval(self, name: str = EVAL_METRICS_FILE, eval_dir: str | Path | None = None) -> dict | None:
        """A metrics file of `peftbooth eval` (RUN/eval/ unless it was written elsewhere)."""
        return read_json(Path(eval_dir or self.eval_dir) / name)


def base_model_for(model: str | None, run_dirs: list[str | Path], flag: str = "--adapter") -> str:
    """--model if given; else the base model the run folders record, announced on stdout (one line) so that it is
    never a surprise. Runs that record different base models need --model."""
    if model:
        return model
    if not run_dirs:
        raise UsageError(f"--model is required when no {flag} is given: a hub id, a local diffusers folder, or 'tiny'")
    found = [(Path(r), *RunDir(r).recorded_base_model()) for r in run_dirs]
    missing = [r for r, m, _ in found if not m]
    if missing:
        raise UsageError(f"{flag} {missing[0]}: records no base model (no config.yaml); pass --model")
    models = {m for _, m, _ in found}
    if len(models) > 1:
        (a, ma, _), (b, mb, _) = next((x, y) for x in found for y in found if x[1] != y[1])
        raise UsageError(f"{flag} {a} and {flag} {b} were trained on different base models ({ma}, {mb}); "
                         "pass --model")
    _, model, source = found[0]
    print(f"base model: {model} (from {source}; --model overrides)")
    return model


def recorded_setting(run_dirs: list[str | Path], section: str, name: str, given, default, flag: str):
    """`given` if not None; else the value the run folders' config.yaml record (they must agree: a UsageError
    naming `flag` if they do not), else `default`."""
    if given is not None:
        return given
    values = {repr(v): v for v in (RunDir(r).setting(section, name) for r in run_dirs) if v is not None}
    if len(values) > 1:
        raise UsageError(f"{flag}: the --adapter runs were trained with different values ({', '.join(values)}); "
                         f"pass {flag}")
    return next(iter(values.values()), default)


def adapter_parts(models: list, denoiser: str = UNET) -> dict:
    """{'unet': models[0], 'text_encoder': models[1], 'text_encoder_2': models[2]}, as many as given: the denoiser
    first (under `denoiser`: 'unet', or 'transformer' for SD3), then the text encoders in the model's order."""
    parts = (denoiser, *TEXT_ENCODERS)
    if denoiser not in DENOISERS or len(models) > len(parts):
        raise ValueError(f"{len(models)} models for the adapter parts {parts}")
    return dict(zip(parts, models))


def base_model_of(config: dict, unet_adapter_config: dict) -> str | None:
    """The base model a run was trained on: its config.yaml's model.model, else the UNet adapter's own record
    (PEFT's base_model_name_or_path, e.g. in a folder of the PEFT example script); None if neither has one."""
    model = (config.get("model") or {}).get("model") or unet_adapter_config.get("base_model_name_or_path")
    return str(model) if model else None


def step_dir(output_dir: str | Path, step: int) -> Path:
    """The validation images of `step`: OUT/validation/step_N/."""
    return Path(output_dir) / VALIDATION_DIR / f"step_{step}"


def validation_steps_on_disk(output_dir: str | Path) -> list[int]:
    """Steps with a validation folder in a run folder, in numeric order (step_100 after step_20)."""
    root = Path(output_dir) / VALIDATION_DIR
    steps = []
    for d in root.glob("step_*") if root.is_dir() else []:
        suffix = d.name[len("step_"):]
        if d.is_dir() and suffix.isdigit():
            steps.append(int(suffix))
    return sorted(steps)


def read_warning(output_dir: str | Path) -> str | None:
    """The warning validation left (samples equal to the base model's, or no longer changing), if any."""
    try:
        return str(json.loads((Path(output_dir) / VALIDATION_DIR / WARNING_FILE).read_text())["warning"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
