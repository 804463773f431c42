"""The transformer's token layout, in one place: code ids first (0..K-1, as the tokenizer numbers them), then SOS
(K; also the null class for classifier-free guidance), then one token per class (K+1+c) — special ids never
collide with codes, and the output head covers exactly the K codes.

`TokenLayout` is mixed into both `Vocab` (a quantize run's code grids, read from its ``vocab.json``) and the model's
`GPTConfig`, so every stage and the model agree on it.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import torch
from torch import Tensor

from core.errors import UserError
from vqvae.codegrids import CodeGrids


class TokenLayout:
    """Token ids of a GPT over ``codebook_size`` codes with ``num_classes`` classes (provided by the subclass)."""
    codebook_size: int
    num_classes: int

    @property
    def sos_id(self) -> int:
        """Start token of unconditional sequences, and the null class for classifier-free guidance."""
        return self.codebook_size

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + 1 + self.num_classes

    def class_token(self, c: int | Tensor) -> int | Tensor:
        """Token id of class c (an int or a LongTensor of classes)."""
        bad = (c < 0) | (c >= self.num_classes)
        if bool(bad.any() if isinstance(bad, Tensor) else bad):
            raise ValueError(f"class label out of range [0, {self.num_classes})")
        return self.codebook_size + 1 + c

    def prefix(self, labels: Tensor) -> Tensor:
        """First token of each sequence: the class token of its label, or SOS where the label is -1 (none)."""
        return torch.where(labels >= 0, self.codebook_size + 1 + labels, self.sos_id)


@dataclass(frozen=True)
class Vocab(CodeGrids, TokenLayout):
    """A quantize run's code grids with the token layout the transformer trains and samples with."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_id(self, label: str) -> int:
        """A label given by name or by class id; unknown labels list the known ones."""
        names, wanted = [unicodedata.normalize("NFC", c) for c in self.classes], unicodedata.normalize("NFC", label)
        if wanted in names:  # NFC, as read_manifest stores labels: runs made before that still resolve
            return names.index(wanted)
        if label.isdecimal() and int(label) < self.num_classes:
            return int(label)
        known = ", ".join(self.classes) if self.classes else "none: the model is unconditional"
        raise UserError(f"unknown label {label!r}; known labels: {known}")
