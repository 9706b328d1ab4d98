"""A word-level tokenizer built locally with `tokenizers` (no hub access exists to fetch Gemma's).

Ids follow Gemma's special-token layout (<pad>=0, <eos>=1, <bos>=2, <unk>=3) and a BOS
token is prepended like Gemma's tokenizer does, so pipelines see the same structure.
"""

from __future__ import annotations

import re

from diffkiln.errors import DiffkilnError

SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")
WORD = re.compile(r"\w+|[^\w\s]+")


def build_word_tokenizer(texts: list[str], vocab_size: int):
    """Gemma's layout. Vocabulary = specials + every lowercase word/punctuation run in `texts`, in first-seen order."""
    words = (w for text in texts for w in WORD.findall(text.lower()))
    return word_tokenizer(words, vocab_size, SPECIALS, "<bos> $A")


def word_tokenizer(words, vocab_size: int, specials: tuple[str, ...], template: str, unk: str = "<unk>"):
    """A lowercase, whitespace-split WordLevel tokenizer: ids 0.. for `specials`, then each new word of `words`
    in order; `template` is the post-processing (e.g. "<bos> $A"), its special tokens taken from `specials`.
    Stands in for the SentencePiece / BPE vocabularies that cannot be downloaded here."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(specials)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    if len(vocab) > vocab_size:
        raise DiffkilnError(f"word vocabulary has {len(vocab)} entries, more than the text encoder's vocab_size {vocab_size}")
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    used = [t for t in template.split() if t in vocab]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(t, vocab[t]) for t in used])
    return tok
