"""The DreamBooth paper's evaluation protocol as data and pure maths: its prompts, and its metrics from embeddings.

As in the DreamBooth paper (Ruiz et al., 2023, section 4.1):

* the paper's 25 prompts (object list, or the live-subject list with ``--live``), N images each (4 by default);
* DINO: mean cosine similarity of the ViT-S/16 DINO embeddings (the CLS token) over every generated x real pair;
* CLIP-I: the same with CLIP image embeddings;
* CLIP-T: mean cosine similarity of each generated image with its prompt's CLIP text embedding. By default the
  prompt is compared *without* the identifier ("a dog in the jungle", not "a sks dog in the jungle"): the
  identifier is a rare token that means nothing to CLIP, so keeping it would only add noise to what CLIP-T is
  meant to measure, whether the image follows the prompt's context. ``--clip-t-prompt full`` keeps it.

Nothing here loads a model or reads a file: the evaluator models are in :mod:`.evaluators`, the run over a run
folder in :mod:`.runner`.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from ..config.sections import UsageError

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_DINO = "facebook/dino-vits16"

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


def metrics_from_embeddings(gen_dino, gen_clip, text_clip, real_dino, real_clip) -> dict:
    return {
        "dino": pairwise_mean_cosine(gen_dino, real_dino),
        "clip_i": pairwise_mean_cosine(gen_clip, real_clip),
        "clip_t": matched_mean_cosine(gen_clip, text_clip),
    }

