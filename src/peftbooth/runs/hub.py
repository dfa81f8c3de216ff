"""The run folder's model card, and sharing a run on the Hugging Face Hub.

The token comes from the environment (`HF_TOKEN`) or the user's `hf auth login`, never from a flag, and is
never printed or written. Only the adapters, the card, config.yaml and sample images are uploaded (and, for a
LoRA run, the adapters once more as one diffusers-format `pytorch_lora_weights.safetensors`, so that
`pipe.load_lora_weights("user/name")` works): never checkpoints, class images or logs.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import yaml

from ..config.sections import TrainConfig, UsageError
from .rundir import (
    ADAPTER_PARTS,
    CHECKPOINTS_DIR,
    CLASS_IMAGES_DIR,
    CONFIG_FILE,
    MODEL_CARD,
    TOKEN_EMBEDDINGS,
    VALIDATION_DIR,
    RunDir,
)

# What a shared run holds (relative glob patterns), and what it never holds even if a pattern would match.
SAMPLE_PATTERNS = ("samples/*.png", f"{VALIDATION_DIR}/*/*.png")
UPLOAD_PATTERNS = (MODEL_CARD, CONFIG_FILE, TOKEN_EMBEDDINGS, *(f"{part}/*" for part in ADAPTER_PARTS),
                   *SAMPLE_PATTERNS)
NEVER_UPLOAD = (CHECKPOINTS_DIR, CLASS_IMAGES_DIR, "logs")
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"  # what pipe.load_lora_weights("user/name") looks for
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_id_or_none(model: str | None) -> str | None:
    """`model` if it names a Hub repo ('owner/name'), else None: a local folder, 'tiny' or a path is no base model
    the Hub can link to."""
    from ..models.loading import TINY_NAME, looks_like_path

    if not model or model == TINY_NAME or looks_like_path(model) or os.path.exists(model):
        return None
    return model if HUB_ID.match(model) else None


def all_lora(run_dir: Path) -> bool:
    """Every adapter of the run is a LoRA (the diffusers format holds LoRA only), judged from adapter_config.json
    (an unreadable one is no LoRA), and no identifier embedding was trained (the diffusers file cannot carry it)."""
    run = RunDir(run_dir)
    kinds = run.adapter_types()
    return bool(kinds) and all(k == "LORA" for k in kinds) and not run.token_embeddings_file.is_file()


def sample_images(run_dir: Path) -> list[str]:
    """Sample / validation PNGs of a run folder, relative paths, sorted."""
    found = [p for pattern in SAMPLE_PATTERNS for p in run_dir.glob(pattern)]
    return sorted(p.relative_to(run_dir).as_posix() for p in found)


def model_card(cfg: TrainConfig, stats: dict, run_dir: Path, family: str = "sd") -> str:
    """README.md with YAML front matter in the Hub's model-card convention, then the settings and samples.
    `family`: the base model's (models.components.FAMILIES)."""
    u, te, d, t = cfg.unet_adapter, cfg.text_encoder_adapter, cfg.data, cfg.train
    sdxl, sd3 = family == "sdxl", family == "sd3"
    denoiser = "transformer" if sd3 else "unet"
    tag = {"sdxl": "stable-diffusion-xl", "sd3": "sd3"}.get(family, "stable-diffusion")
    meta = {
        **({"base_model": hub_id_or_none(cfg.model.model)} if hub_id_or_none(cfg.model.model) else {}),
        "library_name": "peft",
        "license": "other",  # placeholder: the base model's license applies; set it before sharing
        "instance_prompt": d.instance_prompt,
        "tags": ["text-to-image", tag, "diffusers", "dreambooth", u.adapter, "peftbooth"],
    }
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).rstrip(),
        "---",
        "",
        f"# DreamBooth {u.adapter.upper() if u.adapter == 'lora' else u.adapter} adapter for `{cfg.model.model}`",
        "",
        f"Trigger prompt: `{d.instance_prompt}`",
        "",
        "## Settings",
        "",
        f"- base model: `{cfg.model.model}`" + (f" (revision `{cfg.model.revision}`)" if cfg.model.revision else ""),
        f"- {'transformer' if sd3 else 'UNet'} adapter: {u.adapter}, rank {u.rank}, alpha {u.alpha}, targets "
        f"`{u.target_modules}`" + (f", blocks {t.target_blocks}" if sd3 and t.target_blocks else ""),
    ]
    if t.train_token_embedding:
        lines.append(f"- the identifier `{t.train_token_embedding}`'s input embedding, trained: "
                     f"`{TOKEN_EMBEDDINGS}` (peftbooth generate and fuse apply it)")
    if t.train_text_encoder:
        both = " (both SDXL text encoders)" if sdxl else " (both CLIP text encoders; T5 is not trained)" if sd3 else ""
        lines.append(f"- text-encoder adapter{'s' + both if both else ''}: {te.adapter}, "
                     f"rank {te.rank}, alpha {te.alpha}, targets `{te.target_modules}`")
    if d.with_prior_preservation:
        lines.append(f"- prior preservation: `{d.class_prompt}`, {d.num_class_images} class images, "
                     f"weight {d.prior_loss_weight}")
    lines += [
        f"- {stats['steps']} steps, learning rate {t.learning_rate} ({t.lr_scheduler}), batch {d.train_batch_size}"
        f" x {t.gradient_accumulation_steps} accumulation, resolution {d.resolution}, mixed precision "
        f"{t.mixed_precision}, seed {t.seed}, final loss {stats['final_loss']:.4f}",
        "",
        "## Use",
        "",
        "```bash",
        # the folder's name, not its local path: the card is uploaded by `push`
        f'peftbooth generate --model {cfg.model.model} --adapter {run_dir.name} --prompt "{d.instance_prompt}"'
        + (f" --vae {cfg.model.vae}" if cfg.model.vae else ""),
        (f"peftbooth fuse {run_dir.name} --output-dir {run_dir.name}-fused   # a diffusers model, embedding included"
         if t.train_token_embedding else f"peftbooth export {run_dir.name} --format kohya --output "
         f"{run_dir.name}.safetensors   # A1111 / ComfyUI / Forge"),
        "```",
        "",
        f"`{denoiser}/`, `text_encoder/`{' and `text_encoder_2/`' if sdxl or sd3 else ''} are PEFT adapter "
        f"folders: `PeftModel.from_pretrained({denoiser}, '{denoiser}')` loads them.",
        "",
    ]
    if u.adapter == "lora" and (not t.train_text_encoder or te.adapter == "lora"):
        lines += [f"`peftbooth push` also uploads `{DIFFUSERS_WEIGHTS}`: `pipe.load_lora_weights(\"user/name\")` "
                  "loads the repo with diffusers alone, at the trained strength.", ""]
    images = sample_images(run_dir)
    if images:
        lines += ["## Samples", ""] + [f"![{Path(p).stem}]({p})" for p in images] + [""]
    return "\n".join(lines)


