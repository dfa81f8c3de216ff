"""Did it work? The DreamBooth evaluation protocol, and two offline proxies computed at the end of training.

* :mod:`.protocol`: the paper's prompts and its metrics (DINO, CLIP-I, CLIP-T) as pure functions of embeddings;
* :mod:`.evaluators`: the CLIP and DINO models that make those embeddings;
* :mod:`.runner`: ``peftbooth eval RUN_DIR``, the protocol run on a run folder and on its base model;
* :mod:`.proxies`: instance loss before/after and class drift, no evaluator model (OUT/proxies.json);
* :mod:`.command`: the ``eval`` subcommand (a run on the world model goes to :mod:`peftbooth.world.metrics`).

Every name is re-exported here, so ``from peftbooth.evaluate import X`` keeps working.
"""

from __future__ import annotations

from pathlib import Path

from ..rundir import EVAL_DIR, PROXIES_FILE, RunDir, write_json
from .command import add_commands, base_model_of_run, cmd_eval, cmd_eval_world
from .evaluators import Evaluators, protocol_metrics
from .protocol import (
    CLIP_T_PROMPTS, DEFAULT_CLIP, DEFAULT_DINO, LIVE_PROMPTS, OBJECT_PROMPTS, clip_t_text, cosine_matrix,
    distinct_pairs_mean_cosine, identifier_from_prompt, matched_mean_cosine, metrics_from_embeddings,
    pairwise_mean_cosine, protocol_templates, render,
)
from .proxies import (
    adapters_disabled, class_images_for, compute_proxies, fixed_noise, fixed_timesteps, mean_square,
    mse_per_timestep, predictions, proxies_summary, write_proxies,
)
from .runner import EvalArgs, contact_sheet, evaluate_run, format_table, generate_protocol_images, resolve_eval_args


def adapter_fingerprint(run_dir: str | Path) -> str | None:
    """Old spelling of ``RunDir(run_dir).adapter_fingerprint()``."""
    return RunDir(run_dir).adapter_fingerprint()


def read_run_config(run_dir: str | Path) -> dict:
    """Old spelling of ``RunDir(run_dir).read_config(strict=True)``."""
    return RunDir(run_dir).read_config(strict=True)


__all__ = [
    "CLIP_T_PROMPTS", "DEFAULT_CLIP", "DEFAULT_DINO", "EVAL_DIR", "EvalArgs", "Evaluators", "LIVE_PROMPTS",
    "OBJECT_PROMPTS", "PROXIES_FILE", "adapter_fingerprint", "adapters_disabled", "add_commands",
    "base_model_of_run", "class_images_for", "clip_t_text", "cmd_eval", "cmd_eval_world", "compute_proxies",
    "contact_sheet", "cosine_matrix", "distinct_pairs_mean_cosine", "evaluate_run", "fixed_noise",
    "fixed_timesteps", "format_table", "generate_protocol_images", "identifier_from_prompt", "matched_mean_cosine",
    "mean_square", "metrics_from_embeddings", "mse_per_timestep", "pairwise_mean_cosine", "predictions",
    "protocol_metrics", "protocol_templates", "proxies_summary", "read_run_config", "render", "resolve_eval_args",
    "write_json", "write_proxies",
]
