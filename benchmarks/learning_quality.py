"""Learning quality on the world model, per subject of the family: does each adapter learn its subject, draw it in
contexts its photos never showed, follow the prompt, and does prior preservation keep "a <class>" meaning any one?

For each subject of --subjects (default: the test subjects, src/peftbooth/world/subjects.py), each adapter and
each seed, train the world recipe (peftbooth/world/recipe.py) on the subject's photos and print one JSON row: the
world metrics (docs/world.md: in-context and held-out-context fidelity by the judge, prompt fidelity, class drift,
diversity) and the training seconds. The base model is measured once per subject (adapter "base"). --summarize
prints the per-subject table and the aggregate over subjects and seeds (mean ± spread).

    .venv/bin/python benchmarks/learning_quality.py --subjects test --seeds 3 \\
        --output benchmarks/results/learning_quality.jsonl
    .venv/bin/python benchmarks/learning_quality.py --summarize benchmarks/results/learning_quality.jsonl

--ablations instead runs the older grid on one subject: each adapter with and without prior preservation and with
and without the text-encoder adapter (seed 0), and LoRA with and without prior preservation over --seeds.
Runs go --jobs at a time (default 2), one CPU thread each; the rows come out in the grid's order.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
COLUMNS = ("in_context_fidelity", "subject_fidelity", "prompt_fidelity", "class_drift", "class_fidelity",
           "diversity", "train_seconds")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subjects", default="test", help="test | tuning | all | comma-separated subject names")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--adapters", default="lora,loha,lokr")
    p.add_argument("--num-images", type=int, default=8, help="images per evaluation prompt")
    p.add_argument("--ablations", action="store_true", help="the prior x text-encoder grid on the first subject")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="runs at once, one CPU thread each (default: 2, or 1 on a one-core machine)")
    p.add_argument("--output", default=None, help="also append the JSON rows to this file")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="change the recipe for every run, e.g. --set data.prior_loss_weight=1, or --set "
                        "data.prior_mode=base-prediction --set data.class_data_dir=none (repeatable; recorded in each "
                        "adapter row as 'recipe_changes')")
    p.add_argument("--save-images", metavar="DIR", help="keep every sample: DIR/SUBJECT/RUN/PROMPT_SEED.png (for the "
                   "judge's hand labels, benchmarks/judge_labels.py)")
    p.add_argument("--smoke", action="store_true", help="the first subject, the first adapter, one seed, 2 class "
                   "images, one job: CI's smallest mode")
    p.add_argument("--summarize", metavar="JSONL", help="print the Markdown tables of a results file and exit")
    p.add_argument("--rescore", nargs=2, metavar=("JSONL", "IMAGES"), help="the rows of JSONL measured again from "
                   "the samples its run kept in IMAGES (--save-images), with the current judge; to --output or stdout")
    p.add_argument("--guidance-scale", type=float, default=None, help="the evaluation's guidance (default: the "
                   "world metrics' 5)")
    p.add_argument("--guidance-cutoff", type=float, default=None, help="the share of the evaluation's sampling steps "
                   "that are guided (default: the world metrics')")
    p.add_argument("--remeasure", nargs=2, metavar=("WORK_DIR", "JSONL"), help="measure the runs an earlier "
                   "invocation kept in WORK_DIR (it names it at its start; run K is row K of its JSONL) again, e.g. at "
                   "another --guidance-scale, without training; to stdout and --output")
    a = p.parse_args()
    if a.remeasure:
        return remeasure(Path(a.remeasure[0]), Path(a.remeasure[1]), a)
    if a.summarize:
        print(summarize([json.loads(line) for line in open(a.summarize) if line.strip()]))
        return 0
    if a.rescore:
        rows = rescore([json.loads(line) for line in open(a.rescore[0]) if line.strip()], Path(a.rescore[1]))
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if a.output:
            Path(a.output).write_text(text)
        else:
            print(text, end="")
        return 0

    try:
        changes = recipe_changes(a.set)
    except ValueError as e:
        print(f"error: --set {e}", file=sys.stderr)
        return 2
    import torch

    from peftbooth.world.subjects import split

    t0 = time.perf_counter()
    torch.set_num_threads(1)  # each run on one core: on 2 cores two one-thread runs beat one two-thread run
    tuning, test = split()
    chosen = {"test": test, "tuning": tuning, "all": tuning + test}.get(a.subjects)
    names = [s.name for s in chosen] if chosen else a.subjects.split(",")
    adapters = a.adapters.split(",")
    if a.smoke:
        names, adapters, a.seeds, a.jobs = names[:1], adapters[:1], 1, 1
    work = Path(tempfile.mkdtemp(prefix="peftbooth-lq-"))
    print(f"runs kept in {work} (for --remeasure)", file=sys.stderr)
    num_class_images = prepare(work, names, 2 if a.smoke else None, class_prompt_from_captions(changes))
    if a.ablations:
        grid = [(names[0], ad, prior, te, 0) for ad, prior, te in itertools.product(adapters, (True, False),
                                                                                   (True, False))]
        grid += [(names[0], "lora", prior, True, seed) for seed in range(1, a.seeds) for prior in (True, False)]
    else:
        grid = [(n, "base", False, False, 0) for n in names]
        grid += [(n, ad, True, True, seed) for n in names for ad in adapters for seed in range(a.seeds)]
    if a.smoke:
        grid = grid[:2] if not a.ablations else grid[:1]
    jobs = [(k, *run, a.steps, num_class_images, changes) for k, run in enumerate(grid)]
    out = open(a.output, "a") if a.output else None
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no torch state forked from this one
    with ProcessPoolExecutor(a.jobs, mp_context=ctx, initializer=init_worker,
                             initargs=(work, a.num_images, a.save_images, a.guidance_scale, a.guidance_cutoff)) as pool:
        for row in pool.map(one_run, jobs):  # in grid order, whatever order they finish in
            line = json.dumps({**row, "jobs": a.jobs}, default=list)
            print(line, flush=True)
            if out:
                out.write(line + "\n")
                out.flush()
    print(f"{len(grid)} runs in {time.perf_counter() - t0:.0f} s with {a.jobs} at once", file=sys.stderr)
    return 0


def prepare(work: Path, names: list[str], num_class_images: int | None, from_captions: bool) -> int:
    """Each subject's photos (work/photos/NAME) and the class images (work/class/CLASS, or work/class/NAME for
    class images drawn from each subject's captions), made once here so that no two runs race to make them."""
    import torch

    from peftbooth.data.images import class_image_prompt
    from peftbooth.models.loading import load_components
    from peftbooth.models.vae import vae_force_upcast
    from peftbooth.precision import for_training
    from peftbooth.training.prior import class_images_from_components
    from peftbooth.world import WORLD_NAME
    from peftbooth.world.recipe import RECIPE, world_config
    from peftbooth.world.subjects import by_name, write_photos

    world = load_components(WORLD_NAME)
    cpu_fp32 = for_training("no", torch.device("cpu"), world.family, vae_force_upcast(world.vae))  # as a run here
    n = num_class_images or RECIPE["num_class_images"]
    prompts = {}  # class folder -> what its images are drawn from, as the runs themselves would draw them
    for name in names:
        s = by_name(name)
        write_photos(s, work / "photos" / name)
        cfg = world_config(work / "photos" / name, work / "unused", subject=s)
        cfg.data.class_prompt_from_captions = from_captions
        prompts[name if from_captions else s.cls] = class_image_prompt(cfg.data)
    for folder, class_prompt in prompts.items():
        class_images_from_components(world, class_prompt, work / "class" / folder, n, 4, RECIPE["class_image_steps"],
                                     0, cpu_fp32, show_progress=False)
    return n


