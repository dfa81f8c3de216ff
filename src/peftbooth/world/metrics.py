"""What the DreamBooth paper measures, measured in the world: the evaluator plays DINO and CLIP.

- subject fidelity: the share of "a photo of a sks ball <context>" images that show the subject, over contexts that
  were never in its photos (the paper's DINO / CLIP-I); in-context fidelity, the same over its photos' contexts;
- prompt fidelity: the share of those images whose background is the context the prompt asked for (CLIP-T);
- class drift (language drift): the share of "a photo of a ball" images that show the subject, and class fidelity,
  the share that show a ball at all;
- diversity: the normalised entropy of the class images' colours (the subject counts as one more "colour"),
  1 = every colour equally often, 0 = one colour only;
- subject similarity: the mean cosine similarity of the evaluator's features of the subject images to those of
  the real photos (the paper's DINO score, in this world's feature space).

Whether an image shows the subject is the judge's call (judge.py: any family subject, given its description); the
evaluator reads class, colour and background. The subject is a member of the family (subjects.py), the ball by
default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runs.rundir import WORLD_METRICS_FILE
from . import LABELS, METRICS, is_world_model
from .evaluator import judge, load_evaluator
from .judge import describe, load_judge, p_shows
from .scenes import CLASSES, COLOURS, IDENTIFIER, SIZE, prompt
from .subjects import BALL, by_name


@dataclass
class WorldEvalSettings:
    num_images: int = 8  # per subject prompt; the class prompt gets twice as many
    seed: int = 0
    steps: int = 20  # DPM-Solver++
    guidance_scale: float = 5.0
    # guided for the first 0.4 of the steps only (models/pipeline.guidance_cutoff_kwargs): guided to the end the
    # world model draws its boxes as four-pointed stars (docs/world.md, "Shapes")
    guidance_cutoff: float = 0.4
    identifier: str = IDENTIFIER
    subject: str = BALL  # a family subject's name (subjects.py)
    in_context: bool = False  # also in-context fidelity: num_images per photo context

    def held_out(self) -> tuple[str, ...]:
        return by_name(self.subject).held_out_contexts


def sampling_defaults(model: str) -> tuple[float, float]:
    """(guidance scale, guidance cutoff) where the caller gives none (`generate`, the UI's 'Try it' form): the
    world model samples as its metrics do (guidance 5 for the first 40 % of the steps: guided to the end, its boxes
    are stars, docs/world.md); any other model at 7.5 on every step."""
    if is_world_model(model):
        world = WorldEvalSettings()
        return world.guidance_scale, world.guidance_cutoff
    return 7.5, 1.0


def colour_entropy(labels: list[str]) -> float:
    """Normalised entropy of the labels over the world's colours plus 'subject': 1 = uniform, 0 = one only."""
    k = len(COLOURS) + 1
    counts = np.array([labels.count(c) for c in set(labels)], float)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum() / math.log(k))


def world_metrics(sample_fn, instruments: tuple, real_images: list, s: WorldEvalSettings) -> tuple[dict, dict]:
    """Metrics of one model. `sample_fn(prompt, seeds) -> images` draws from it; `instruments` is (evaluator,
    judge). Returns (metrics, images by prompt)."""
    evaluator, judge_net = instruments
    subject = by_name(s.subject)
    description = describe(subject)
    seeds = [s.seed + i for i in range(s.num_images)]
    held = s.held_out()

    def draw(contexts) -> dict:  # prompt -> num_images images, one per seed
        return {p: sample_fn(p, seeds) for p in (subject.prompt(c, s.identifier) for c in contexts)}

    images = draw(held)
    held_images = [im for ims in images.values() for im in ims]
    shown = p_shows(judge_net, held_images, description) > 0.5
    in_context = None
    if s.in_context:
        inside = draw(subject.photo_contexts)
        in_context = float(np.mean(p_shows(judge_net, [im for ims in inside.values() for im in ims], description)
                                   > 0.5))
        images.update(inside)
    class_prompt = prompt(subject.cls)
    class_images = sample_fn(class_prompt, [s.seed + 1000 + i for i in range(2 * s.num_images)])
    subj = judge(evaluator, held_images)
    wanted = [c for c in held for _ in seeds]
    cls = judge(evaluator, class_images)
    real = judge(evaluator, real_images)["features"] if real_images else None
    drifted = p_shows(judge_net, class_images, description) > 0.5
    out = {
        "subject_fidelity": float(np.mean(shown)),
        "in_context_fidelity": in_context,
        "prompt_fidelity": float(np.mean([b == c for b, c in zip(subj["background"], wanted)])),
        "class_drift": float(np.mean(drifted)),
        "class_fidelity": float(np.mean([c == subject.cls for c in cls["class"]])),
        "diversity": colour_entropy(["subject" if d else c for d, c in zip(drifted, cls["colour"])]),
        "subject_similarity": None if real is None else float((subj["features"] @ real.T).mean()),
    }
    images[class_prompt] = class_images
    return {k: (None if v is None else round(v, 4)) for k, v in out.items()}, images