def run_files(run: Path) -> list[str]:
    """The run folder's own files that are shared, relative paths, sorted."""
    found = {p for pattern in UPLOAD_PATTERNS for p in run.glob(pattern) if p.is_file()}
    return sorted(
        rel for rel in (p.relative_to(run).as_posix() for p in found)
        if rel.split("/")[0] not in NEVER_UPLOAD and not any(part.startswith(".") for part in rel.split("/"))
    )


def files_to_upload(run_dir: str | Path) -> list[str]:
    """Exactly the files `push` uploads (the repo's layout), sorted: the run's shared files, plus, for a LoRA run,
    the diffusers-format file made from its adapters."""
    run = Path(run_dir)
    return sorted(run_files(run) + ([DIFFUSERS_WEIGHTS] if all_lora(run) else []))


def stage_repo(run_dir: str | Path, folder: str | Path) -> list[str]:
    """Lay the repo out in `folder` exactly as `push` uploads it; return its files. Nothing is written into the
    run folder. (`push --output DIR` calls this instead of uploading.)"""
    from .formats import export_run

    run, folder = Path(run_dir), Path(folder)
    for rel in run_files(run):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(run / rel, folder / rel)
    if all_lora(run):
        export_run(run, "diffusers", folder / DIFFUSERS_WEIGHTS)
    return files_to_upload(run)


def hub_token() -> str:
    """The user's token, from HF_TOKEN or their login; a clear refusal when offline or when there is none."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise UsageError("push: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it to push")
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise UsageError("push: no Hugging Face token; set HF_TOKEN in the environment or run `hf auth login`")
    return token


def check_repo_id(repo_id: str) -> None:
    """'user/name', or a bare 'name' in the token's own namespace (what the example scripts' --push_to_hub does)."""
    parts = repo_id.split("/")
    if len(parts) > 2 or not all(parts) or any(c.isspace() for c in repo_id):
        raise UsageError(f"push: repo id {repo_id!r} must look like 'user/name' (or 'name', in your namespace)")


def push(run_dir: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload a finished run's adapters, card, config and samples to a model repo; return its URL."""
    run = Path(run_dir)
    check_repo_id(repo_id)
    if not RunDir(run).is_finished():
        raise UsageError(f"push: {run} is not a finished run (no unet/adapter_model.safetensors)")
    token = hub_token()
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="peftbooth-push-") as staging:
        files = stage_repo(run, staging)  # before the repo is created: a failure here creates nothing
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        # create_repo gives a bare name the token's namespace: upload to the id it returns
        api.upload_folder(folder_path=staging, repo_id=url.repo_id, repo_type="model", allow_patterns=files,
                          commit_message=f"peftbooth: upload {run.name}")
    return str(url)
