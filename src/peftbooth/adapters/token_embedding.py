"""The identifier's own input embedding, trained beside the adapters (pivotal tuning: textual inversion +
DreamBooth), saved as OUTPUT/token_embeddings.safetensors and put back into a text encoder's embedding table.

Why: with adapters alone the rare identifier ("sks") binds to the subject *together with* the photos' contexts
(docs/world.md); a trained input vector for the word lets the pretrained text encoder compose the subject with any
context, as it composes any other word. (Measured in the world it did not lift the runs that fail: docs/world.md,
third sweep.)

The frozen embedding table (V, D) is left alone: a forward hook on it swaps in the trained rows wherever the
identifier's id occurs, so the optimizer holds (n, D) numbers instead of the whole table and nothing else can
move. The trained row lives in a small module registered under the embedding (`identifier`), so it is one of the
text encoder's parameters: DistributedDataParallel averages its gradient, and the trainable count shows it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config.sections import UsageError
from ..runs.rundir import TEXT_ENCODERS

# keys as the text encoders' folder names; the file's metadata names the token
KEYS = TEXT_ENCODERS  # one tensor per text encoder, named after its adapter part


def identifier_id(tokenizer, word: str, flag: str = "--train-token-embedding") -> int:
    """The one token id of `word` in `tokenizer`; UsageError when the word is not a single token."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise UsageError(f"{flag} {word}: the tokenizer splits it into {len(ids)} tokens; choose a word that is one "
                         "token (a rare one such as sks)")
    return ids[0]


class IdentifierEmbedding(torch.nn.Module):
    """Trainable rows (n, D) for token ids (n,), spliced into the output of a frozen nn.Embedding."""

    def __init__(self, embedding: torch.nn.Embedding, token_ids: list[int]):
        super().__init__()
        self.token_ids = list(token_ids)  # plain ints: the hook compares without reading a device tensor back
        # fp32 master copy of the pretrained rows: the optimizer steps exact numbers under mixed precision
        self.weight = torch.nn.Parameter(embedding.weight.detach()[token_ids].clone().float())

    def splice(self, module, args, output: torch.Tensor) -> torch.Tensor:
        """Forward hook: output (N, L, D) of embedding(input_ids (N, L)), the identifier's positions replaced."""
        input_ids = args[0]
        for row, token_id in enumerate(self.token_ids):
            here = (input_ids == token_id).unsqueeze(-1)  # (N, L, 1)
            output = torch.where(here, self.weight[row].to(output.dtype), output)
        return output


def attach(text_encoder: torch.nn.Module, token_ids: list[int]) -> IdentifierEmbedding:
    """Register a trainable IdentifierEmbedding under the encoder's input embedding and hook it in."""
    embedding = text_encoder.get_input_embeddings()
    trained = IdentifierEmbedding(embedding, token_ids).to(embedding.weight.device)
    embedding.add_module("identifier", trained)
    embedding.register_forward_hook(trained.splice)
    return trained


def trained_rows(text_encoder: torch.nn.Module) -> IdentifierEmbedding | None:
    return getattr(text_encoder.get_input_embeddings(), "identifier", None)


