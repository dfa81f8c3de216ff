"""Did it work? The DreamBooth evaluation protocol, and two offline proxies computed at the end of training.

Protocol (``peftbooth eval RUN_DIR``), as in the DreamBooth paper (Ruiz et al., 2023, section 4.1):

* the paper's 25 prompts (object list, or the live-subject list with ``--live``), N images each (4 by default);
* DINO: mean cosine similarity of the ViT-S/16 DINO embeddings (the CLS token) over every generated x real pair;
* CLIP-I: the same with CLIP image embeddings;
* CLIP-T: mean cosine similarity of each generated image with its prompt's CLIP text embedding. By default the
  prompt is compared *without* the identifier ("a dog in the jungle", not "a sks dog in the jungle"): the
  identifier is a rare token that means nothing to CLIP, so keeping it would only add noise to what CLIP-T is
  meant to measure, whether the image follows the prompt's context. ``--clip-t-prompt full`` keeps it.

The same seeds are used for the adapter and for the base model without it (``--no-baseline`` skips the base), so
the two rows of the table differ only by the adapter. Real-vs-real similarity (distinct pairs) is reported as a
reference ceiling for DINO and CLIP-I.

Offline proxies (no evaluator model; ``write_proxies(run)`` at the end of training -> ``OUTPUT/proxies.json``):

* instance loss: the denoising loss of the instance images under their prompts, before (adapters disabled, which
  is the model before training: every adapter starts as a zero update) and after, on fixed noise and timesteps;
* class drift: how far the adapted model's predictions for class images under the class prompt moved from the
  base model's, on the same fixed noise and timesteps. Compare it between a run with and one without prior
  preservation; its size on one random model says nothing by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import UsageError
from .world import is_world_model

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_DINO = "facebook/dino-vits16"
EVAL_DIR = "eval"
PROXIES_FILE = "proxies.json"

# The DreamBooth paper's evaluation prompts (github.com/google/dreambooth, dataset/prompts_and_classes.txt):
# {0} is the unique identifier ("sks"), {1} the class noun ("dog"): 'a {0} {1} in the jungle' -> 'a sks dog in
# the jungle'. Kept in the published form so they can be checked against the source line by line.
_SHARED_PROMPTS = (
    "a {0} {1} in the jungle",
    "a {0} {1} in the snow",
    "a {0} {1} on the beach",
    "a {0} {1} on a cobblestone street",
    "a {0} {1} on top of pink fabric",
    "a {0} {1} on top of a wooden floor",
    "a {0} {1} with a city in the background",
    "a {0} {1} with a mountain in the background",
    "a {0} {1} with a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest",
)
_PROPERTY_PROMPTS = (
    "a red {0} {1}",
    "a purple {0} {1}",
    "a shiny {0} {1}",
    "a wet {0} {1}",
    "a cube shaped {0} {1}",
)
OBJECT_PROMPTS = _SHARED_PROMPTS + (
    "a {0} {1} with a wheat field in the background",
    "a {0} {1} with a tree and autumn leaves in the background",
    "a {0} {1} with the Eiffel Tower in the background",
    "a {0} {1} floating on top of water",
    "a {0} {1} floating in an ocean of milk",
    "a {0} {1} on top of green grass with sunflowers around it",
    "a {0} {1} on top of a mirror",
    "a {0} {1} on top of the sidewalk in a crowded street",
    "a {0} {1} on top of a dirt road",
    "a {0} {1} on top of a white rug",
) + _PROPERTY_PROMPTS
LIVE_PROMPTS = _SHARED_PROMPTS + (
    "a {0} {1} wearing a red hat",
    "a {0} {1} wearing a santa hat",
    "a {0} {1} wearing a rainbow scarf",
    "a {0} {1} wearing a black top hat and a monocle",
    "a {0} {1} in a chef outfit",
    "a {0} {1} in a firefighter outfit",
    "a {0} {1} in a police outfit",
    "a {0} {1} wearing pink glasses",
    "a {0} {1} wearing a yellow shirt",
    "a {0} {1} in a purple wizard outfit",
) + _PROPERTY_PROMPTS

CLIP_T_PROMPTS = ("class", "full")  # class: identifier removed (default); full: the prompt as generated


# ---------------------------------------------------------------------------------------------------------------
# prompts


def render(template: str, identifier: str, class_name: str) -> str:
    """Fill a protocol template; an empty identifier leaves no double space ('a {0} {1}' -> 'a dog')."""
    return " ".join(template.format(identifier, class_name).split())


def protocol_templates(live: bool) -> tuple[str, ...]:
    return LIVE_PROMPTS if live else OBJECT_PROMPTS


def clip_t_text(template: str, identifier: str, class_name: str, mode: str = "class") -> str:
    """The text CLIP-T compares an image with: the prompt without the identifier ('class') or as generated."""
    if mode not in CLIP_T_PROMPTS:
        raise UsageError(f"--clip-t-prompt must be one of {', '.join(CLIP_T_PROMPTS)} (got {mode!r})")
    return render(template, identifier if mode == "full" else "", class_name)


def identifier_from_prompt(instance_prompt: str, class_name: str) -> str | None:
    """The word right before the class noun in the instance prompt: 'a photo of sks dog' + 'dog' -> 'sks'."""
    match = re.search(r"(\S+)\s+" + re.escape(class_name) + r"\b", instance_prompt or "")
    return match.group(1) if match else None


# ---------------------------------------------------------------------------------------------------------------
# metrics: pure functions of embeddings


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D), (M, D) -> (N, M) cosine similarities."""
    return F.normalize(a.double(), dim=-1) @ F.normalize(b.double(), dim=-1).T