def class_prompt_from_captions(changes: dict) -> bool:
    """Whether the runs draw their class images from their photos' captions: --set's value, else the recipe's where
    the prior draws class images (not with --set data.prior_mode=base-prediction, as models.defaults does)."""
    from peftbooth.world.recipe import recipe_defaults

    key = "data.class_prompt_from_captions"
    if key in changes:
        return bool(changes[key])
    class_images = changes.get("data.prior_mode", "class-images") == "class-images"
    return bool(recipe_defaults(class_images=class_images).get(key, False))


WORKER: dict = {}  # per process: the base pipeline, its sampler, the evaluator and judge, the work folder


def remeasure(work: Path, rows_file: Path, a) -> int:
    """The world metrics of the runs kept in `work` again, under this invocation's evaluation settings."""
    rows = [json.loads(line) for line in open(rows_file) if line.strip()]
    missing = [k for k, r in enumerate(rows) if r["adapter"] != "base" and not (work / f"run{k}").is_dir()]
    if missing:
        print(f"error: --remeasure {work} {rows_file}: no run folder for rows {missing} (row K is WORK_DIR/runK: "
              "give the rows of the one invocation that made WORK_DIR)", file=sys.stderr)
        return 2
    out = open(a.output, "a") if a.output else None
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(a.jobs, mp_context=ctx, initializer=init_worker,
                             initargs=(work, a.num_images, a.save_images, a.guidance_scale, a.guidance_cutoff)) as pool:
        for row in pool.map(measure_again, list(enumerate(rows))):
            line = json.dumps(row, default=list)
            print(line, flush=True)
            if out:
                out.write(line + "\n")
    return 0