def state(text_encoders: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """{'text_encoder': (n, D), ...} of the encoders that train identifier rows (fp32, on the CPU)."""
    out = {}
    for key, encoder in zip(KEYS, text_encoders):
        rows = trained_rows(encoder)
        if rows is not None:
            out[key] = rows.weight.detach().float().cpu().contiguous()
    return out


def load_state(text_encoders: list[torch.nn.Module], weights: dict[str, torch.Tensor]) -> None:
    """Put checkpointed rows back into the encoders' IdentifierEmbedding modules (a resume)."""
    for key, encoder in zip(KEYS, text_encoders):
        rows = trained_rows(encoder)
        if rows is not None:
            rows.weight.data.copy_(weights[key].to(rows.weight.device))


def save_file(path: Path, text_encoders: list[torch.nn.Module], word: str) -> None:
    from safetensors.torch import save_file as write

    write(state(text_encoders), str(path), metadata={"token": word})


def read_file(path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """(token word, {'text_encoder': (n, D), ...}) of a token_embeddings.safetensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        word = (f.metadata() or {}).get("token")
        weights = {k: f.get_tensor(k) for k in f.keys()}
    unknown = [k for k in weights if k not in KEYS]
    if not word or unknown or not weights:
        raise UsageError(f"{path}: not a peftbooth token-embedding file (needs a 'token' in its metadata and "
                         f"tensors named {' or '.join(KEYS)})")
    return word, weights


class IdentifierRows:
    """Trained identifier rows of the adapters loaded on a pipeline, written into its text encoders' embedding
    tables while their adapter is active and the pretrained rows put back when it is not.

    `encoders`: {'text_encoder': (tokenizer, CLIPTextModel), ...}. A strength w (set_adapters' weight) gives the
    row pretrained + w * (trained - pretrained): 1.0 is the adapter as trained, 0.0 the base model.
    """

    def __init__(self, encoders: dict[str, tuple]):
        self.encoders = encoders
        # adapter name -> (word, {key: (token id, trained row (1, D))})
        self.loaded: dict[str, tuple[str, dict[str, tuple[int, torch.Tensor]]]] = {}
        self.pretrained: dict[tuple[str, int], torch.Tensor] = {}  # (key, token id) -> the base model's row

    @classmethod
    def of_pipeline(cls, pipe) -> "IdentifierRows":
        """For a StableDiffusion(XL)Pipeline: each text encoder beside its own tokenizer."""
        pairs = zip(KEYS, ("tokenizer", "tokenizer_2"))  # the pipeline's attribute of each encoder's tokenizer
        return cls({k: (getattr(pipe, t), getattr(pipe, k)) for k, t in pairs if getattr(pipe, k, None) is not None})

    def check(self, path: Path, flag: str = "--adapter") -> tuple[str, dict[str, tuple[int, torch.Tensor]]]:
        """Read and check a run's token-embedding file against these encoders, changing nothing:
        (word, {key: (token id, trained row)})."""
        word, weights = read_file(path)
        rows = {}
        for key, row in weights.items():
            if key not in self.encoders:
                raise UsageError(f"{flag} {path}: has an embedding for {key}, which this base model does not have")
            tokenizer, encoder = self.encoders[key]
            table = encoder.get_input_embeddings().weight
            if row.ndim != 2 or row.shape != (1, table.shape[1]):
                raise UsageError(f"{flag} {path}: {key} embedding has shape {tuple(row.shape)}, this model needs "
                                 f"(1, {table.shape[1]}) (trained on another base model?)")
            rows[key] = (identifier_id(tokenizer, word, flag=f"{flag} {path}: token"), row[0])
        return word, rows

    def add(self, name: str, word: str, rows: dict[str, tuple[int, torch.Tensor]]) -> None:
        self.loaded[name] = (word, rows)

    def remove(self, name: str) -> None:
        self.loaded.pop(name, None)

    @torch.no_grad()
    def apply(self, weights: dict[str, float]) -> None:
        """Write the rows of the active adapters (names in `weights`), the pretrained rows everywhere else."""
        active = {n: self.loaded[n] for n in weights if n in self.loaded}
        words = [word for word, _ in active.values()]
        shared = sorted({w for w in words if words.count(w) > 1})
        if shared:
            names = [n for n, (w, _) in active.items() if w == shared[0]]
            raise UsageError(f"--mix: adapters {' and '.join(names)} both trained the word {shared[0]!r}; mix "
                             "adapters whose identifiers differ")
        for (key, token_id), row in self.pretrained.items():
            self.encoders[key][1].get_input_embeddings().weight[token_id] = row
        for name, (_, rows) in active.items():
            for key, (token_id, trained) in rows.items():
                table = self.encoders[key][1].get_input_embeddings().weight
                base = self.pretrained.setdefault((key, token_id), table[token_id].clone())
                table[token_id] = base + weights[name] * (trained.to(table.device, table.dtype) - base)
