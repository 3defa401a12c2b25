"""The Shapes LDM's text side: a word-level tokenizer over the world's vocabulary and a tiny CLIP text encoder.

The tokenizer is a `PreTrainedTokenizerFast` (saved with the pipeline, loaded by `from_pretrained`)
that frames every caption as CLIP does: <|startoftext|> words... <|endoftext|>, padded with
<|endoftext|> to `model_max_length`. Words outside the vocabulary become <|unk|>;
`pipelines.world.text.unknown_words` lists them so the app can warn the user.
"""
from __future__ import annotations

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from training import shapes

BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"
MAX_TOKENS = 24  # longest training caption is 16 words + 2 markers


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


def tokenize(tokenizer, captions: list[str]):
    """(N, model_max_length) token ids of `captions`, padded and cut to the text encoder's length: the one way
    every trainer and evaluation feeds captions to the text encoder."""
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


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


# World 2's new words start from the mean embedding of the words they stand for: the generic "shape" is any of
# the world's forms. Other new words start from the mean of every word.
RELATED_WORDS = {shapes.GENERIC_WORD: shapes.SHAPES + ("person",)}


def grow_text_encoder(text_encoder: CLIPTextModel, tokenizer: PreTrainedTokenizerFast) -> list[str]:
    """Grows a trained text encoder's token table to `tokenizer`, a vocabulary that extends the encoder's own
    with its old ids unchanged (build_tokenizer(shapes.vocabulary_v2())). Old rows stay bit for bit, so every old
    caption encodes exactly as before; each new word's row starts as the mean of its RELATED_WORDS' rows.
    Returns the new words (none when the table is already that size)."""
    import torch

    old_rows = text_encoder.get_input_embeddings().weight.shape[0]
    if len(tokenizer) < old_rows:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, fewer than the encoder's {old_rows}")
    if len(tokenizer) == old_rows:
        return []
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    table = text_encoder.get_input_embeddings().weight
    vocab = tokenizer.get_vocab()
    added = sorted((i, w) for w, i in vocab.items() if i >= old_rows)
    with torch.no_grad():
        words = [i for w, i in vocab.items() if 3 <= i < old_rows]  # after BOS, EOS, UNK
        for index, word in added:
            related = [vocab[w] for w in RELATED_WORDS.get(word, ()) if vocab.get(w, old_rows) < old_rows]
            table[index] = table[related or words].mean(0)
    return [w for _, w in added]
