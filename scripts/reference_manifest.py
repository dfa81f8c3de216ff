"""Fingerprints for scripts/reference_runs.py: the digest of each output file, the manifest of a whole OUT_DIR, and
the comparison of two manifests.

A file's digest leaves out only what legitimately changes between two identical runs (VOLATILE_KEYS,
VOLATILE_TEXT; logs and locks are not fingerprinted at all), and keeps per-tensor / per-key details so that
compare() can say *what* in a file differs. Nothing here imports peftbooth.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

# ---------------------------------------------------------------------------------------------------------------
# what is volatile

# JSON / YAML keys (at any depth) whose values are wall-clock measurements and so differ between two identical
# runs. Nothing else is dropped: paths are kept (every command runs with OUT_DIR as its working directory and
# relative paths, and any absolute OUT_DIR left in a file is replaced by "<OUT>"), so they are compared too.
VOLATILE_KEYS = {
    "seconds",             # train_stats.json, checkpoints' training_state.json: training wall time
    "validation_seconds",  # the same files: time spent sampling validation images
    "it_s",                # train_stats.json: steps per second
}
# The same measurements in report.html: the values of its "training time", "throughput" (steps/s, images/s) and
# "validation sampling" (seconds) rows. (README.md and the rest of the page, the loss chart included, are kept.)
VOLATILE_TEXT = [
    re.compile(r"(<td>(?:training time|throughput|validation sampling)</td>\s*<td>)[^<]*(</td>)"),
]
# Never fingerprinted: logs, locks, caches, tqdm output, this script's own files.
SKIP_DIRS = {"logs", ".cache", "__pycache__"}
SKIP_NAME = re.compile(r"(^\.peftbooth\.lock.*|\.lock$|\.log$|^events\.out\.tfevents\..*|^\.tmp-.*)")


# ---------------------------------------------------------------------------------------------------------------
# fingerprints


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_digest(t) -> str:
    import torch

    t = t.detach().cpu().contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""  # any dtype (bf16 too), bit for bit
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}:{sha(raw)}"


def scrub(obj, out_str: str):
    """Drop VOLATILE_KEYS at any depth; replace the absolute OUT_DIR inside strings; tensors -> their digest."""
    import torch

    if isinstance(obj, dict):
        return {str(k): scrub(v, out_str) for k, v in obj.items() if str(k) not in VOLATILE_KEYS}
    if isinstance(obj, (list, tuple)):
        return [scrub(v, out_str) for v in obj]
    if isinstance(obj, str):
        return obj.replace(out_str, "<OUT>")
    if isinstance(obj, torch.Tensor):
        return "tensor:" + tensor_digest(obj)
    if isinstance(obj, np.ndarray):
        return f"ndarray:{obj.dtype}{list(obj.shape)}:{sha(np.ascontiguousarray(obj).tobytes())}"
    if isinstance(obj, float):
        return repr(obj)  # exact: json would also keep it, but nan/inf stay representable
    if obj is None or isinstance(obj, (bool, int)):
        return obj
    return f"{type(obj).__name__}:{obj!r}"


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def digest(path: Path, out: Path) -> tuple[str, object]:
    """(digest, details) of one output file."""
    out_str = str(out)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open

        details = {}
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            for key in sorted(f.keys()):
                details[f"tensor:{key}"] = tensor_digest(f.get_tensor(key))
        for k, v in sorted(meta.items()):  # metadata values are strings; some hold JSON
            try:
                v = canonical(scrub(json.loads(v), out_str))
            except ValueError:
                v = v.replace(out_str, "<OUT>")
            if k not in VOLATILE_KEYS:
                details[f"meta:{k}"] = v
        return sha(canonical(details).encode()), details
    if suffix in (".png", ".jpg", ".jpeg", ".webp"):
        with Image.open(path) as img:
            img.load()
            text = {k: str(v) for k, v in getattr(img, "text", {}).items()}
            details = {"mode": img.mode, "size": list(img.size), "pixels": sha(img.tobytes()),
                       **{f"text:{k}": v.replace(out_str, "<OUT>") for k, v in sorted(text.items())}}
        return sha(canonical(details).encode()), details
    if suffix == ".json":
        data = scrub(json.loads(path.read_text(encoding="utf-8")), out_str)
        return sha(canonical(data).encode()), flat_details(data)
    if suffix in (".yaml", ".yml"):
        import yaml

        data = scrub(yaml.safe_load(path.read_text(encoding="utf-8")), out_str)
        return sha(canonical(data).encode()), flat_details(data)
    if suffix in (".pt", ".pth", ".bin"):  # checkpoints' optimizer/RNG/scheduler state: content, not pickle bytes
        import torch

        data = scrub(torch.load(path, map_location="cpu", weights_only=True), out_str)
        return sha(canonical(data).encode()), flat_details(data)
    if suffix in (".md", ".html", ".txt", ".csv", ".py", ""):
        text = path.read_text(encoding="utf-8").replace(out_str, "<OUT>")
        for pattern in VOLATILE_TEXT:
            text = pattern.sub(r"\1<T>\2", text)
        return sha(text.encode()), None
    return sha(path.read_bytes()), None


def flat_details(data, prefix: str = "") -> dict:
    """Top two levels of a JSON-like structure, each value's digest (enough to say where a difference is)."""
    if isinstance(data, dict) and prefix.count("/") < 2:
        found = {}
        for k, v in data.items():
            found.update(flat_details(v, f"{prefix}{k}/"))
        return found
    return {prefix.rstrip("/") or ".": sha(canonical(data).encode())[:16]}


