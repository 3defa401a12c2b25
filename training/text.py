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