def load_instruments(model_dir: str | Path) -> tuple:
    """(evaluator, judge) of a world model folder."""
    return load_evaluator(model_dir), load_judge(model_dir)


def pipeline_sampler(pipe, s: WorldEvalSettings):
    """sample_fn over a StableDiffusionPipeline: one image per seed (CPU generators), at the world's size, with
    the steps and guidance of `s`."""
    from ..inference.sampling import sample

    def sample_fn(prompt: str, seeds: list[int]) -> list:
        return sample(pipe, [prompt], seeds, SIZE, s.steps, s.guidance_scale, s.guidance_cutoff)[0]
    return sample_fn


def evaluate_adapter(model_dir: str | Path, run_dirs: dict[str, str | Path], real_images: list,
                     s: WorldEvalSettings | None = None, baseline: bool = True) -> dict:
    """World metrics of each run's adapter (and of the base model) on the world model loaded once."""
    from diffusers import DPMSolverMultistepScheduler

    from ..inference.pipeline import AdapterPipeline

    s = s or WorldEvalSettings()
    pipe = AdapterPipeline(str(model_dir), device="cpu")
    pipe.pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.pipe.scheduler.config)
    instruments = load_instruments(model_dir)
    sample_fn = pipeline_sampler(pipe.pipe, s)
    results, images = {}, {}
    if baseline:
        pipe.set_adapters({})
        results["base"], images["base"] = world_metrics(sample_fn, instruments, real_images, s)
    for name, run in run_dirs.items():
        pipe.load_adapter(run, name)
        pipe.set_adapters({name: 1.0})
        results[name], images[name] = world_metrics(sample_fn, instruments, real_images, s)
    return {"results": results, "images": images}


# ---------------------------------------------------------------------------------------------------------------
# `peftbooth eval RUN` on a run trained on the world model



def format_world_table(results: dict) -> str:
    def cell(v):
        return "-" if v is None else f"{v:.3f}"

    lines = ["| model | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for name, m in results.items():
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cell(m[k]) for k in METRICS) + " |")
    return "\n".join(lines)


def identifier_of(instance_prompt: str | None, cls: str) -> str | None:
    """The word before the class noun in 'a photo of a sks ball'."""
    words = (instance_prompt or "").split()
    return words[words.index(cls) - 1] if cls in words[1:] else None


def evaluate_world_run(run_dir: str | Path, cfg: dict, output_dir: str | Path, settings: WorldEvalSettings,
                       baseline: bool = True, fingerprint: str | None = None) -> dict:
    """World metrics of a run (and of the base model, same seeds): world_metrics.json, a table and image sheets
    in `output_dir`. `cfg` is the run's config.yaml."""
    from dataclasses import asdict, replace

    from ..config.sections import UsageError
    from ..data.images import list_images, load_image
    from ..inference.sampling import grid
    from ..runs.atomic import write_json, write_text
    from . import MODEL_DIR

    data_cfg = cfg.get("data") or {}
    try:
        cls = by_name(settings.subject).cls
    except ValueError as e:
        raise UsageError(f"--world-subject: {e}") from None
    identifier = identifier_of(data_cfg.get("instance_prompt"), cls)
    if identifier is None:
        named = [c for c in CLASSES if c in (data_cfg.get("instance_prompt") or "").split()[1:]]
        hint = f" (it names a {named[0]}: pass --world-subject, the family member its photos show)" if named else ""
        raise UsageError(f"RUN_DIR {run_dir}: its instance prompt {data_cfg.get('instance_prompt')!r} names no "
                         f"identifier before {cls!r}, the class of world subject {settings.subject!r}{hint}")
    settings = replace(settings, identifier=identifier)
    photos = data_cfg.get("instance_data_dir")
    real = [load_image(p) for p in list_images(photos, "--instance-data-dir")] if photos and Path(photos).is_dir() else []
    res = evaluate_adapter(MODEL_DIR, {"adapter": run_dir}, real, settings, baseline)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, by_prompt in res["images"].items():  # one row per prompt, one column per seed, 2x
        sheet = grid(list(by_prompt.values()))
        sheet.resize((sheet.width * 2, sheet.height * 2), 0).save(out / f"world_{name}_sheet.png")
    report = {"protocol": "world", "settings": asdict(settings), "adapter_fingerprint": fingerprint,
              "num_real_images": len(real), "prompts": list(next(iter(res["images"].values()))),
              "results": res["results"]}
    write_json(out / WORLD_METRICS_FILE, report)
    write_text(out / "world_metrics.md", format_world_table(res["results"]) + "\n")
    return report
