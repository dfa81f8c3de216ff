"""OUTPUT/report.html: one static page that says whether a run worked, readable offline in any browser.

It shows the settings, the loss curve, the validation grids over time (step 0 = before training), the offline
proxies (proxies.json), the protocol metrics when `peftbooth eval` has been run (eval/metrics.json), the adapter
size on disk, training time and throughput, and how to load the adapter. No scripts and nothing fetched: the loss
curve is embedded as a data URI, other images are the PNGs already in the run folder, linked relatively.

Training statistics are kept in OUTPUT/train_stats.json so the page can be rebuilt later (`peftbooth eval` does,
to add its metrics) without the training process.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from urllib.parse import quote

from PIL import Image

from .atomic import read_json, write_json, write_text
from .chart import data_uri, loss_curve
from .rundir import EVAL_DIR, EVAL_METRICS_FILE, VALIDATION_DIR, WORLD_METRICS_FILE, RunDir, read_warning

# ---------------------------------------------------------------------------------------------------------------
# inputs


def has_training_stats(run_dir: str | Path) -> bool:
    return RunDir(run_dir).stats_file.is_file()


def save_stats(run_dir: str | Path, stats: dict) -> dict:
    """Keep fit()'s statistics (steps, seconds, it_s, final_loss, loss_history) beside the run, as JSON."""
    keep = {k: v for k, v in stats.items() if isinstance(v, (int, float, str, list, tuple, dict, type(None)))}
    keep["loss_history"] = loss_points(stats.get("loss_history") or [])
    path = write_json(RunDir(run_dir).stats_file, keep)
    return read_json(path)  # as a later rebuild will read it: tuples as lists, NaN as None


def loss_points(history) -> list[list[float]]:
    """[(step, loss), ...] or [{'step', 'loss'}, ...] -> [[step, loss], ...], finite losses only, by step."""
    points = []
    for item in history:
        step, loss = (item["step"], item["loss"]) if isinstance(item, dict) else item
        if loss is not None and math.isfinite(float(loss)):
            points.append([int(step), float(loss)])
    return sorted(points)


def adapter_sizes(run_dir: Path) -> dict[str, int]:
    """Bytes on disk of each adapter folder (unet/, text_encoder/, text_encoder_2/)."""
    return RunDir(run_dir).adapter_sizes()


def validation_grids(run_dir: Path) -> list[tuple[int, str]]:
    """(step, relative path of grid.png) in step order."""
    from .rundir import step_dir, validation_steps_on_disk

    rows = []
    for step in validation_steps_on_disk(run_dir):
        grid = step_dir(run_dir, step) / "grid.png"
        if grid.is_file():
            rows.append((step, grid.relative_to(run_dir).as_posix()))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# formatting helpers


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def human_seconds(s: float) -> str:
    s = float(s)
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(int(round(s)), 60)
    return f"{m} min {s} s" if m < 60 else f"{m // 60} h {m % 60} min"


def fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if math.isfinite(v) else str(v)
    return str(v)


def percent_change(before, after) -> str:
    return f"{(after - before) / before * 100:+.1f}%" if before else "-"


def esc(v) -> str:
    return html.escape(str(v), quote=True)


def src(rel: str) -> str:
    """A run-relative file path as a safe relative URL (spaces and other characters percent-encoded)."""
    return esc(quote(rel))