def pairwise_mean_cosine(generated: torch.Tensor, real: torch.Tensor) -> float:
    """DINO / CLIP-I: the mean cosine similarity over all generated x real pairs."""
    return float(cosine_matrix(generated, real).mean())


def matched_mean_cosine(images: torch.Tensor, texts: torch.Tensor) -> float:
    """CLIP-T: the mean over rows of cos(image_i, text_i), each image with its own prompt."""
    return float((F.normalize(images.double(), dim=-1) * F.normalize(texts.double(), dim=-1)).sum(-1).mean())


def distinct_pairs_mean_cosine(x: torch.Tensor) -> float | None:
    """Mean cosine over pairs of different rows (real vs real: the reference ceiling); None for one row."""
    n = x.shape[0]
    if n < 2:
        return None
    sims = cosine_matrix(x, x)
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


# ---------------------------------------------------------------------------------------------------------------
# evaluator models


def _features(output) -> torch.Tensor:
    """transformers < 5 return the projected embeddings; 5.x return an output whose pooler_output holds them."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _load(flag: str, what: str, loader, *args, **kwargs):
    try:
        return loader(*args, **kwargs)
    except (OSError, ValueError) as e:  # not cached and offline, not found, or not that kind of model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{flag} {what}: could not load ({first[:300]}); pass a local model folder, or a hub id "
                         "that is in the Hugging Face cache or reachable") from e


@dataclass
class Evaluators:
    """CLIP (image + text towers) and DINO, each from a hub id or a local folder."""

    clip: torch.nn.Module
    clip_processor: object
    clip_tokenizer: object
    dino: torch.nn.Module
    dino_processor: object
    device: torch.device
    names: dict = field(default_factory=dict)
    batch_size: int = 32

    @classmethod
    def load(cls, clip: str = DEFAULT_CLIP, dino: str = DEFAULT_DINO, device: str | torch.device | None = None
             ) -> "Evaluators":
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel, ViTModel

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        clip_model = _load("--clip-model", clip, CLIPModel.from_pretrained, clip)
        clip_processor = _load("--clip-model", clip, AutoImageProcessor.from_pretrained, clip)
        clip_tokenizer = _load("--clip-model", clip, AutoTokenizer.from_pretrained, clip)
        config = _load("--dino-model", dino, AutoConfig.from_pretrained, dino)
        if config.model_type == "vit":
            # DINO checkpoints have no pooler weights: without this a randomly initialised pooler would be built
            dino_model = _load("--dino-model", dino, ViTModel.from_pretrained, dino, add_pooling_layer=False)
        else:  # e.g. a DINOv2 checkpoint: the CLS token is read the same way
            dino_model = _load("--dino-model", dino, AutoModel.from_pretrained, dino)
        dino_processor = _load("--dino-model", dino, AutoImageProcessor.from_pretrained, dino)
        for m in (clip_model, dino_model):
            m.to(device).eval().requires_grad_(False)
        return cls(clip_model, clip_processor, clip_tokenizer, dino_model, dino_processor, device,
                   {"clip": clip, "dino": dino})

    def _batches(self, items):
        for start in range(0, len(items), self.batch_size):
            yield items[start : start + self.batch_size]

    @torch.no_grad()
    def clip_image(self, images: list) -> torch.Tensor:
        out = []
        for batch in self._batches(images):
            pixels = self.clip_processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            out.append(_features(self.clip.get_image_features(pixel_values=pixels)).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def clip_text(self, texts: list[str]) -> torch.Tensor:
        out = []
        for batch in self._batches(texts):
            tokens = self.clip_tokenizer(batch, padding=True, truncation=True, return_tensors="pt").to(self.device)
            out.append(_features(self.clip.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def dino_embed(self, images: list) -> torch.Tensor:
        """The CLS token of the last layer: DINO's image embedding."""
        out = []
        for batch in self._batches(images):
            pixels = self.dino_processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            out.append(self.dino(pixel_values=pixels).last_hidden_state[:, 0].float().cpu())
        return torch.cat(out)


