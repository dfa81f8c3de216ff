"""`peftbooth eval` on a run folder: the paper's prompts through the run's adapter (and the base model, same
seeds, so the two rows of the table differ only by the adapter), scored by DINO, CLIP-I and CLIP-T.

Real-vs-real similarity (distinct pairs) is reported as a reference ceiling for DINO and CLIP-I. Settings left
unset come from the run's config.yaml (base model, photos, resolution, identifier).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from ..config.checks import range_problem
from ..config.sections import UsageError, option
from ..runs.atomic import write_json, write_text
from ..runs.rundir import EVAL_METRICS_FILE, RunDir, base_model_for
from .evaluators import Evaluators
from .protocol import (
    CLIP_T_PROMPTS,
    DEFAULT_CLIP,
    DEFAULT_DINO,
    OBJECT_PROMPTS,
    clip_t_text,
    distinct_pairs_mean_cosine,
    identifier_from_prompt,
    metrics_from_embeddings,
    protocol_templates,
    render,
)

# ---------------------------------------------------------------------------------------------------------------
# peftbooth eval


@dataclass
class EvalArgs:
    """The settings of one evaluation, and the `eval` subcommand's flags (one per field, see peftbooth.config.flags).
    A run on the world model takes only num_images, seed, num_inference_steps, guidance_scale, guidance_cutoff,
    baseline and world_subject, and its own defaults for those left unset (world.metrics.WorldEvalSettings)."""

    run_dir: str = option(None, "run folder written by 'peftbooth train'", positional=True, metavar="RUN_DIR")
    class_name: Optional[str] = option(None, "class noun of the subject, e.g. dog (required, except for a run on "
                                       "the world model)")
    instance_data_dir: Optional[str] = option(None, "the real photos of the subject (default: the run's "
                                              "--instance-data-dir)")
    live: bool = option(False, "live-subject prompt list (animals, people) instead of objects")
    identifier: Optional[str] = option(None, "unique token (default: the word before --class-name in the run's "
                                       "instance prompt)")
    model: Optional[str] = option(None, "base model (default: the one in RUN_DIR/config.yaml)")
    num_images: int = option(4, "images per prompt (default: 4, the paper's; world runs: 8)")
    seed: int = option(0, "prompt j is sampled from seed SEED + j (adapter and base alike)")
    num_inference_steps: int = option(25, "denoising steps, DPM-Solver++ (default: 25; world: 20)",
                                      aliases=("--steps",))
    guidance_scale: float = option(7.5, "default: 7.5; world runs: 5.0")
    guidance_cutoff: float = option(1.0, "the share of the denoising steps that are guided, from the first "
                                    "(default: 1.0, all; world runs: the world's)")
    resolution: Optional[int] = option(None, "image size (default: the training resolution)")
    baseline: bool = option(True, "also evaluate the base model without the adapter, same seeds (--no-baseline "
                            "skips it)")
    clip_model: str = option(DEFAULT_CLIP, "CLIP for CLIP-I and CLIP-T: hub id or local folder")
    dino_model: str = option(DEFAULT_DINO, "DINO ViT for the DINO score: hub id or local folder")
    clip_t_prompt: str = option("class", "text CLIP-T compares with: 'class' = prompt without the identifier "
                                "(default), 'full'", choices=CLIP_T_PROMPTS)
    max_prompts: Optional[int] = option(None, "only the first K prompts (a quick look, not the protocol)")
    output_dir: Optional[str] = option(None, "where metrics.json and the images go (default: RUN_DIR/eval)")
    device: Optional[str] = option(None, "cuda | cpu (default: cuda when available)")
    world_subject: Optional[str] = option(None, "world runs: the family subject its photos show, e.g. "
                                          "box-halves-pink-teal (docs/world.md; default: the ball, "
                                          "ball-halves-magenta-cyan)")


def resolve_eval_args(a: EvalArgs) -> tuple[EvalArgs, list]:
    """Fill the defaults from the run's config.yaml and check every input; return (args, real images)."""
    from dataclasses import replace

    from ..data.images import list_images, load_image

    run = RunDir(a.run_dir)
    run.adapter_folders("RUN_DIR")
    data_cfg = run.read_config(strict=True).get("data") or {}
    a = replace(a, model=base_model_for(a.model, [run.path], "RUN_DIR"),
                instance_data_dir=a.instance_data_dir or data_cfg.get("instance_data_dir"),
                resolution=a.resolution or data_cfg.get("resolution"))
    if not a.instance_data_dir:
        raise UsageError("--instance-data-dir is required: the real photos of the subject")
    if not (a.class_name or "").strip():
        raise UsageError("--class-name is required (and not empty) for the DreamBooth protocol, e.g. --class-name dog")
    identifier = a.identifier or identifier_from_prompt(data_cfg.get("instance_prompt"), a.class_name)
    if not identifier:
        raise UsageError(f"--identifier is required: the run's instance prompt "
                         f"{data_cfg.get('instance_prompt')!r} has no word before {a.class_name!r}")
    a = replace(a, identifier=identifier)
    for flag, value in [("--num-images", a.num_images), ("--num-inference-steps", a.num_inference_steps)]:
        if value < 1:
            raise UsageError(f"{flag} must be >= 1 (got {value})")
    check_guidance_cutoff(a.guidance_cutoff)
    if a.resolution is not None and (a.resolution <= 0 or a.resolution % 8):
        raise UsageError(f"--resolution must be a positive multiple of 8 (got {a.resolution})")
    if a.max_prompts is not None and a.max_prompts < 1:
        raise UsageError(f"--max-prompts must be >= 1 (got {a.max_prompts})")
    clip_t_text(OBJECT_PROMPTS[0], identifier, a.class_name, a.clip_t_prompt)  # checks the mode
    paths = list_images(a.instance_data_dir, "--instance-data-dir")
    if not paths:
        raise UsageError(f"--instance-data-dir {a.instance_data_dir}: no images (jpg, jpeg, png, webp) found")
    return a, [load_image(p) for p in paths]


