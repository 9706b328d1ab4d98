"""A word-level tokenizer built locally with `tokenizers` (no hub access exists to fetch Gemma's).

Ids follow Gemma's special-token layout (<pad>=0, <eos>=1, <bos>=2, <unk>=3) and a BOS
token is prepended like Gemma's tokenizer does, so pipelines see the same structure.
"""

from __future__ import annotations

import re

SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")
WORD = re.compile(r"\w+|[^\w\s]+")


def build_word_tokenizer(texts: list[str], vocab_size: int):
    """Vocabulary = specials + every lowercase word/punctuation run in `texts`, in first-seen order."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for text in texts:
        for word in WORD.findall(text.lower()):
            vocab.setdefault(word, len(vocab))
    if len(vocab) > vocab_size:
        raise ValueError(f"word vocabulary has {len(vocab)} entries, more than the text encoder's vocab_size {vocab_size}")
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return tok


def hf_tokenizer(tokenizer):
    """Wrap a `tokenizers.Tokenizer` as a transformers tokenizer (what diffusers pipelines take)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