def protocol_metrics(ev: Evaluators, generated: list, real: list, texts: list[str]) -> dict:
    """{'dino', 'clip_i', 'clip_t'} of generated images against real images and (image i <-> texts[i])."""
    if len(texts) != len(generated):
        raise ValueError(f"{len(generated)} generated images but {len(texts)} texts")
    real_dino, real_clip = ev.dino_embed(real), ev.clip_image(real)
    return metrics_from_embeddings(ev.dino_embed(generated), ev.clip_image(generated), ev.clip_text(texts),
                                   real_dino, real_clip)


def metrics_from_embeddings(gen_dino, gen_clip, text_clip, real_dino, real_clip) -> dict:
    return {
        "dino": pairwise_mean_cosine(gen_dino, real_dino),
        "clip_i": pairwise_mean_cosine(gen_clip, real_clip),
        "clip_t": matched_mean_cosine(gen_clip, text_clip),
    }


# ---------------------------------------------------------------------------------------------------------------
# peftbooth eval


@dataclass
class EvalArgs:
    run_dir: str
    class_name: str
    instance_data_dir: str | None = None  # default: the run's own --instance-data-dir
    live: bool = False
    identifier: str | None = None  # default: the word before the class noun in the run's instance prompt
    model: str | None = None  # default: the run's base model
    num_images: int = 4
    seed: int = 0
    steps: int = 25
    guidance_scale: float = 7.5
    resolution: int | None = None  # default: the run's training resolution
    baseline: bool = True
    clip_model: str = DEFAULT_CLIP
    dino_model: str = DEFAULT_DINO
    clip_t_prompt: str = "class"
    max_prompts: int | None = None  # the first K prompts only: a quick look, not the protocol
    output_dir: str | None = None  # default: RUN_DIR/eval
    device: str | None = None


def adapter_fingerprint(run_dir: str | Path) -> str | None:
    """sha256 (16 hex) of the run's adapter weights: ties eval results to the adapter they were computed for."""
    h, found = hashlib.sha256(), False
    for part in ("unet", "text_encoder", "text_encoder_2"):
        f = Path(run_dir) / part / "adapter_model.safetensors"
        if f.is_file():
            h.update(part.encode())
            h.update(f.read_bytes())
            found = True
    return h.hexdigest()[:16] if found else None


def read_run_config(run_dir: Path) -> dict:
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"RUN_DIR {run_dir}: config.yaml is not valid YAML ({str(e).splitlines()[0]})") from e