def measure_again(job: tuple) -> dict:
    k, row = job
    run = None if row["adapter"] == "base" else WORKER["work"] / f"run{k}"
    return {**row, **measure(row["subject"], run, run_label(row))}


def init_worker(work: Path, num_images: int, save_images: str | None = None, guidance: float | None = None,
                cutoff: float | None = None) -> None:
    import torch
    from diffusers import DPMSolverMultistepScheduler

    from peftbooth.inference.pipeline import AdapterPipeline
    from peftbooth.world import MODEL_DIR, WORLD_NAME
    from peftbooth.world.metrics import WorldEvalSettings, load_instruments, pipeline_sampler

    torch.set_num_threads(1)
    pipe = AdapterPipeline(WORLD_NAME, device="cpu")
    pipe.pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.pipe.scheduler.config)
    settings = WorldEvalSettings(num_images=num_images, in_context=True)
    if guidance is not None:
        settings.guidance_scale = guidance
    if cutoff is not None:
        settings.guidance_cutoff = cutoff
    WORKER.update(work=work, settings=settings, pipe=pipe, instruments=load_instruments(MODEL_DIR), save=save_images,
                  sample_fn=pipeline_sampler(pipe.pipe, settings))


def measure(subject: str, adapter_run: str | None = None, label: str = "base") -> dict:
    """The world metrics of the base model (no run) or of a run's adapter, for `subject`; its samples kept under
    the worker's save folder as SUBJECT/LABEL/ when it has one."""
    from dataclasses import replace

    from peftbooth.data.images import list_images, load_image
    from peftbooth.world.metrics import world_metrics

    w = WORKER
    real = [load_image(x) for x in list_images(w["work"] / "photos" / subject, "photos")]  # not their masks
    if adapter_run:
        w["pipe"].load_adapter(adapter_run, "run")
        w["pipe"].set_adapters({"run": 1.0})
    else:
        w["pipe"].set_adapters({})
    try:
        metrics, images = world_metrics(w["sample_fn"], w["instruments"], real,
                                        replace(w["settings"], subject=subject))
    finally:
        if adapter_run:
            w["pipe"].unload("run")
    if w.get("save"):
        folder = Path(w["save"]) / subject / label
        folder.mkdir(parents=True, exist_ok=True)
        for prompt, ims in images.items():
            for i, im in enumerate(ims):
                im.save(folder / f"{prompt.replace(' ', '_')}_{i}.png")
    return {**metrics, "guidance_scale": w["settings"].guidance_scale, "guidance_cutoff": w["settings"].guidance_cutoff}


def one_run(job: tuple) -> dict:
    """Train one configuration of the grid and measure it: (k, subject, adapter, prior, text encoder, seed, steps,
    class images) -> row. Adapter "base": the base model, nothing trained."""
    from peftbooth.training.loop import train
    from peftbooth.world.recipe import world_config
    from peftbooth.world.subjects import by_name

    k, subject, adapter, prior, te, seed, steps, num_class_images, changes = job
    w = WORKER
    row = {"subject": subject, "adapter": adapter, "prior_preservation": prior, "text_encoder": te, "seed": seed}
    if adapter == "base":
        return {**row, "steps": 0, "train_seconds": 0.0, **measure(subject)}
    s = by_name(subject)
    cfg = world_config(w["work"] / "photos" / subject, w["work"] / f"run{k}", adapter, prior=prior, text_encoder=te,
                       steps=steps, seed=seed, subject=s,
                       class_data_dir=w["work"] / "class" / (subject if class_prompt_from_captions(changes) else s.cls))
    if prior:
        cfg.data.num_class_images = num_class_images
    for key, value in changes.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    if prior:  # after --set data.prior_mode=...: what the class images show follows the mode, as it does in `train`
        cfg.data.class_prompt_from_captions = class_prompt_from_captions(changes)
    if changes:  # as the run's config holds them
        row["recipe_changes"] = {k: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in changes}
    t0 = time.perf_counter()
    run = train(cfg)
    seconds = time.perf_counter() - t0
    metrics = measure(subject, run, run_label(row))
    return {**row, "steps": cfg.train.max_train_steps, "train_seconds": round(seconds, 1), **metrics}


