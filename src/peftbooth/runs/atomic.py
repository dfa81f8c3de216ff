"""The one atomic writer: everything is written under a hidden name beside its destination and renamed into
place in one step, so a reader (the UI, a second command, a resumed run) never sees half a file.

* one file or folder: ``atomic_file``, ``atomic_dir`` (and ``write_text``, ``write_json`` on top of them);
* several entries that belong together (a finished run, a checkpoint): written into a hidden folder
  (``staging_dir``, or a folder of the caller's own when several processes fill it) and moved with ``replace``;
* ``fsync_path`` / ``fsync_tree`` for writes that must survive a power cut, ``hide`` to take a folder away in one
  step before it is deleted.

No other module renames, replaces or fsyncs files (tests/test_structure.py).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _hidden_sibling(path: Path, what: str = "tmp") -> Path:
    """A fresh hidden name in `path`'s folder: same file system, so the final rename is one atomic step."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.{what}")


def fsync_path(path: Path) -> None:
    """Flush a written file, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder` (files before their folders), then `folder` itself."""
    for path in sorted(folder.rglob("*"), reverse=True):
        fsync_path(path)
    fsync_path(folder)


def replace(src: Path, dst: Path) -> None:
    """Move `src` onto `dst` in one rename. A folder at `dst` is removed first: a rename cannot replace a folder
    that holds files, so between the two steps `dst` is briefly absent (never half-written)."""
    if Path(dst).is_dir():
        shutil.rmtree(dst)
    os.replace(src, dst)


@contextmanager
def staging_dir(folder: Path) -> Iterator[Path]:
    """A fresh hidden folder inside `folder` (same file system) to write entries into before each is moved into
    place with `replace`; removed afterwards with whatever was not moved."""
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def hide(path: Path) -> Path:
    """Rename a folder to a fresh hidden name beside it (one step: a listing never shows half of it) and return
    that name, for the caller to delete at leisure."""
    hidden = _hidden_sibling(Path(path), "deleted")
    os.replace(path, hidden)
    return hidden


@contextmanager
def atomic_file(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on success it is renamed onto `path`, replacing any file
    there. On an error the temporary file is removed and a previous `path` is left as it was.

    The temporary file is not created here (the writer creates it, with the usual permissions). `durable` also
    flushes the file before the rename and the folder after it, so that a power cut cannot leave an empty file
    under the final name (worth it for files a resumed run counts on, e.g. class images)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _hidden_sibling(path)
    try:
        yield tmp
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
        if durable:
            fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Like :func:`atomic_file` for a folder: filled in a hidden sibling folder, then renamed into place. A folder
    cannot be renamed onto a non-empty one, so an existing `path` is moved aside first and removed afterwards."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _hidden_sibling(path, "tmp")
    tmp.mkdir()  # not mkdtemp: its 0700 would become the final folder's permissions
    old = None
    try:
        yield tmp
        if path.exists():
            old = _hidden_sibling(path, "old")
            old.mkdir()
            os.replace(path, old / "x")
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_text(path: str | Path, text: str) -> Path:
    """Atomic text write (UTF-8)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def finite_or_none(value):
    """NaN / inf -> None, recursively: JSON has no such numbers, and browsers and jq refuse files that hold them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(x) for k, x in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(x) for x in value]
    return value


def write_json(path: str | Path, data: dict) -> Path:
    """Atomic JSON write; NaN / inf become null so the file stays valid JSON."""
    return write_text(path, json.dumps(finite_or_none(data), indent=1))


def read_json(path: str | Path) -> dict | None:
    """A JSON file's contents, or None when it is missing or not JSON (a reader of optional files)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
