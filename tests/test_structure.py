"""The package's shape, checked from the source (nothing is imported or run): the stages hand work forward, each
concept has one owner, and no module keeps names for others to reach through it.

Each check reads every module's AST. docs/architecture.md names the owners these tests hold the code to.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import peftbooth

ROOT = Path(peftbooth.__file__).parent
PACKAGE = "peftbooth"


def sources() -> dict[str, ast.Module]:
    """{'training/setup.py': its AST, ...} of every module of the package."""
    return {p.relative_to(ROOT).as_posix(): ast.parse(p.read_text(), str(p)) for p in sorted(ROOT.rglob("*.py"))}


def module_name(rel: str) -> str:
    parts = [PACKAGE, *Path(rel).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def used_names(tree: ast.Module) -> set[str]:
    """Every name the module reads, including inside string annotations ("TrainConfig")."""
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            annotations = [a.annotation for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg,
                                                  args.kwarg] if a is not None] + [node.returns]
        elif isinstance(node, ast.AnnAssign):
            annotations = [node.annotation]
        for ann in annotations:
            for sub in ast.walk(ann) if ann is not None else []:
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    try:
                        names |= {n.id for n in ast.walk(ast.parse(sub.value, mode="eval")) if isinstance(n, ast.Name)}
                    except SyntaxError:
                        pass
    return names


def package_imports(rel: str, tree: ast.Module) -> list[tuple[ast.ImportFrom, str, str]]:
    """(node, imported module, bound name) of every `from peftbooth... import name` in the module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = resolve(node, module_name(rel), rel.endswith("__init__.py"))
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                found += [(node, target, a.asname or a.name) for a in node.names]
    return found


# --- no re-exports ------------------------------------------------------------------------------------------------

# The package's public names (`from peftbooth import train, TrainConfig, AdapterPipeline`) are the one place
# that imports to export: users, not tests, import them there.
PUBLIC_API = {"__init__.py"}


def test_no_module_imports_a_name_it_does_not_use():
    """A name imported from another peftbooth module and never used here is a re-export: callers and tests must
    import (and patch) the owner instead."""
    unused = []
    for rel, tree in sources().items():
        if rel in PUBLIC_API:
            continue
        used = used_names(tree)
        unused += [f"{rel}:{node.lineno} {name} (from {target})" for node, target, name in package_imports(rel, tree)
                   if name not in used]
    assert unused == []


def test_the_public_api_is_declared():
    tree = sources()["__init__.py"]
    exported = {name for _, _, name in package_imports("__init__.py", tree)}
    declared = next(ast.literal_eval(n.value) for n in tree.body
                    if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in n.targets))
    assert exported == set(declared)


# --- the flow: earlier stages never import later ones ---------------------------------------------------------

# The stages in the order work flows through them (docs/architecture.md). A module belongs to the stage of the
# longest prefix that names it, and may import its own stage and earlier ones only: a later stage calls an
# earlier one, never the other way. The run folder's layout and the atomic writer come early because every
# stage reads or writes run folders; the world's description (its scenes, tokenizer, recipe) is data the models
# and the config defaults read, while the world's instruments (pretraining, metrics) come after training.
STAGES = [
    ("config", ["config", "precision"]),
    ("run folder", ["runs", "runs.rundir", "runs.atomic"]),
    ("data", ["data"]),
    ("the world's description", ["world", "world.scenes", "world.subjects", "world.tokenizer", "world.configs",
                                 "world.configs_sd3", "world.recipe"]),
    ("models", ["models"]),
    ("adapters", ["adapters"]),
    ("adapter files", ["runs.formats"]),
    ("inference", ["inference"]),
    ("run pages", ["runs.report", "runs.chart", "runs.hub"]),
    ("training", ["training"]),
    ("measuring", ["evaluate", "world.build", "world.metrics", "world.evaluator", "world.evaluator_training",
                   "world.pretrain_unet", "world.pretrain_vae", "world.quality", "world.scene_dataset",
                   "world.training", "world.build_sd3", "world.pretrain_sd3", "world.judge", "world.judge_training"]),
    ("faces", ["cli", "__main__", "demo", "ui", "evaluate.command", "runs.formats.commands"]),
]


def stage_of(module: str) -> int:
    """The index in STAGES of a peftbooth module ('peftbooth.runs.formats.kohya' -> adapter files)."""
    name = module.removeprefix(PACKAGE).removeprefix(".")
    best, found = -1, None
    for index, (_, prefixes) in enumerate(STAGES):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), index
    return found


def test_every_module_has_a_stage():
    assert [rel for rel in sources() if rel != "__init__.py" and stage_of(module_name(rel)) is None] == []


def test_stages_import_only_their_own_and_earlier_stages():
    wrong = []
    for rel, tree in sources().items():
        if rel == "__init__.py":  # the public API
            continue
        here = stage_of(module_name(rel))
        for node, target, _ in package_imports(rel, tree):
            there = stage_of(target)
            if there is not None and there > here:
                wrong.append(f"{rel}:{node.lineno} ({STAGES[here][0]}) imports {target} ({STAGES[there][0]})")
    assert wrong == []


def test_the_stage_check_sees_a_step_back():
    """A stage test that cannot fail is no guard: an import from training into the models is caught."""
    assert stage_of("peftbooth.models.loading") < stage_of("peftbooth.training.setup")
    assert stage_of("peftbooth.runs.formats.kohya") > stage_of("peftbooth.runs.rundir")
    assert stage_of("peftbooth.world.metrics") > stage_of("peftbooth.world.recipe")


# --- one owner per concept ----------------------------------------------------------------------------------------

PART_NAMES = {"unet", "text_encoder", "text_encoder_2"}


def literal_parts(node: ast.AST) -> set[str] | None:
    """The adapter-part names a tuple / list / set literal or a dict's keys consist of, if only of them."""
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        items = node.elts
    elif isinstance(node, ast.Dict):
        items = [k for k in node.keys if k is not None]
    else:
        return None
    values = {i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)}
    if len(items) >= 2 and len(values) == len(items) and values <= PART_NAMES:
        return values
    return None


def test_the_adapter_parts_are_spelled_out_only_by_their_owner():
    """runs/rundir.py's ADAPTER_PARTS is the list of a run's adapter folders; a literal list, tuple or dict of
    those names anywhere else goes stale when a part is added."""
    spelled = [f"{rel}:{node.lineno}" for rel, tree in sources().items() if rel != "runs/rundir.py"
               for node in ast.walk(tree) if literal_parts(node)]
    assert spelled == []


def calls(tree: ast.Module) -> list[tuple[ast.Call, str]]:
    """(call, dotted name) of every call: 'os.replace', 'path.rename', 'fsync'."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute):
                base = f.value.id if isinstance(f.value, ast.Name) else "?"
                out.append((node, f"{base}.{f.attr}"))
            elif isinstance(f, ast.Name):
                out.append((node, f.id))
    return out


RENAMES = {"os.replace", "os.rename", "os.fsync", "shutil.move", "tempfile.mkdtemp", "tempfile.NamedTemporaryFile"}


@pytest.mark.parametrize("owner", ["runs/atomic.py"])
def test_files_are_moved_into_place_only_by_the_atomic_writer(owner):
    """A rename into place, an fsync or a temp file or folder is runs/atomic.py's: one writer that every run-folder
    write goes through, so the hidden names, the fsyncs and the clean-up after a crash are the same everywhere."""
    found = [f"{rel}:{node.lineno} {name}" for rel, tree in sources().items() if rel != owner
             for node, name in calls(tree) if name in RENAMES or name.endswith((".rename", ".replace_file"))]
    assert found == []
