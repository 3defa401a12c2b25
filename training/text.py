"""The Shapes LDM's text side: a word-level tokenizer over the world's vocabulary and a tiny CLIP text encoder.

The tokenizer is a `PreTrainedTokenizerFast` (saved with the pipeline, loaded by `from_pretrained`)
that frames every caption as CLIP does: <|startoftext|> words... <|endoftext|>, padded with
<|endoftext|> to `model_max_length`. Words outside the vocabulary become <|unk|>; `unknown_words`
lists them so the app can warn the user.
"""
from __future__ import annotations

import re

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from training import shapes

BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"
MAX_TOKENS = 24  # longest training caption is 16 words + 2 markers
_WORD = re.compile(r"[a-z]+")


def build_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    words = words or shapes.vocabulary()
    vocab = {token: i for i, token in enumerate([BOS, EOS, UNK] + list(words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Words are letters only: punctuation and digits become spaces, so "circle," still finds "circle".
    core.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex("[^a-z]+"), " ")]
    )
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=EOS,  # as Stable Diffusion's CLIP tokenizer
        model_max_length=MAX_TOKENS,
        padding_side="right",
    )


def build_text_encoder(
    tokenizer: PreTrainedTokenizerFast, *, hidden_size: int = 128, layers: int = 2, heads: int = 4
) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=hidden_size,
    )
    return CLIPTextModel(config)


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
    vocabulary = tokenizer.get_vocab()
    found: list[str] = []
    for word in _WORD.findall(prompt.lower()):
        if word not in vocabulary and word not in found:
            found.append(word)
    return found
