"""One prompt tokenizer for every family, with `tokenizers` alone (no transformers).

It reproduces what diffusers' pipelines do with their transformers tokenizer: `truncation=True` to the text
encoder's length (the tokenizer's own special tokens, e.g. CLIP's end token, are kept), right padding with the
folder tokenizer's own pad token id (recorded in pipeline.json at build: CLIP pads with its end token, T5 and Gemma
with <pad>), an attention mask, and a warning when a prompt is truncated.

Sana's families also prepend the complex human instruction: the text encoder then sees instruction + prompt padded
to `len(instruction tokens) + max_sequence_length - 2`, and `select` keeps token 0 plus the last
`max_sequence_length - 1` positions.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from diffkiln.errors import DiffkilnError


class PromptTokenizer:
    def __init__(self, tokenizer_file: str | Path, max_sequence_length: int, pad_id: int,
                 instruction: list[str] | None = None, vocab_size: int | None = None):
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(str(tokenizer_file))
            self._cut = Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # tokenizers raises plain Exception for a malformed file
            raise DiffkilnError(f"{tokenizer_file}: not a tokenizers tokenizer.json ({' '.join(str(e).split())[:200]})") from None
        self._tok.no_padding()
        self._tok.no_truncation()
        self._cut.no_padding()
        self.vocab_size = vocab_size  # the text encoder's: an id past it would index out of its embedding
        self.max_sequence_length = max_sequence_length
        self.pad_id = pad_id
        self.instruction = "\n".join(instruction) if instruction else ""
        n_chi = len(self._tok.encode(self.instruction).ids) if self.instruction else 0
        self.prompt_length = n_chi + max_sequence_length - 2 if self.instruction else max_sequence_length

    @classmethod
    def from_settings(cls, tokenizer_file: str | Path, settings) -> PromptTokenizer:
        return cls(tokenizer_file, settings["max_sequence_length"], settings["pad_token_id"],
                   settings.get("complex_human_instruction"), settings.get("text_vocab_size"))

    def encode(self, prompts: list[str], with_instruction: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """-> input_ids, attention_mask, each [B, L] int64, truncated (special tokens kept) and right-padded to L."""
        length = self.prompt_length if with_instruction and self.instruction else self.max_sequence_length
        texts = [self.instruction + p if with_instruction else p for p in prompts]
        self._cut.enable_truncation(max_length=length)
        ids = np.full((len(texts), length), self.pad_id, np.int64)
        mask = np.zeros((len(texts), length), np.int64)
        full = self._tok.encode_batch(texts)
        for i, enc in enumerate(self._cut.encode_batch(texts)):
            if len(full[i].ids) > length:
                warnings.warn(
                    f"Prompt {i} has {len(full[i].ids)} tokens{' with the instruction' if with_instruction else ''}; "
                    f"the text encoder takes {length} (max_sequence_length={self.max_sequence_length}): truncated to "
                    f"{length} tokens: {prompts[i][:60]!r}…",
                    stacklevel=3,
                )
            n = len(enc.ids)
            ids[i, :n] = enc.ids
            mask[i, :n] = 1
        if self.vocab_size is not None and ids.size and ids.max() >= self.vocab_size:
            bad = int(ids.max())
            raise DiffkilnError(f"token {self._tok.id_to_token(bad)!r} has id {bad}, past the text encoder's vocabulary "
                                f"({self.vocab_size}): the engine directory's tokenizer.json does not match its text "
                                "encoder")
        return ids, mask

    def select(self, hidden: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keep token 0 and the last max_sequence_length - 1 positions (Sana paper, section 3.1)."""
        index = [0] + list(range(hidden.shape[1] - self.max_sequence_length + 1, hidden.shape[1]))
        return hidden[:, index], mask[:, index]