def resolve_eval_args(a: EvalArgs) -> tuple[EvalArgs, list]:
    """Fill the defaults from the run's config.yaml and check every input; return (args, real images)."""
    from dataclasses import replace

    from .data import list_images, load_image
    from .inference import adapter_folders

    run = Path(a.run_dir)
    adapter_folders(run, "RUN_DIR")
    cfg = read_run_config(run)
    data_cfg = cfg.get("data") or {}
    from .inference import base_model_for

    a = replace(a, model=base_model_for(a.model, [run], "RUN_DIR"),
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
    for flag, value in [("--num-images", a.num_images), ("--steps", a.steps)]:
        if value < 1:
            raise UsageError(f"{flag} must be >= 1 (got {value})")
    if a.resolution is not None and (a.resolution <= 0 or a.resolution % 8):
        raise UsageError(f"--resolution must be a positive multiple of 8 (got {a.resolution})")
    if a.max_prompts is not None and a.max_prompts < 1:
        raise UsageError(f"--max-prompts must be >= 1 (got {a.max_prompts})")
    clip_t_text(OBJECT_PROMPTS[0], identifier, a.class_name, a.clip_t_prompt)  # checks the mode
    paths = list_images(a.instance_data_dir, "--instance-data-dir")
    if not paths:
        raise UsageError(f"--instance-data-dir {a.instance_data_dir}: no images (jpg, jpeg, png, webp) found")
    return a, [load_image(p) for p in paths]


def generate_protocol_images(pipe, prompts: list[str], num_images: int, seed: int, steps: int,
                             guidance_scale: float, resolution: int | None) -> list[list]:
    """images[j]: `num_images` images of prompts[j], from seed `seed + j` (the same for adapter and base)."""
    return [pipe.generate(p, num_images, seed=seed + j, steps=steps, guidance_scale=guidance_scale,
                          height=resolution, width=resolution) for j, p in enumerate(prompts)]


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

    from .inference import AdapterPipeline

    a, real = resolve_eval_args(args)
    out = Path(a.output_dir) if a.output_dir else Path(a.run_dir) / EVAL_DIR
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out}: is a file")
    templates = list(protocol_templates(a.live))[: a.max_prompts]
    prompts = [render(t, a.identifier, a.class_name) for t in templates]
    texts = [clip_t_text(t, a.identifier, a.class_name, a.clip_t_prompt) for t in templates]

    ev = Evaluators.load(a.clip_model, a.dino_model, a.device)  # before generating: a missing model fails fast
    # the VAE the run trained with (--vae), e.g. an fp16-safe SDXL VAE
    vae = (read_run_config(Path(a.run_dir)).get("model") or {}).get("vae")
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
        rows = generate_protocol_images(pipe, prompts, a.num_images, a.seed, a.steps, a.guidance_scale,
                                        a.resolution)
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
        "adapter_fingerprint": adapter_fingerprint(a.run_dir),
        "args": asdict(a),
        "num_prompts": len(prompts),
        "num_real_images": len(real),
        "evaluators": ev.names,
        "clip_t_prompt": a.clip_t_prompt,
        "results": results,
        "per_prompt": per_prompt,
    }
    write_json(out / "metrics.json", report)
    (out / "metrics.md").write_text(format_table(report) + "\n")
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