def check_guidance_cutoff(value: float) -> None:
    """--guidance-cutoff must be a share of the steps: UsageError naming the flag otherwise."""
    problem = range_problem("--guidance-cutoff", "guidance_cutoff", value, 0.0, 1.0)
    if problem:
        raise UsageError(problem)


def generate_protocol_images(pipe, prompts: list[str], num_images: int, seed: int, steps: int,
                             guidance_scale: float, resolution: int | None, guidance_cutoff: float = 1.0
                             ) -> list[list]:
    """images[j][i]: prompts[j] from seed `seed + i`, through the sampler class images and validation use (one
    CPU generator per image: the same starting noise for adapter and base, on any device)."""
    import torch

    from ..inference.sampling import image_seeds, sample_images

    with torch.inference_mode():
        return [sample_images(pipe.pipe, p, image_seeds(seed, num_images), steps, guidance_scale, resolution,
                              guidance_cutoff=guidance_cutoff) for p in prompts]


def contact_sheet(rows: list[list], thumb: int = 128):
    """First image of every prompt in one strip of thumbnails, for the report."""
    from PIL import Image

    firsts = [r[0].resize((thumb, thumb)) for r in rows]
    cols = min(len(firsts), 5)
    sheet = Image.new("RGB", (cols * thumb, -(-len(firsts) // cols) * thumb), "white")
    for k, img in enumerate(firsts):
        sheet.paste(img, ((k % cols) * thumb, (k // cols) * thumb))
    return sheet


def evaluate_run(args: EvalArgs) -> dict:
    """Run the protocol on a run folder (and on the base model); write metrics.json, metrics.md, images."""
    from diffusers import DPMSolverMultistepScheduler

    from ..inference.pipeline import AdapterPipeline

    a, real = resolve_eval_args(args)
    out = Path(a.output_dir) if a.output_dir else RunDir(a.run_dir).eval_dir
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out}: is a file")
    templates = list(protocol_templates(a.live))[: a.max_prompts]
    prompts = [render(t, a.identifier, a.class_name) for t in templates]
    texts = [clip_t_text(t, a.identifier, a.class_name, a.clip_t_prompt) for t in templates]

    ev = Evaluators.load(a.clip_model, a.dino_model, a.device)  # before generating: a missing model fails fast
    # the VAE the run trained with (--vae), e.g. an fp16-safe SDXL VAE
    vae = RunDir(a.run_dir).setting("model", "vae", strict=True)
    pipe = AdapterPipeline(a.model, device=a.device, vae=vae)
    # DPM-Solver++: the scheduler class prior.py and validation use; the model's own may need 50+ steps
    pipe.pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.pipe.scheduler.config)
    pipe.load_adapter(a.run_dir, "adapter")
    variants = [("adapter", {"adapter": 1.0})] + ([("base", {})] if a.baseline else [])

    real_dino, real_clip = ev.dino_embed(real), ev.clip_image(real)
    text_clip = ev.clip_text(texts)
    results, per_prompt = {}, {}
    for name, weights in variants:
        pipe.set_adapters(weights)
        rows = generate_protocol_images(pipe, prompts, a.num_images, a.seed, a.num_inference_steps, a.guidance_scale,
                                        a.resolution, a.guidance_cutoff)
        folder = out / "images" / name
        folder.mkdir(parents=True, exist_ok=True)
        for j, row in enumerate(rows):
            for i, img in enumerate(row):
                img.save(folder / f"prompt{j:02d}_{i:02d}.png")
        contact_sheet(rows).save(out / f"{name}_sheet.png")
        flat = [img for row in rows for img in row]
        gen_dino, gen_clip = ev.dino_embed(flat), ev.clip_image(flat)
        per_text = text_clip.repeat_interleave(a.num_images, dim=0)  # image i of prompt j <-> text j
        results[name] = metrics_from_embeddings(gen_dino, gen_clip, per_text, real_dino, real_clip)
        per_prompt[name] = []
        for j, prompt in enumerate(prompts):
            s = slice(j * a.num_images, (j + 1) * a.num_images)
            per_prompt[name].append({"prompt": prompt, "clip_t_text": texts[j], **metrics_from_embeddings(
                gen_dino[s], gen_clip[s], per_text[s], real_dino, real_clip)})
    results["real"] = {"dino": distinct_pairs_mean_cosine(real_dino), "clip_i": distinct_pairs_mean_cosine(real_clip),
                       "clip_t": None}
    report = {
        "protocol": "dreambooth",
        "subject": "live" if a.live else "object",
        "protocol_complete": len(templates) == 25,
        "adapter_fingerprint": RunDir(a.run_dir).adapter_fingerprint(),
        "args": asdict(a),
        "num_prompts": len(prompts),
        "num_real_images": len(real),
        "evaluators": ev.names,
        "clip_t_prompt": a.clip_t_prompt,
        "results": results,
        "per_prompt": per_prompt,
    }
    write_json(out / EVAL_METRICS_FILE, report)
    write_text(out / "metrics.md", format_table(report) + "\n")
    return report


def format_table(report: dict) -> str:
    """The paper's table: one row per model (adapter, base) plus real-vs-real, columns DINO, CLIP-I, CLIP-T."""
    def cell(v):
        return "-" if v is None else f"{v:.3f}"

    labels = {"adapter": "adapter", "base": "base model (no adapter)", "real": "real images (reference)"}
    lines = ["| model | DINO | CLIP-I | CLIP-T |", "|---|---|---|---|"]
    for name, m in report["results"].items():
        lines.append(f"| {labels.get(name, name)} | {cell(m['dino'])} | {cell(m['clip_i'])} | {cell(m['clip_t'])} |")
    return "\n".join(lines)

