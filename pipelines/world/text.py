"""Checks on a word-level tokenizer (the built-in model's, made by training/text.py): which words of a prompt
it lacks, and which words it has. Any other tokenizer (CLIP's BPE) spells every word, so both answer "none".
"""
from __future__ import annotations

import re

_WORD = re.compile(r"[a-z]+")


def is_word_level(tokenizer) -> bool:
    """A fast tokenizer whose model is a plain word list (the built-in model's), as opposed to CLIP's BPE."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.model).__name__ == "WordLevel"


def unknown_words(tokenizer, prompt: str) -> list[str]:
    """Words of `prompt` that the tokenizer maps to its unknown token, in order, without repeats.

    Works for any tokenizer with an unknown token; a tokenizer without one (CLIP's BPE) knows every word.
    A vocabulary lookup, not an encode: encoding resets the fast tokenizer's shared padding/truncation state,
    and the UI asks this while a model run may be tokenizing on another thread.
    """
    if tokenizer.unk_token_id is None or not is_word_level(tokenizer):
        return []  # BPE and friends spell any word from pieces
    known = tokenizer.get_vocab()
    found: list[str] = []
    for word in _WORD.findall(prompt.lower()):
        if word not in known and word not in found:
            found.append(word)
    return found


def vocabulary(tokenizer) -> list[str]:
    """The words a word-level tokenizer knows, sorted, without its special tokens; [] for an open vocabulary."""
    if tokenizer.unk_token_id is None or not is_word_level(tokenizer):
        return []
    special = set(tokenizer.all_special_tokens)
    return sorted(w for w in tokenizer.get_vocab() if w not in special)
