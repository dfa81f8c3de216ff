#!/usr/bin/env python
"""Reference runs: drive peftbooth through its command line only and fingerprint everything it writes.

    python scripts/reference_runs.py OUT_DIR [--manifest FILE] [--compare BASELINE.json]

Every step is a `python -m peftbooth ...` subprocess (never an import of peftbooth), so the script works
unchanged across any internal reorganisation of the package: run it on the old code, keep the manifest, run it
on the new code with `--compare`, and any change in what the commands write shows up as a differing file.

What runs (all on the CPU, tiny models, a few steps each):

  models/sd1, models/sdxl      `tiny-model --kind sd1 | sdxl`
  data/photos                  4 photos of mixed sizes (seeded numpy noise + shapes), one caption file and one
                               NAME.mask.png (a mask without --masked-loss: must not be taken for a photo)
  data/masked                  3 photos, each with its NAME.mask.png (for --masked-loss)
  runs/a                       LoRA, sd1: prior preservation (class images generated into the run), text encoder,
                               cosine schedule with warm-up, random flips, validation, checkpoints, proxies
  runs/a_resumed               a copy of runs/a's first checkpoint, then `train --resume latest` with the same flags:
                               its adapters must equal runs/a's bit for bit (checked, and in the manifest)
  runs/b                       LoHa, sd1: --ema-decay, --masked-loss, --train-token-embedding, random crops,
                               Min-SNR, offset noise
  runs/c                       LoKr, sdxl: both text encoders, prior preservation
  gen/a                        `generate` with runs/a (and the base model), fixed seed
  export/a-{diffusers,kohya,peft}, export/c-kohya    `export --format ...`
  import/a-kohya               `import` of export/a-kohya back into PEFT folders
  fused/a                      `fuse` runs/a into a full pipeline
  class_images/sd1             `class-images` on models/sd1

The manifest maps each output file (relative to OUT_DIR) to a digest of its content that leaves out only what
legitimately changes between two identical runs (see VOLATILE_KEYS and digest() in reference_manifest.py, beside
this script, which does all the fingerprinting and comparing). A second file, MANIFEST.details.json, keeps
per-tensor / per-key digests so that --compare can say *what* in a file differs.

Typical use (the package comes from whatever `python -m peftbooth` imports: put a checkout first on PYTHONPATH to
pin it, and check the "peftbooth from:" line the script prints):

    PYTHONPATH=/tmp/ref-base/src python scripts/reference_runs.py /tmp/ref/base --manifest /tmp/ref/baseline.json
    python scripts/reference_runs.py /tmp/ref/new --compare /tmp/ref/baseline.json

`--no-run` only re-fingerprints an OUT_DIR filled earlier (to try other filters without training again).
Commands run with OMP/MKL threads fixed (--threads, default 2), CUDA hidden and HF offline; compare manifests made
with the same --threads and the same installed libraries.

Exit status: 0 when done (with --compare: when identical), 1 on a difference, 2 when a command failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# the fingerprinting lives beside this script: `python scripts/reference_runs.py` puts this folder on sys.path, and
# the insertion makes it importable however else the script is loaded
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_manifest import canonical, check_resume, compare, fingerprint, sha

# ---------------------------------------------------------------------------------------------------------------
# the environment of the commands

# The environment every command runs in: offline, CPU only, fixed threads (matmul reductions can depend on the
# thread count), no launcher variables leaking in from the caller.
DROP_ENV = re.compile(r"^(ACCELERATE_.*|WORLD_SIZE|RANK|LOCAL_RANK|LOCAL_WORLD_SIZE|MASTER_ADDR|MASTER_PORT|"
                      r"PEFTBOOTH_.*|HF_HUB_ENABLE_HF_TRANSFER)$")


def command_env(out: Path, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not DROP_ENV.match(k)}
    env.update({
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "PEFTBOOTH_CACHE": str(out / ".cache"),
        "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "TQDM_MININTERVAL": "5",
    })
    return env


# ---------------------------------------------------------------------------------------------------------------
# inputs


def draw_photo(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A seeded photo: smooth colour gradient + noise + a bright ellipse (something for a mask to cover)."""
    w, h = size
    base = rng.integers(30, 200, 3)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.empty((h, w, 3), np.float64)
    for c in range(3):
        img[..., c] = base[c] + 40 * np.sin(xx / w * np.pi * rng.uniform(1, 3)) + 30 * (yy / h)
    img += rng.normal(0, 12, img.shape)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    x0, y0 = int(rng.integers(2, w // 3)), int(rng.integers(2, h // 3))
    ImageDraw.Draw(pil).ellipse((x0, y0, x0 + w // 2, y0 + h // 2), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return pil


def ellipse_mask(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    w, h = size
    m = Image.new("L", size, 0)
    x0, y0 = int(rng.integers(0, w // 4)), int(rng.integers(0, h // 4))
    ImageDraw.Draw(m).ellipse((x0, y0, x0 + w * 2 // 3, y0 + h * 2 // 3), fill=255)
    return m


def make_inputs(out: Path) -> None:
    rng = np.random.default_rng(20240601)
    photos = out / "data" / "photos"
    photos.mkdir(parents=True)
    sizes = [(64, 64), (72, 56), (56, 80), (64, 64)]  # square, landscape, portrait: crops and SDXL time ids
    for i, size in enumerate(sizes):
        draw_photo(rng, size).save(photos / f"photo_{i}.png")
    (photos / "photo_2.txt").write_text("a photo of sks dog on a beach\n", encoding="utf-8")
    ellipse_mask(sizes[1], rng).save(photos / "photo_1.mask.png")  # no --masked-loss: ignored, not a photo

    masked = out / "data" / "masked"
    masked.mkdir(parents=True)
    for i, size in enumerate([(48, 40), (40, 48), (48, 48)]):
        draw_photo(rng, size).save(masked / f"photo_{i}.png")
        ellipse_mask(size, rng).save(masked / f"photo_{i}.mask.png")


# ---------------------------------------------------------------------------------------------------------------
# the commands

# lr 1e-2: a few steps visibly change the validation samples (a lower one leaves them equal to step 0's, and a
# difference in training would not show in them)
COMMON_TRAIN = ["--report-to", "none", "--logging-steps", "1", "--learning-rate", "1e-2", "--class-image-steps", "2"]

RUN_A = ["--model", "models/sd1", "--instance-data-dir", "data/photos", "--instance-prompt", "a photo of sks dog",
         "--resolution", "32",
         "--adapter", "lora", "--rank", "4", "--train-text-encoder",
         "--with-prior-preservation", "--class-prompt", "a photo of a dog", "--num-class-images", "2",
         "--max-train-steps", "6", "--seed", "7", "--lr-scheduler", "cosine", "--lr-warmup-steps", "1",
         "--random-flip", "--checkpointing-steps", "3",
         "--validation-prompt", "a photo of sks dog", "--validation-steps", "3", "--num-validation-images", "1"]

# the tiny tokenizer splits 'sks' into several tokens; 'z' is one (as in tests/test_token_embedding.py)
RUN_B = ["--model", "models/sd1", "--instance-data-dir", "data/masked", "--instance-prompt", "a photo of z dog",
         "--resolution", "32",
         "--adapter", "loha", "--rank", "4", "--train-text-encoder", "--text-encoder-adapter", "loha",
         "--train-token-embedding", "z", "--ema-decay", "0.9",
         "--masked-loss", "--unmasked-weight", "0.1", "--no-center-crop", "--random-flip",
         "--snr-gamma", "5", "--noise-offset", "0.05",
         "--max-train-steps", "4", "--seed", "11", "--checkpointing-steps", "0"]

RUN_C = ["--model", "models/sdxl", "--instance-data-dir", "data/photos", "--instance-prompt", "a photo of sks dog",
         "--resolution", "64",
         "--adapter", "lokr", "--rank", "4", "--train-text-encoder", "--text-encoder-adapter", "lokr",
         "--with-prior-preservation", "--class-prompt", "a photo of a dog", "--num-class-images", "1",
         "--max-train-steps", "4", "--seed", "3", "--checkpointing-steps", "0"]


def steps() -> list[tuple[str, list[str], object]]:
    """(name, peftbooth arguments, action before the command) in order; an action is a callable(out)."""

    def copy_first_checkpoint(out: Path) -> None:
        src = out / "runs" / "a" / "checkpoints" / "checkpoint-000003"
        dst = out / "runs" / "a_resumed" / "checkpoints" / src.name
        shutil.copytree(src, dst)

    return [
        ("tiny-sd1", ["tiny-model", "models/sd1", "--kind", "sd1", "--seed", "0"], None),
        ("tiny-sdxl", ["tiny-model", "models/sdxl", "--kind", "sdxl", "--seed", "0"], None),
        ("train-a", ["train", *RUN_A, *COMMON_TRAIN, "--output-dir", "runs/a"], None),
        ("train-a-resumed", ["train", *RUN_A, *COMMON_TRAIN, "--output-dir", "runs/a_resumed",
                             "--class-data-dir", "runs/a/class_images", "--resume", "latest"],
         copy_first_checkpoint),
        ("train-b", ["train", *RUN_B, *COMMON_TRAIN, "--output-dir", "runs/b"], None),
        ("train-c", ["train", *RUN_C, *COMMON_TRAIN, "--output-dir", "runs/c"], None),
        ("generate-a", ["generate", "--adapter", "a=runs/a", "--prompt", "a photo of sks dog", "--num-images", "2",
                        "--seed", "5", "--num-inference-steps", "4", "--include-base", "--output-dir", "gen/a"],
         None),
        ("export-a-diffusers", ["export", "runs/a", "--format", "diffusers", "--output", "export/a-diffusers"], None),
        ("export-a-kohya", ["export", "runs/a", "--format", "kohya", "--output", "export/a-kohya"], None),
        ("export-a-peft", ["export", "runs/a", "--format", "peft", "--output", "export/a-peft"], None),
        ("export-c-kohya", ["export", "runs/c", "--format", "kohya", "--output", "export/c-kohya"], None),
        ("import-a-kohya", ["import", "KOHYA_A", "--model", "models/sd1", "--output-dir", "import/a-kohya"], None),
        ("fuse-a", ["fuse", "runs/a", "--output-dir", "fused/a"], None),
        ("class-images", ["class-images", "--model", "models/sd1", "--class-prompt", "a photo of a cat",
                          "--class-data-dir", "class_images/sd1", "--num-class-images", "2",
                          "--sample-batch-size", "2", "--class-image-steps", "2", "--seed", "13"], None),
    ]


def run_all(out: Path, python: str, threads: int) -> float:
    env = command_env(out, threads)
    logs = out / "logs"
    logs.mkdir()
    where = subprocess.run([python, "-c", "import peftbooth, sys; print(peftbooth.__file__); print(sys.version)"],
                           cwd=out, env=env, capture_output=True, text=True, check=True).stdout
    print(f"peftbooth from: {where.splitlines()[0]}", flush=True)
    (logs / "00-peftbooth.log").write_text(where)
    start = time.monotonic()
    for n, (name, args, before) in enumerate(steps(), 1):
        if before is not None:
            before(out)
        if "KOHYA_A" in args:  # the file `export --format kohya` wrote into its folder
            files = sorted((out / "export" / "a-kohya").glob("*.safetensors"))
            if len(files) != 1:
                raise SystemExit(f"export/a-kohya: expected one .safetensors, found {[f.name for f in files]}")
            args = [str(files[0].relative_to(out)) if a == "KOHYA_A" else a for a in args]
        cmd = [python, "-m", "peftbooth", *args]
        t0 = time.monotonic()
        with open(logs / f"{n:02d}-{name}.log", "w") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            rc = subprocess.run(cmd, check=False, cwd=out, env=env, stdout=log,
                                stderr=subprocess.STDOUT).returncode
        print(f"[{time.monotonic() - start:6.1f}s] {name:20s} {time.monotonic() - t0:5.1f}s  rc={rc}", flush=True)
        if rc != 0:
            tail = (logs / f"{n:02d}-{name}.log").read_text().splitlines()[-25:]
            print("\n".join(tail), file=sys.stderr)
            raise SystemExit(2)
    return time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", help="a new (or empty) folder for the runs")
    ap.add_argument("--manifest", help="where to write the manifest (default OUT_DIR/manifest.json); the details "
                                       "go beside it as NAME.details.json")
    ap.add_argument("--compare", metavar="BASELINE.json", help="compare with this manifest; exit 1 on a difference")
    ap.add_argument("--python", default=sys.executable, help="the interpreter that runs `-m peftbooth`")
    ap.add_argument("--threads", type=int, default=2, help="OMP/MKL threads of each command (keep it equal "
                                                           "between the runs you compare; default 2)")
    ap.add_argument("--clean", action="store_true", help="delete OUT_DIR first if it exists")
    ap.add_argument("--no-run", action="store_true", help="only fingerprint an OUT_DIR an earlier run filled")
    args = ap.parse_args(argv)

    out = Path(args.out_dir).resolve()
    if args.no_run:
        if not (out / "logs").is_dir():
            ap.error(f"--no-run: {out} holds no earlier run")
    elif out.exists() and any(out.iterdir()):
        if not args.clean:
            ap.error(f"{out} is not empty (pass --clean to delete it first)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = Path(args.manifest).resolve() if args.manifest else out / "manifest.json"
    details_path = manifest_path.with_suffix(".details.json")

    t0 = time.monotonic()
    if not args.no_run:
        make_inputs(out)
        run_all(out, args.python, args.threads)
    manifest, details = fingerprint(out, skip={manifest_path, details_path})
    resume = check_resume(out)
    manifest["_checks/resume_matches_uninterrupted_run"] = sha(canonical(resume).encode())
    details["_checks/resume_matches_uninterrupted_run"] = resume
    if not all(resume.values()):
        print(f"WARNING: runs/a_resumed differs from runs/a: {resume}", file=sys.stderr)

    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    details_path.write_text(json.dumps(details, indent=1, sort_keys=True) + "\n")
    print(f"manifest: {manifest_path} ({len(manifest)} entries); total {time.monotonic() - t0:.1f}s")
    if args.compare:
        return compare(manifest, details, Path(args.compare))
    return 0


if __name__ == "__main__":
    sys.exit(main())
