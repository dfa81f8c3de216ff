"""A word-level CLIP tokenizer for the world: every word of its captions, and a few rare identifier words, is one
token. It is an ordinary `CLIPTokenizer` (vocab.json + merges.txt): the byte-level characters are in the
vocabulary and each word is reached by merges, so any other text still tokenizes (character by character)."""

from __future__ import annotations

import json
from pathlib import Path

MAX_LENGTH = 16  # tokens per prompt, start and end included: the world's captions are at most 11


def byte_chars() -> list[str]:
    """CLIP's byte-to-printable-character table (printable bytes map to themselves, the rest from U+0100 up)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: merge the lowest-ranked adjacent pair until none is known."""
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2:]
    return pieces


def vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Merges that build every word into one token 'word</w>', checked with the same BPE the tokenizer runs."""
    chars = byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        target = word + "</w>"
        for _ in range(4 * len(word)):  # each pass adds one merge of the pieces BPE leaves
            pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
            if pieces == [target]:
                break
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
        else:
            raise RuntimeError(f"could not build merges for {word!r}")
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def write_tokenizer(folder: str | Path, words: list[str]):
    """Write vocab.json, merges.txt and the tokenizer's own files into `folder`; return the tokenizer."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocab_and_merges(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>",
                        model_max_length=MAX_LENGTH)
    for w in words:
        ids = tok(w, add_special_tokens=False).input_ids
        if ids != [vocab[w + "</w>"]]:
            raise RuntimeError(f"tokenizer splits {w!r} into {ids}")
    tok.save_pretrained(str(folder))
    return tok