def write_json(path: Path, data: dict) -> None:
    """Atomic JSON write; NaN/inf become null so the file stays valid JSON for browsers and jq."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(clean(data), indent=1))
    os.replace(tmp, path)


def cmd_eval(args) -> int:
    if is_world_model(base_model_of_run(args.run_dir, args.model)):
        return cmd_eval_world(args)
    names = {f.name for f in dataclasses.fields(EvalArgs)}
    # flags left unset keep EvalArgs' defaults (the paper's settings)
    report = evaluate_run(EvalArgs(**{k: v for k, v in vars(args).items() if k in names and v is not None}))
    out = Path(args.output_dir) if args.output_dir else Path(args.run_dir) / EVAL_DIR
    print(format_table(report))
    note = "" if report["protocol_complete"] else f" (first {report['num_prompts']} prompts only: not the protocol)"
    print(f"metrics written to {out / 'metrics.json'}{note}")
    from .report import has_training_stats, write_report

    if has_training_stats(args.run_dir) and not args.output_dir:
        print(f"report updated: {write_report(args.run_dir)}")
    return 0


def base_model_of_run(run_dir: str, model: str | None) -> str | None:
    """--model, else the base model in RUN_DIR/config.yaml (None when neither names one)."""
    return model or (read_run_config(Path(run_dir)).get("model") or {}).get("model")


def cmd_eval_world(args) -> int:
    """A run on the world model: the world's evaluator measures what DINO and CLIP measure for real photos."""
    from .inference import adapter_folders
    from .world.metrics import WorldEvalSettings, evaluate_world_run, format_world_table

    run = Path(args.run_dir)
    adapter_folders(run, "RUN_DIR")
    given = {k: getattr(args, k) for k in ("num_images", "seed", "steps", "guidance_scale")
             if getattr(args, k) is not None}
    settings = WorldEvalSettings(**given)  # unset flags: the world's own defaults
    for flag, value in [("--num-images", settings.num_images), ("--steps", settings.steps)]:
        if value < 1:
            raise UsageError(f"{flag} must be >= 1 (got {value})")
    out = Path(args.output_dir) if args.output_dir else run / EVAL_DIR
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out}: is a file")
    print("base model: world (the world's evaluator stands in for DINO and CLIP; see docs/world.md)")
    report = evaluate_world_run(run, read_run_config(run), out, settings, args.baseline, adapter_fingerprint(run))
    print(format_world_table(report["results"]))
    print(f"metrics written to {out / 'world_metrics.json'}")
    from .report import has_training_stats, write_report

    if has_training_stats(args.run_dir) and not args.output_dir:
        print(f"report updated: {write_report(args.run_dir)}")
    return 0


