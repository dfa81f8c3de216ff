"""Every benchmark script runs, in its smallest mode, and writes its rows: none can rot unnoticed before a GPU
session spends its device time on it (issue 22, item 11).

gpu_session.sh's dry run (DRY=1 QUICK=1: the tiny model on the CPU, one adapter per step, the compile steps
skipped) covers train_throughput.py (floor, plain, peftbooth; gradient checkpointing; channels-last; PEFT's
forward), memory_check.py, class_images.py and lycoris_layers.py; the other scripts run on their own below.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def run(cmd: list[str], timeout: int, **env) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src"), **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def rows(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_gpu_session_dry_run_runs_every_step_and_writes_its_rows(tmp_path):
    out = tmp_path / "out"
    run(["bash", str(BENCH / "gpu_session.sh")], 1800, DRY="1", QUICK="1", PY=sys.executable, OUT=str(out))
    steps = (out / "steps.txt").read_text().splitlines()
    finished = {line.split(":")[0]: line for line in steps if not line.startswith("SKIPPED")}
    assert sorted(line for line in steps if line.startswith("SKIPPED")) == [
        "SKIPPED compile: QUICK=1", "SKIPPED cuda graphs: QUICK=1"]
    assert set(finished) == {"env and model", "throughput", "gradient checkpointing", "memory check",
                             "channels-last", "class images", "lycoris layers", "lycoris peft forward"}
    assert all(": exit 0 after" in line for line in finished.values()), steps
    for name, modes in [("train.jsonl", {"floor", "plain", "peftbooth"}), ("train_gc.jsonl", {"peftbooth"}),
                        ("train_cl.jsonl", {"peftbooth-channels-last"}),
                        ("train_peft_forward.jsonl", {"peftbooth-peft-forward"})]:
        got = rows((out / name).read_text())
        assert not [r for r in got if "error" in r], got  # a failed worker is a row with "error", not an exit code
        assert {r["mode"] for r in got if not r.get("raw")} == modes and all(r["it_s"] > 0 for r in got)
    checks = rows((out / "memory_check.jsonl").read_text())
    assert [r["setting"] for r in checks] == ["default", "low-memory"]
    assert all(r["estimate_with_margin_mb"] > 0 and r["check"] == "skipped (no CUDA device)" for r in checks)
    assert {r["mode"] for r in rows((out / "class_images.jsonl").read_text())} == {"plain", "peftbooth"}
    layers = rows((out / "layers.jsonl").read_text())
    assert [r["adapter"] for r in layers] == ["lokr"] and layers[0]["factored_ms"] > 0  # one layer, one adapter


def test_memory_estimate_small_shape(tmp_path):
    out = tmp_path / "rows.jsonl"
    run([sys.executable, str(BENCH / "memory_estimate.py"), "--shape", "tiny", "--settings", "default",
         "--output", str(out)], 1200)
    got = rows(out.read_text())
    assert [r["phase"] for r in got] == ["caching", "class-images", "training"]
    assert all(r["peak_mb_estimate"] > 0 for r in got) and got[2]["trainable_params"] > 0


def test_learning_quality_one_short_run(tmp_path):
    out = tmp_path / "rows.jsonl"
    made = run([sys.executable, str(BENCH / "learning_quality.py"), "--smoke", "--steps", "2", "--num-images", "1",
                "--output", str(out), "--save-images", str(tmp_path / "samples"), "--set",
                "data.prior_loss_weight=0.5"], 1200)
    base, row = rows(out.read_text())  # the base model first, then the one adapter run, on the first test subject
    assert base["adapter"] == "base" and base["steps"] == 0 and base["subject"] == row["subject"]
    assert (row["adapter"], row["prior_preservation"], row["text_encoder"], row["steps"]) == ("lora", True, True, 2)
    assert row["recipe_changes"] == {"data.prior_loss_weight": 0.5} and "recipe_changes" not in base
    # the kept runs measured again at another guidance, without training
    work = made.stderr.split("runs kept in ")[1].split(" (for --remeasure)")[0]
    again = rows(run([sys.executable, str(BENCH / "learning_quality.py"), "--remeasure", work, str(out),
                      "--guidance-scale", "2", "--num-images", "1", "--jobs", "1"], 600).stdout)
    assert [(r["subject"], r["adapter"], r["guidance_scale"]) for r in again] == [
        (base["subject"], "base", 2.0), (row["subject"], "lora", 2.0)]
    assert all(0 <= r["subject_fidelity"] <= 1 for r in again)
    shutil.rmtree(Path(work) / "run1")
    gone = subprocess.run([sys.executable, str(BENCH / "learning_quality.py"), "--remeasure", work, str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert gone.returncode == 2 and "no run folder for rows [1]" in gone.stderr
    assert all(0 <= r[k] <= 1 for r in (base, row) for k in ("subject_fidelity", "in_context_fidelity"))
    # measured again from the kept samples with the same judge: the same figures (what --rescore is for: a new
    # judge on the same images)
    again = rows(run([sys.executable, str(BENCH / "learning_quality.py"), "--rescore", str(out),
                      str(tmp_path / "samples")], 600).stdout)
    assert again == [base, row]
    # the hand-label tool picks from those samples (one per stratum: base / adapter x held-out / in-context /
    # class), writes the sheet, the CSV and unlabelled views, and scores the judge once the labels are filled in
    labels = tmp_path / "judge"
    run([sys.executable, str(BENCH / "judge_labels.py"), "pick", str(tmp_path / "samples"), "--out", str(labels),
         "--per-subject", "6", "--views", str(tmp_path / "views")], 600)
    with open(labels / "labels.csv") as fh:
        picked = list(csv.DictReader(fh))
    assert {(r["model"] == "base", r["kind"]) for r in picked} == {
        (b, k) for b in (True, False) for k in ("held-out", "in-context", "class")}
    assert (tmp_path / "views" / "view_000.png").is_file() and all(r["label"] == "" for r in picked)
    for r in picked:
        r["label"] = "1" if r["model"] != "base" and r["kind"] != "class" else "0"
    with open(labels / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, list(picked[0]))
        w.writeheader()
        w.writerows(picked)
    scored = rows(run([sys.executable, str(BENCH / "judge_labels.py"), "score", str(labels)], 600).stdout)[0]
    assert scored["positives"] == 2 and scored["all"]["n"] == 6 and 0 <= scored["agreement"] <= 1


def test_learning_quality_refuses_a_bad_recipe_change():
    for item, message in [("data.no_such=1", "expected SECTION.FIELD=VALUE with a field of the train config"),
                          ("data.prior_loss_weight=high", "'high' is not a float"),
                          ("unet_adapter.rank=8.5", "'8.5' is not a int")]:  # Optional[int]: still an int
        bad = subprocess.run([sys.executable, str(BENCH / "learning_quality.py"), "--set", item], cwd=ROOT,
                             capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert bad.returncode == 2 and f"error: --set {item}: {message}" in bad.stderr


def test_learning_quality_casts_a_recipe_change_to_the_field_type():
    sys.path.insert(0, str(BENCH))
    try:
        from learning_quality import recipe_changes
    finally:
        sys.path.remove(str(BENCH))
    assert recipe_changes(["unet_adapter.rank=16", "unet_adapter.dropout=0.2", "data.class_data_dir=none",
                           "train.train_text_encoder=false", "train.train_token_embedding=sks"]) == {
        "unet_adapter.rank": 16, "unet_adapter.dropout": 0.2, "data.class_data_dir": None,
        "train.train_text_encoder": False, "train.train_token_embedding": "sks"}


def test_world_shapes_smoke(tmp_path):
    grid = tmp_path / "shapes.png"
    got = rows(run([sys.executable, str(BENCH / "world_shapes.py"), "--smoke", "--grid", str(grid)], 600).stdout)[0]
    assert got["samples"] == 3 and grid.is_file()
    assert all(0 <= got[f"{k}_{c}"] <= 1 for k in ("shape", "evaluator", "vae_shape") for c in ("ball", "box", "tent"))
    assert 0 <= got["colour_match"] <= 1 and 0 <= got["background_match"] <= 1
    bad = subprocess.run([sys.executable, str(BENCH / "world_shapes.py"), "--model", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert bad.returncode == 2 and f"--model {tmp_path}: not a world model folder" in bad.stderr


def test_profile_adapters_one_step():
    got = rows(run([sys.executable, str(BENCH / "profile_adapters.py"), "--model", "tiny", "--steps", "1",
                    "--adapters", "lora"], 600).stdout)
    assert len(got) == 1 and got[0]["adapter"] == "lora" and got[0]["top_ops_share"]


def test_prior_modes_one_short_run_each(tmp_path):
    out = tmp_path / "rows.jsonl"
    run([sys.executable, str(BENCH / "prior_modes.py"), "--smoke", "--steps", "2", "--num-images", "1",
         "--output", str(out)], 1200)
    got = rows(out.read_text())
    assert [r["prior_mode"] for r in got] == ["class-images", "base-prediction"]
    assert got[0]["class_image_seconds"] > 0 == got[1]["class_image_seconds"]
    assert all(0 <= r["subject_fidelity"] <= 1 and r["steps"] == 2 for r in got)


def test_memory_estimate_sd3_table():
    got = rows(run([sys.executable, str(BENCH / "memory_estimate.py"), "--sd3-table"], 600).stdout)
    assert [(r["t5"], r["gradient_checkpointing"]) for r in got] == [(True, False), (True, True), (False, False),
                                                                      (False, True)]
    assert got[0]["peak_with_margin_gib"] > got[2]["peak_with_margin_gib"]  # T5's weights
