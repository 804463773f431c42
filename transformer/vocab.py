"""The token vocabulary: code ids first, then SOS, then one token per class — special ids never collide with codes.

Written by `quantize` (vocab.json) and read by `train`/`generate`, so every stage agrees on the layout.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from core.errors import UserError


@dataclass(frozen=True)
class Vocab:
    codebook_size: int
    grid_shape: tuple[int, int]
    image_size: int
    classes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def sos_id(self) -> int:
        """Start token of unconditional sequences, and the null class for classifier-free guidance."""
        return self.codebook_size

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + 1 + self.num_classes

    @property
    def code_dtype(self) -> type:
        """Compact integer type for stored code grids."""
        return np.uint16 if self.codebook_size <= 2**16 else np.int32

    def class_token(self, class_id: int) -> int:
        return self.codebook_size + 1 + class_id

    def class_id(self, label: str) -> int:
        """A label given by name or by class id; unknown labels list the known ones."""
        if label in self.classes:
            return self.classes.index(label)
        if label.lstrip("-").isdigit() and 0 <= int(label) < self.num_classes and str(label) not in self.classes:
            return int(label)
        known = ", ".join(self.classes) if self.classes else "none: the model is unconditional"
        raise UserError(f"unknown label {label!r}; known labels: {known}")

    def to_json(self) -> str:
        d = asdict(self)
        d.update(sos_id=self.sos_id, vocab_size=self.vocab_size,
                 class_to_token={c: self.class_token(i) for i, c in enumerate(self.classes)})
        return json.dumps(d, indent=2)

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        d = json.loads(Path(path).read_text())
        return cls(int(d["codebook_size"]), tuple(d["grid_shape"]), int(d["image_size"]), tuple(d["classes"]))