def table(rows: list[list], header: list[str] | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def section(title: str, body: str, anchor: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>{body}</section>'


# ---------------------------------------------------------------------------------------------------------------
# sections


def summary_section(cfg: dict, stats: dict, sizes: dict[str, int]) -> str:
    m, u, te = cfg.get("model", {}), cfg.get("unet_adapter", {}), cfg.get("text_encoder_adapter", {})
    d, t = cfg.get("data", {}), cfg.get("train", {})
    rows = [
        ["base model", f"<code>{esc(m.get('model'))}</code>"],
        ["instance prompt", f"<code>{esc(d.get('instance_prompt'))}</code>"],
        ["UNet adapter", esc(f"{u.get('adapter')}, rank {u.get('rank')}, alpha {u.get('alpha')}, "
                             f"targets {u.get('target_modules')}")],
    ]
    if t.get("train_text_encoder"):
        rows.append(["text-encoder adapter", esc(f"{te.get('adapter')}, rank {te.get('rank')}, alpha "
                                                 f"{te.get('alpha')}, targets {te.get('target_modules')}")])
    if d.get("with_prior_preservation"):
        rows.append(["prior preservation", esc(f"{d.get('class_prompt')!r}, {d.get('num_class_images')} class "
                                               f"images, weight {d.get('prior_loss_weight')}")])
    if t.get("ema_decay"):
        rows.append(["saved weights", esc(f"the moving average of the adapter weights (--ema-decay "
                                          f"{t.get('ema_decay')}), not the last step's")])
    size = ", ".join(f"{p}/ {human_bytes(n)}" for p, n in sizes.items())
    if len(sizes) > 1:
        size += f" (total {human_bytes(sum(sizes.values()))})"
    rows.append(["adapter size on disk", esc(size) if sizes else "no adapter saved yet"])
    if stats:
        steps, seconds, it_s = stats.get("steps"), stats.get("seconds"), stats.get("it_s")
        per_step = (d.get("train_batch_size") or 1) * (t.get("gradient_accumulation_steps") or 1)
        per_step *= 2 if d.get("with_prior_preservation") else 1  # a class image beside every instance image
        rows += [
            ["optimizer steps", esc(steps)],
            *segments_rows(stats),
            ["training time", esc(human_seconds(seconds)) if seconds is not None else "-"],
            ["throughput", esc(f"{it_s:.3f} steps/s, {it_s * per_step:.2f} images/s "
                               f"({per_step} images per step)") if it_s else "-"],
            ["final loss", esc(fmt(stats.get("final_loss")))],
        ]
        if stats.get("validation_seconds"):
            rows.append(["validation sampling", esc(human_seconds(stats["validation_seconds"]))
                         + " (not counted in training time)"])
    return section("Run", table(rows), "run")


def segments_rows(stats: dict) -> list[list[str]]:
    """A run stopped and resumed is one run: how many starts it took, and what its figures do not cover."""
    n, rows = stats.get("segments") or 1, []
    if n > 1 and stats.get("history_from"):  # resumed from an older checkpoint, which did not count them
        rows.append(["segments", esc(f"at least {n} (stopped and resumed)")])
    elif n > 1:
        rows.append(["segments", esc(f"{n} (stopped and resumed {'once' if n == 2 else f'{n - 1} times'}); loss, "
                                     "training time and throughput cover them all")])
    if stats.get("note"):
        rows.append(["note", f'<span class="warn">{esc(stats["note"])}</span>'])
    return rows


def loss_section(stats: dict) -> str:
    curve = loss_curve(loss_points((stats or {}).get("loss_history") or []))
    if curve is None:
        return section("Loss", "<p>No loss history recorded (fit() returns it as stats['loss_history']).</p>", "loss")
    n = len((stats or {}).get("loss_history") or [])
    body = (f'<img class="chart" src="{data_uri(curve)}" alt="training loss against step" width="{curve.width}" '
            f'height="{curve.height}"><p class="note">{n} logged points (every --logging-steps steps), each the '
            "mean loss over the steps since the one before (single steps are noisy: the timestep is random).</p>")
    return section("Loss", body, "loss")


def validation_section(run_dir: Path) -> str:
    grids = validation_grids(run_dir)
    if not grids:
        return section("Validation", "<p>No validation images (train with --validation-prompt).</p>", "validation")
    prompts = read_json(run_dir / VALIDATION_DIR / "prompts.json") or []
    legend = "".join(f"<li><code>{esc(p)}</code></li>" for p in prompts)
    body = (f"<p>Rows: the prompts, in order; columns: fixed seeds, identical at every step, so each column shows "
            f"what training changed.</p><ol>{legend}</ol>")

    if read_warning(run_dir):
        body = f'<p class="warn validation-warning">{esc(read_warning(run_dir))}</p>' + body
    for step, rel in grids:
        label = f"step {step}" + (" (before training)" if step == 0 else "")
        with Image.open(run_dir / rel) as g:
            w, h = g.size
        scale = max(1, 128 // max(h // max(len(prompts), 1), 1))  # tiny 32 px images are scaled up, crisply
        body += (f'<figure><figcaption>{esc(label)}</figcaption><img class="grid" src="{src(rel)}" '
                 f'alt="{esc(label)}" width="{w * scale}" height="{h * scale}"></figure>')
    return section("Validation over time", body, "validation")


def proxies_section(run_dir: Path) -> str:
    p = RunDir(run_dir).read_proxies()
    if not p:
        return section("Offline proxies", "<p>Not computed (proxies.json is written at the end of training).</p>",
                       "proxies")
    i = p["instance"]
    rows = [["instance loss (instance images, instance prompt)", fmt(i["loss_before"]), fmt(i["loss_after"]),
             percent_change(i["loss_before"], i["loss_after"])]]
    c = p.get("class")
    if c:
        rows.append([esc(f"class loss ({c['prompt']})"), fmt(c["loss_before"]), fmt(c["loss_after"]),
                     percent_change(c["loss_before"], c["loss_after"])])
    body = table(rows, ["denoising loss", "before (base)", "after (adapter)", "change"])
    if c:
        body += table([[fmt(c["drift"], 6), fmt(c["relative_drift"], 6), esc(c["images"]),
                        "yes" if p.get("with_prior_preservation") else "no"]],
                      ["class drift (MSE adapted vs base prediction)", "relative to the base prediction",
                       "class images", "prior preservation"])
    else:
        body += f"<p>{esc(p.get('class_note') or 'class drift not measured')}</p>"
    body += (f'<p class="note">Fixed noise (seed {esc(p.get("noise_seed"))}) at {len(p["timesteps"])} fixed '
             f"timesteps ({esc(', '.join(map(str, p['timesteps'])))}); latents are VAE posterior means. A lower "
             "instance loss means the adapter fits the photos; class drift says how much the class itself moved "
             "(compare runs with and without prior preservation).</p>")
    return section("Offline proxies", body, "proxies")


def world_metrics_section(run_dir: Path, m: dict) -> str:
    """`peftbooth eval` of a run on the world model: the world evaluator's metrics, adapter and base model."""
    from ..world import LABELS, METRICS

    rows = [[esc(LABELS.get(k, k))] + [fmt(v.get(name), 3) for name in METRICS] for k, v in m["results"].items()]
    body = table(rows, ["model", *METRICS])
    if m.get("adapter_fingerprint") != RunDir(run_dir).adapter_fingerprint():
        body = ('<p class="warn">These metrics were computed for a different adapter (an earlier run in this '
                "folder): run <code>peftbooth eval</code> again.</p>") + body
    st = m.get("settings", {})
    body += (f'<p class="note">The world\'s evaluator stands in for DINO and CLIP (docs/world.md): subject '
             f"prompts in contexts the photos did not show ({esc(', '.join(st.get('contexts', [])))}), "
             f"{esc(st.get('num_images'))} images each; the class prompt twice as many.</p>")
    for name in m["results"]:
        sheet = run_dir / EVAL_DIR / f"world_{name}_sheet.png"
        if sheet.is_file():
            rel = sheet.relative_to(run_dir).as_posix()
            body += (f'<figure><figcaption>{esc(LABELS.get(name, name))}: one row per prompt '
                     f'({esc(" / ".join(m.get("prompts", [])))})</figcaption>'
                     f'<img class="grid" src="{src(rel)}" alt="{esc(name)}"></figure>')
    return section("World metrics", body, "metrics")


def metrics_section(run_dir: Path) -> str:
    run = RunDir(run_dir)
    world = run.read_eval(WORLD_METRICS_FILE)
    if world:
        return world_metrics_section(run_dir, world)
    m = run.read_eval(EVAL_METRICS_FILE)
    if not m:
        return section("DreamBooth metrics", "<p>Not computed yet: <code>peftbooth eval RUN_DIR --class-name CLASS"
                       "</code> adds DINO, CLIP-I and CLIP-T here.</p>", "metrics")
    labels = {"adapter": "adapter", "base": "base model (no adapter)", "real": "real images (reference)"}
    rows = [[esc(labels.get(k, k)), fmt(v.get("dino"), 3), fmt(v.get("clip_i"), 3), fmt(v.get("clip_t"), 3)]
            for k, v in m["results"].items()]
    body = table(rows, ["model", "DINO", "CLIP-I", "CLIP-T"])
    if m.get("adapter_fingerprint") != run.adapter_fingerprint():
        body = ('<p class="warn">These metrics were computed for a different adapter (an earlier run in this '
                "folder): run <code>peftbooth eval</code> again.</p>") + body
    a = m.get("args", {})
    body += (f'<p class="note">{esc(m["num_prompts"])} prompts ({esc(m["subject"])} list'
             + ("" if m.get("protocol_complete") else ", not the full protocol")
             + f"), {esc(a.get('num_images'))} images each, {esc(m['num_real_images'])} real images; evaluators "
             f"{esc(m['evaluators'].get('dino'))} and {esc(m['evaluators'].get('clip'))}; CLIP-T text: "
             f"{esc('prompt without the identifier' if m.get('clip_t_prompt') == 'class' else 'full prompt')}.</p>")
    for name in ("adapter", "base"):
        sheet = run_dir / EVAL_DIR / f"{name}_sheet.png"
        if sheet.is_file():
            rel = sheet.relative_to(run_dir).as_posix()
            body += (f'<figure><figcaption>{esc(labels[name])}: first image of each prompt</figcaption>'
                     f'<img class="grid" src="{src(rel)}" alt="{esc(name)}"></figure>')
    return section("DreamBooth metrics", body, "metrics")


def usage_section(run_dir: Path, cfg: dict) -> str:
    model = (cfg.get("model") or {}).get("model") or "MODEL"
    prompt = (cfg.get("data") or {}).get("instance_prompt") or "a photo of sks dog"
    run = str(run_dir.resolve())
    te = RunDir(run_dir).adapter_dir("text_encoder").is_dir()
    te2 = RunDir(run_dir).adapter_dir("text_encoder_2").is_dir()
    vae = (cfg.get("model") or {}).get("vae")  # the replacement VAE the run trained with, if any
    code = (
        f'peftbooth generate --model {model} --adapter {run} \\\n    --prompt "{prompt}" --output-dir samples/'
        + (f" --vae {vae}" if vae else "") + "\n\n"
        "# Python\nfrom peftbooth import AdapterPipeline\n"
        f'pipe = AdapterPipeline("{model}"' + (f', vae="{vae}"' if vae else "") + ')\n'
        f'pipe.load_adapter("{run}", "subject")\n'
        f'images = pipe.generate("{prompt}", num_images=4, seed=0)\n\n'
        "# plain PEFT on the components of a diffusers pipeline `sd` of the same base model\n"
        "from peft import PeftModel\n"
        f'unet = PeftModel.from_pretrained(sd.unet, "{run}/unet")'
        + (f'\ntext_encoder = PeftModel.from_pretrained(sd.text_encoder, "{run}/text_encoder")' if te else "")
        + (f'\ntext_encoder_2 = PeftModel.from_pretrained(sd.text_encoder_2, "{run}/text_encoder_2")' if te2 else "")
    )
    return section("Use the adapter", f"<pre>{esc(code)}</pre>", "use")


def config_section(run_dir: Path) -> str:
    text = RunDir(run_dir).config_text()
    text = "(no config.yaml)" if text is None else text
    return section("Configuration", f"<pre>{esc(text)}</pre>", "config")


STYLE = """
body{font:15px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ddd;padding:.3em .6em;text-align:left;
vertical-align:top}th{background:#f5f5f5}pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:13px}
figure{margin:1em 0}figcaption{font-weight:600;margin-bottom:.3em}img.grid{image-rendering:pixelated;
max-width:100%;height:auto}img.chart{max-width:100%;height:auto}.note{color:#666;font-size:13px}
.warn{background:#fff4e0;padding:.5em}nav a{margin-right:1em}
"""


def render_html(run_dir: Path, stats: dict) -> str:
    cfg = RunDir(run_dir).read_config()
    name = esc(run_dir.resolve().name)
    nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in [("run", "run"), ("loss", "loss"), ("validation",
                  "validation"), ("proxies", "proxies"), ("metrics", "metrics"), ("use", "use"), ("config", "config")])
    parts = [
        summary_section(cfg, stats, adapter_sizes(run_dir)), loss_section(stats), validation_section(run_dir),
        proxies_section(run_dir), metrics_section(run_dir), usage_section(run_dir, cfg), config_section(run_dir),
    ]
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>peftbooth run {name}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>'
            f"<body><h1>peftbooth run <code>{name}</code></h1><nav>{nav}</nav>{''.join(parts)}</body></html>\n")


def read_json_yaml(path: Path) -> dict:
    """Old spelling: a run's config.yaml is read by ``RunDir(run).read_config()``."""
    path = Path(path)
    return RunDir(path.parent).read_config() if path.name == "config.yaml" else _read_yaml(path)


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def write_report(run_dir: str | Path, stats: dict | None = None) -> Path:
    """Write OUTPUT/report.html (atomically). `stats` from fit() is saved to train_stats.json; without it the
    saved one is used, so the report can be rebuilt after training (as `peftbooth eval` does)."""
    run = RunDir(run_dir)
    stats = save_stats(run.path, stats) if stats is not None else (run.read_stats() or {})
    return write_text(run.report_file, render_html(run.path, stats))