def recipe_changes(items: list[str]) -> dict:
    """["data.prior_loss_weight=1"] -> {"data.prior_loss_weight": 1.0}, each value cast to the field's type;
    ValueError naming the item for a field TrainConfig does not have or a value it cannot take."""
    import typing

    from peftbooth.config.sections import TrainConfig

    cfg, out = TrainConfig(), {}
    for item in items:
        key, sep, value = item.partition("=")
        section, _, name = key.partition(".")
        if not sep or not hasattr(getattr(cfg, section, None), name):
            raise ValueError(f"{item}: expected SECTION.FIELD=VALUE with a field of the train config, "
                             "e.g. data.prior_loss_weight=1")
        kind = typing.get_type_hints(type(getattr(cfg, section)))[name]
        optional = type(None) in typing.get_args(kind)
        if optional:  # Optional[X]: 'none' leaves it unset (data.class_data_dir=none), else an X
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        if optional and value.lower() == "none":
            out[key] = None
        elif kind is bool:
            out[key] = value.lower() in ("1", "true", "yes")
        elif kind in (int, float):
            try:
                out[key] = kind(value)
            except ValueError:
                raise ValueError(f"{item}: {value!r} is not a {kind.__name__}") from None
        else:
            out[key] = value
    return out


def run_label(row: dict) -> str:
    """The folder of a row's samples under --save-images: base, lora-seed0, lora-seed0-prior0-te1 (ablations)."""
    if row["adapter"] == "base":
        return "base"
    extra = "" if row["prior_preservation"] and row["text_encoder"] else \
        f"-prior{int(row['prior_preservation'])}-te{int(row['text_encoder'])}"
    return f"{row['adapter']}-seed{row['seed']}{extra}"


def rescore(rows: list[dict], images: Path) -> list[dict]:
    """The rows' metrics again, from the samples a --save-images run kept, with the world's current judge and
    evaluator: a new judge is measured on the same images, no run retrained. The photos are not kept, so
    subject_similarity stays as measured."""
    from PIL import Image

    from peftbooth.world import MODEL_DIR
    from peftbooth.world.metrics import WorldEvalSettings, load_instruments, world_metrics
    from peftbooth.world.subjects import by_name

    instruments = load_instruments(MODEL_DIR)
    out = []
    for r in rows:
        folder = images / r["subject"] / run_label(r)
        held = by_name(r["subject"]).prompt(by_name(r["subject"]).held_out_contexts[0])
        num_images = len(list(folder.glob(f"{held.replace(' ', '_')}_*.png")))
        if not num_images:
            raise SystemExit(f"--rescore: no samples of {r['subject']} / {run_label(r)} in {images}")

        def saved(prompt: str, seeds: list[int], folder=folder) -> list:
            return [Image.open(folder / f"{prompt.replace(' ', '_')}_{i}.png").convert("RGB")
                    for i in range(len(seeds))]

        settings = WorldEvalSettings(num_images=num_images, in_context=True, subject=r["subject"])
        metrics, _ = world_metrics(saved, instruments, [], settings)
        out.append({**r, **{k: v for k, v in metrics.items() if k != "subject_similarity"}})
    return out


def spread(values: list[float]) -> str:
    import statistics

    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.mean(values):.2f} ± {statistics.pstdev(values):.2f}"


def summarize(rows: list[dict]) -> str:
    """Per subject and adapter (mean ± spread over seeds), then per adapter over every subject and seed."""
    head = "| subject | adapter | runs | " + " | ".join(COLUMNS) + " |"
    out = [head, "|---" * (len(COLUMNS) + 3) + "|"]
    groups: dict = {}
    for r in rows:
        if r["adapter"] == "base" or (r["prior_preservation"] and r["text_encoder"]):
            groups.setdefault((r["subject"], r["adapter"]), []).append(r)
    for (subject, adapter), group in groups.items():
        out.append(f"| {subject} | {adapter} | {len(group)} | "
                   + " | ".join(spread([r[c] for r in group]) for c in COLUMNS) + " |")
    out += ["", "| adapter | subjects | runs | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 3) + "|"]
    for adapter in dict.fromkeys(a for _, a in groups):
        group = [r for (s, a), g in groups.items() if a == adapter for r in g]
        subjects = len({r["subject"] for r in group})
        out.append(f"| {adapter} | {subjects} | {len(group)} | "
                   + " | ".join(spread([r[c] for r in group]) for c in COLUMNS) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
