"""Prompt tokenization for Gemma-style text encoders with `tokenizers` alone (no transformers).

Reproduces diffusers' Sana prompt handling: the complex human instruction is prepended to
each prompt, the text encoder sees instruction + prompt padded to
`len(instruction tokens) + max_sequence_length - 2`, and the embedding keeps token 0 plus the
last `max_sequence_length - 1` positions.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np


class PromptTokenizer:
    def __init__(self, tokenizer_file: str | Path, max_sequence_length: int, instruction: list[str] | None):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(tokenizer_file))
        self._tok.no_padding()
        self._tok.no_truncation()
        self.max_sequence_length = max_sequence_length
        self.instruction = "\n".join(instruction) if instruction else ""
        pad = self._tok.token_to_id("<pad>")
        self.pad_id = 0 if pad is None else pad
        n_chi = len(self._tok.encode(self.instruction).ids) if self.instruction else 0
        self.prompt_length = n_chi + max_sequence_length - 2 if self.instruction else max_sequence_length

    def encode(self, prompts: list[str], with_instruction: bool) -> tuple[np.ndarray, np.ndarray]:
        """-> input_ids, attention_mask, each [B, L] int64, right-padded/truncated to L."""
        length = self.prompt_length if with_instruction and self.instruction else self.max_sequence_length
        texts = [self.instruction + p if with_instruction else p for p in prompts]
        ids = np.full((len(texts), length), self.pad_id, np.int64)
        mask = np.zeros((len(texts), length), np.int64)
        for i, enc in enumerate(self._tok.encode_batch(texts)):
            n = len(enc.ids)
            if n > length:
                warnings.warn(
                    f"Prompt {i} has {n} tokens{' with the instruction' if with_instruction else ''}; the text "
                    f"encoder takes {length} (max_sequence_length={self.max_sequence_length}): truncated to "
                    f"{length} tokens: {prompts[i][:60]!r}…",
                    stacklevel=3,
                )
                n = length
            # truncation keeps the first tokens, like transformers' truncation=True (right side)
            ids[i, :n] = enc.ids[:n]
            mask[i, :n] = 1
        return ids, mask

    def select(self, hidden: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keep token 0 and the last max_sequence_length - 1 positions (Sana paper, section 3.1)."""
        index = [0] + list(range(hidden.shape[1] - self.max_sequence_length + 1, hidden.shape[1]))
        return hidden[:, index], mask[:, index]
