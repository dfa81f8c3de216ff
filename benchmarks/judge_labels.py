"""The judge against eyes: model samples labelled by hand, kept in the repository (docs/judge/), and the judge's
recall and false-positive rate on them.

    # 1. pick samples from a learning_quality run's --save-images folder: the sheet, the CSV (label column empty)
    #    and, under --views, pictures to label from (each sample beside a drawing of its subject), unlabelled
    .venv/bin/python benchmarks/judge_labels.py pick SAMPLES_DIR --out docs/judge --views /tmp/views
    # 2. fill the CSV's label column by eye (1: the image shows the subject; 0: it does not)
    # 3. score the shipped judge on them
    .venv/bin/python benchmarks/judge_labels.py score docs/judge

The sheet (samples.png) holds the samples themselves, 32 x 32 each, row-major in the CSV's order, so any later
judge can be scored on the same images.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
COLS = 16  # tiles per sheet row
FIELDS = ("tile", "subject", "model", "kind", "prompt", "label")


def kind_of(prompt: str, subject) -> str:
    """held-out | in-context | class: which of the metrics' prompts drew the sample."""
    from peftbooth.world.scenes import prompt as class_prompt

    if prompt == class_prompt(subject.cls):
        return "class"
    return "held-out" if any(prompt.endswith(c) for c in subject.held_out_contexts) else "in-context"


def pick(samples: Path, out: Path, per_subject: int, seed: int, views: Path | None) -> int:
    """Per subject, `per_subject` samples drawn evenly over (adapter run or base) x prompt kind."""
    from PIL import Image

    from peftbooth.world.subjects import by_name

    rng = random.Random(seed)
    rows, tiles = [], []
    for subject_dir in sorted(p for p in samples.iterdir() if p.is_dir()):
        subject = by_name(subject_dir.name)
        pools: dict = {}
        for f in sorted(subject_dir.glob("*/*.png")):
            prompt = f.stem.rsplit("_", 1)[0].replace("_", " ")
            key = ("base" if f.parent.name == "base" else "adapter", kind_of(prompt, subject))
            pools.setdefault(key, []).append(f)
        keys = sorted(pools)
        chosen = []
        for i in range(per_subject):  # round robin over the strata, at random within each
            pool = pools[keys[i % len(keys)]]
            chosen.append(pool.pop(rng.randrange(len(pool))))
        for f in chosen:
            prompt = f.stem.rsplit("_", 1)[0].replace("_", " ")
            rows.append({"tile": len(rows), "subject": subject.name, "model": f.parent.name,
                         "kind": kind_of(prompt, subject), "prompt": prompt, "label": ""})
            tiles.append(Image.open(f).convert("RGB"))
    out.mkdir(parents=True, exist_ok=True)
    sheet = Image.new("RGB", (COLS * 32, -(-len(tiles) // COLS) * 32))
    for i, t in enumerate(tiles):
        sheet.paste(t, (i % COLS * 32, i // COLS * 32))
    sheet.save(out / "samples.png")
    with open(out / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, FIELDS)
        w.writeheader()
        w.writerows(rows)
    if views:
        write_views(rows, tiles, views)
    print(f"{len(rows)} samples -> {out / 'samples.png'}, {out / 'labels.csv'}")
    return 0


def write_views(rows: list[dict], tiles: list, views: Path, per_view: int = 30) -> None:
    """Pictures to label from: each sample at 3x beside its subject drawn on a plain context, numbered by tile; no
    score of the judge is shown (labels by eye, not by agreement)."""
    from PIL import Image, ImageDraw

    from peftbooth.world.subjects import by_name

    views.mkdir(parents=True, exist_ok=True)
    refs = {}
    for k in range(0, len(rows), per_view):
        page = Image.new("RGB", (5 * 220, 6 * 110), (255, 255, 255))
        d = ImageDraw.Draw(page)
        for j, row in enumerate(rows[k:k + per_view]):
            s = by_name(row["subject"])
            if s.name not in refs:
                refs[s.name] = s.draw(s.scene(random.Random(0), "in the snow"))
            x, y = j % 5 * 220, j // 5 * 110
            page.paste(refs[s.name].resize((96, 96), 0), (x + 4, y + 10))
            page.paste(tiles[row["tile"]].resize((96, 96), 0), (x + 104, y + 10))
            d.text((x + 4, y), f"{row['tile']}", fill=(0, 0, 0))
        page.save(views / f"view_{k:03d}.png")


def score(folder: Path) -> dict:
    """The shipped judge on the labelled samples: recall and false-positive rate, overall and per prompt kind."""
    import numpy as np
    from PIL import Image

    from peftbooth.world import MODEL_DIR
    from peftbooth.world.judge import describe, load_judge, p_shows
    from peftbooth.world.judge_training import rates
    from peftbooth.world.subjects import by_name

    rows = list(csv.DictReader(open(folder / "labels.csv")))
    sheet = Image.open(folder / "samples.png").convert("RGB")
    net = load_judge(MODEL_DIR)
    p = np.array([p_shows(net, [sheet.crop((int(r["tile"]) % COLS * 32, int(r["tile"]) // COLS * 32,
                                            int(r["tile"]) % COLS * 32 + 32, int(r["tile"]) // COLS * 32 + 32))],
                          describe(by_name(r["subject"])))[0] for r in rows])
    y = np.array([int(r["label"]) for r in rows])
    kinds = np.array([r["kind"] for r in rows])
    out = {"all": rates(p, y), "agreement": round(float(((p > 0.5) == (y == 1)).mean()), 4),
           "positives": int(y.sum())}
    for k in ("held-out", "in-context", "class"):
        out[k] = rates(p[kinds == k], y[kinds == k])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a_pick = sub.add_parser("pick")
    a_pick.add_argument("samples", type=Path)
    a_pick.add_argument("--out", type=Path, default=Path("docs/judge"))
    a_pick.add_argument("--per-subject", type=int, default=40)
    a_pick.add_argument("--seed", type=int, default=0)
    a_pick.add_argument("--views", type=Path, default=None)
    a_score = sub.add_parser("score")
    a_score.add_argument("folder", type=Path, nargs="?", default=Path("docs/judge"))
    a = ap.parse_args()
    if a.cmd == "pick":
        return pick(a.samples, a.out, a.per_subject, a.seed, a.views)
    print(json.dumps(score(a.folder)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
