"""What a quantize run's code grids are (its ``vocab.json``), readable without the quantize stage's imports."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class CodeGrids:
    """What a quantize run's code grids are (its ``vocab.json``): codes 0..codebook_size-1 on a grid of
    ``grid_shape``, and the class names in label-id order (empty: unlabelled)."""
    codebook_size: int
    grid_shape: tuple[int, int]
    classes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def code_dtype(self) -> type:
        """Compact integer type for stored code grids."""
        return np.uint16 if self.codebook_size <= 2**16 else np.int32

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def load(cls, path: str | Path, run_id: str | None = None):
        """Read a ``vocab.json`` (of quantize run ``run_id``, for the messages; keys beyond these three, as older
        runs wrote, are ignored); a damaged one is a one-line error."""
        from core.artifacts import damaged, read_json

        name = "vocab.json" if run_id else str(path)
        d = read_json(Path(path), run_id, name, ("codebook_size", "grid_shape", "classes"))
        try:
            grid = tuple(int(s) for s in d["grid_shape"])
            out = cls(int(d["codebook_size"]), grid, tuple(str(c) for c in d["classes"]))
        except (TypeError, ValueError):
            out = None
        if out is None or len(grid) != 2 or min(grid) < 1 or out.codebook_size < 1 or not isinstance(d["classes"], list):
            raise damaged(run_id, name, "does not describe code grids (codebook_size, a 2-number grid_shape, "
                                        "a list of classes)")
        return out