def add_commands(subparsers) -> None:
    """Add the `eval` subcommand to the main CLI's subparsers."""
    p = subparsers.add_parser("eval", help="DreamBooth protocol: DINO, CLIP-I, CLIP-T of a run (and of the base model)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by 'peftbooth train'")
    p.add_argument("--instance-data-dir", default=None,
                   help="the real photos of the subject (default: the run's --instance-data-dir)")
    p.add_argument("--class-name", default=None,
                   help="class noun of the subject, e.g. dog (required, except for a run on the world model)")
    p.add_argument("--live", action="store_true", help="live-subject prompt list (animals, people) instead of objects")
    p.add_argument("--identifier", default=None,
                   help="unique token (default: the word before --class-name in the run's instance prompt)")
    p.add_argument("--model", default=None, help="base model (default: the one in RUN_DIR/config.yaml)")
    p.add_argument("--num-images", type=int, default=None,
                   help="images per prompt (default: 4, the paper's; world runs: 8)")
    p.add_argument("--seed", type=int, default=0,
                   help="prompt j is sampled from seed SEED + j (adapter and base alike)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps, DPM-Solver++ (default: 25; world: 20)")
    p.add_argument("--guidance-scale", type=float, default=None, help="default: 7.5; world runs: 5.0")
    p.add_argument("--resolution", type=int, default=None, help="image size (default: the training resolution)")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also evaluate the base model without the adapter, same seeds (--no-baseline skips it)")
    p.add_argument("--clip-model", default=DEFAULT_CLIP, help="CLIP for CLIP-I and CLIP-T: hub id or local folder")
    p.add_argument("--dino-model", default=DEFAULT_DINO, help="DINO ViT for the DINO score: hub id or local folder")
    p.add_argument("--clip-t-prompt", choices=CLIP_T_PROMPTS, default="class",
                   help="text CLIP-T compares with: 'class' = prompt without the identifier (default), 'full'")
    p.add_argument("--max-prompts", type=int, default=None, help="only the first K prompts (a quick look)")
    p.add_argument("--output-dir", default=None, help="where metrics.json and the images go (default: RUN_DIR/eval)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.set_defaults(func=cmd_eval)


# ---------------------------------------------------------------------------------------------------------------
# offline proxies (end of training)


def fixed_timesteps(num_train_timesteps: int, k: int) -> list[int]:
    """k timesteps at the centres of k equal bins of [0, T): every noise level gets the same weight."""
    return [(2 * i + 1) * num_train_timesteps // (2 * k) for i in range(k)]


def fixed_noise(k: int, shape: tuple, seed: int) -> torch.Tensor:
    """(k, *shape) standard normal noise from a CPU generator: identical on every device and in every call."""
    return torch.randn((k, *shape), generator=torch.Generator("cpu").manual_seed(seed))


@torch.no_grad()
def predictions(unet, scheduler, latents: torch.Tensor, context: torch.Tensor, timesteps: list[int],
                noise: torch.Tensor, added: dict | None = None, chunk: int = 8
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(predictions, targets) per fixed timestep, fp32 on the latents' device. latents (N, 4, h, w); `added`:
    SDXL's added_cond_kwargs, each (N, ...)."""
    from .losses import diffusion_target

    def rows(s):
        return None if added is None else {k: v[s : s + chunk] for k, v in added.items()}

    preds, targets = [], []
    for k, t in enumerate(timesteps):
        tt = torch.full((latents.shape[0],), t, device=latents.device, dtype=torch.long)
        eps = noise[k].to(latents.device, latents.dtype)
        noisy = scheduler.add_noise(latents, eps, tt)
        # in chunks: a folder of 20 photos at 768 px is one UNet batch too many on a small GPU
        preds.append(torch.cat([unet(noisy[s : s + chunk], tt[s : s + chunk], context[s : s + chunk],
                                     added_cond_kwargs=rows(s)).sample.float()
                                for s in range(0, latents.shape[0], chunk)]))
        targets.append(diffusion_target(scheduler, latents, eps, tt).float())
    return preds, targets


def mse_per_timestep(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[float]:
    return [float(F.mse_loss(x, y)) for x, y in zip(a, b)]


def mean_square(a: list[torch.Tensor]) -> float:
    return float(torch.stack([x.pow(2).mean() for x in a]).mean())


def _peft_handle(accelerator, module):
    """The PeftModel under Accelerate's and torch.compile's wrappers (for disable_adapter)."""
    module = accelerator.unwrap_model(module)
    return getattr(module, "_orig_mod", module)


@contextlib.contextmanager
def adapters_disabled(*peft_models):
    with contextlib.ExitStack() as stack:
        for m in peft_models:
            if m is not None and hasattr(m, "disable_adapter"):
                stack.enter_context(m.disable_adapter())
        yield


def _latents(vae, images: list, resolution: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior means (not samples: the proxy must not depend on a random draw), scaled for the UNet, and
    each center crop's SDXL time ids (N, 6)."""
    from .data import ORIGINAL_SIZE, micro_conditioning, resize_crop_coords, to_tensor

    pixels, time_ids = [], []
    for img in images:
        crop, top_left = resize_crop_coords(img, resolution, True, False)
        pixels.append(to_tensor(crop))
        time_ids.append(micro_conditioning(img.info.get(ORIGINAL_SIZE, img.size), top_left, resolution))
    pixels = torch.stack(pixels)
    vae_dtype = next(vae.parameters()).dtype  # fp32 for SDXL's own VAE
    means = [vae.encode(pixels[s : s + 8].to(device, vae_dtype)).latent_dist.mean for s in range(0, len(images), 8)]
    return (torch.cat(means) * float(vae.config.scaling_factor)).to(dtype), torch.stack(time_ids).to(device)


def _context(components, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context, pooled) of prompts through the text encoders as they are now (adapters included)."""
    from .data import tokenize
    from .models import encode_text

    return encode_text(components.text_encoders, [tokenize(tok, prompts).to(device) for tok in components.tokenizers])


def class_images_for(cfg, output_dir: Path, limit: int) -> list[Path]:
    """Readable class images of the run (its --class-data-dir, else OUTPUT/class_images), first `limit`."""
    from .prior import valid_class_images

    folder = Path(cfg.data.class_data_dir) if cfg.data.class_data_dir else Path(output_dir) / "class_images"
    if not folder.is_dir():
        return []
    return valid_class_images(folder)[0][:limit]  # a corrupt file left by a crash is skipped, as in training


def compute_proxies(run, num_timesteps: int = 10, max_class_images: int = 8, seed: int | None = None) -> dict:
    """Instance loss before/after and class drift of a trained run (train.Run), on fixed noise and timesteps.

    "Before" is the model with its adapters disabled, which is the model before training: LoRA, LoHa and LoKr
    all start as a zero update. Class drift needs a class prompt and class images (the run's class-image folder);
    for a run without prior preservation give it --class-prompt and --class-data-dir to measure it too.
    """
    from .data import load_image
    from .models import added_conditioning, vae_in_own_dtype
    from .validation import eval_mode, on_device, untouched_rng

    cfg, acc, c = run.cfg, run.accelerator, run.components
    d, device = cfg.data, acc.device
    seed = cfg.train.seed if seed is None else seed
    timesteps = fixed_timesteps(c.noise_scheduler.config.num_train_timesteps, num_timesteps)
    # the photos and per-image prompts as setup decoded them for training: not read a second time
    instance_images, instance_prompts = run.dataset.instance_images, run.dataset.instance_prompts
    class_paths = class_images_for(cfg, run.output_dir, max_class_images) if d.class_prompt else []
    handles = [_peft_handle(acc, m) for m in run.trained().values()]

    result = {"timesteps": timesteps, "noise_seed": seed, "with_prior_preservation": d.with_prior_preservation,
              "latents": "VAE posterior mean", "class": None, "class_note": None}
    with torch.no_grad(), untouched_rng(device), eval_mode(run.unet, *run.text_encoders, c.vae), \
            on_device(device, c.vae, *c.text_encoders), acc.autocast(), vae_in_own_dtype(c.vae):
        groups = {"instance": (instance_images, instance_prompts)}
        if class_paths:
            groups["class"] = ([load_image(p) for p in class_paths], [d.class_prompt] * len(class_paths))
        runs = {}
        for name, (images, prompts) in groups.items():
            latents, time_ids = _latents(c.vae, images, d.resolution, device, run.weight_dtype)
            noise = fixed_noise(len(timesteps), tuple(latents.shape), seed if name == "instance" else seed + 1)
            # the prompts are encoded in each state: a trained text-encoder adapter is part of "after"
            ctx, pooled = _context(c, prompts, device)
            after = predictions(c.unet, c.noise_scheduler, latents, ctx, timesteps, noise,  # (preds, targets)
                                added_conditioning(pooled, time_ids))
            with adapters_disabled(*handles):
                ctx, pooled = _context(c, prompts, device)
                before = predictions(c.unet, c.noise_scheduler, latents, ctx, timesteps, noise,
                                     added_conditioning(pooled, time_ids))
            runs[name] = (before, after, len(images), prompts)

    def losses(before, after):
        b, a = mse_per_timestep(before[0], before[1]), mse_per_timestep(after[0], after[1])
        return {"loss_before": sum(b) / len(b), "loss_after": sum(a) / len(a),
                "per_timestep": {"before": b, "after": a}}

    before, after, n, prompts = runs["instance"]
    result["instance"] = {"images": n, "prompts": sorted(set(prompts)), **losses(before, after)}
    if "class" in runs:
        before, after, n, _ = runs["class"]
        drift = mse_per_timestep(after[0], before[0])  # adapted vs base prediction, same inputs
        result["class"] = {
            "images": n, "prompt": d.class_prompt,
            "drift": sum(drift) / len(drift),
            # relative to the size of the base prediction: comparable across models and prediction types
            "relative_drift": (sum(drift) / len(drift)) / max(mean_square(before[0]), 1e-12),
            "drift_per_timestep": drift,
            **losses(before, after),
        }
    elif not d.class_prompt:
        result["class_note"] = "no --class-prompt: class drift not measured"
    else:
        result["class_note"] = ("no class images found (--class-data-dir or OUTPUT/class_images): "
                                "class drift not measured")
    return result


def write_proxies(run, **kwargs) -> dict | None:
    """compute_proxies, written to OUTPUT/proxies.json and summed up in one line. Main process only."""
    if not run.accelerator.is_main_process:
        return None
    result = compute_proxies(run, **kwargs)
    write_json(Path(run.output_dir) / PROXIES_FILE, result)
    run.accelerator.print(proxies_summary(result))
    return result


def proxies_summary(p: dict) -> str:
    i = p["instance"]
    line = f"instance loss {i['loss_before']:.4f} -> {i['loss_after']:.4f}"
    if p.get("class"):
        line += f"; class drift {p['class']['relative_drift']:.4f} (relative)"
    return line