def fingerprint(out: Path, skip: set[Path]) -> tuple[dict, dict]:
    manifest, details = {}, {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out)
        if not path.is_file() or path in skip or any(p in SKIP_DIRS for p in rel.parts[:-1]) \
                or SKIP_NAME.search(path.name):
            continue
        d, det = digest(path, out)
        manifest[rel.as_posix()] = d
        if det is not None:
            details[rel.as_posix()] = det
    return manifest, details


def check_resume(out: Path) -> dict:
    """runs/a_resumed's adapters against runs/a's: the same keys, bit for bit (the manifest also records it)."""
    from safetensors.torch import load_file

    result = {}
    for part in ("unet", "text_encoder"):
        a = load_file(out / "runs" / "a" / part / "adapter_model.safetensors")
        b = load_file(out / "runs" / "a_resumed" / part / "adapter_model.safetensors")
        result[part] = a.keys() == b.keys() and all(tensor_digest(a[k]) == tensor_digest(b[k]) for k in a)
    return result


# ---------------------------------------------------------------------------------------------------------------
# compare


def compare(manifest: dict, details: dict, baseline_path: Path) -> int:
    baseline = json.loads(baseline_path.read_text())
    base_details_path = baseline_path.with_suffix(".details.json")
    base_details = json.loads(base_details_path.read_text()) if base_details_path.is_file() else {}
    problems = 0
    for key in sorted(baseline.keys() | manifest.keys()):
        if key not in manifest:
            print(f"MISSING  {key}")
        elif key not in baseline:
            print(f"EXTRA    {key}")
        elif baseline[key] != manifest[key]:
            print(f"DIFFERS  {key}")
            a, b = base_details.get(key), details.get(key)
            if isinstance(a, dict) and isinstance(b, dict):
                for sub in sorted(a.keys() | b.keys()):
                    if a.get(sub) != b.get(sub):
                        print(f"           {sub}: {a.get(sub)!s:.80} -> {b.get(sub)!s:.80}")
        else:
            continue
        problems += 1
    if problems:
        print(f"{problems} of {len(baseline.keys() | manifest.keys())} files differ, are missing or extra")
        return 1
    print(f"identical: {len(manifest)} files")
    return 0
