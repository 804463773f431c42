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
    def load(cls, path: str | Path):
        """Read a ``vocab.json`` (keys beyond these three, as older runs wrote, are ignored)."""
        d = json.loads(Path(path).read_text())
        return cls(int(d["codebook_size"]), tuple(int(s) for s in d["grid_shape"]), tuple(d["classes"]))


def open_codes(path: str | Path, what: str | None = None) -> np.ndarray:
    """Code grids (N,h,w) of a ``.npy`` file, memory-mapped read-only: pages are read as rows are used, so
    opening a million grids costs nothing; callers cast the rows they take (``np.asarray(a[idx], np.int64)``).
    A file that is not an integer array (or is cut short) is a one-line error."""
    from core.errors import UserError

    what = what or f"code grids {path}"
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)  # never unpickle objects from a file we did not write
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(f"cannot read {what}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if arr.dtype.kind not in "iu":
        raise UserError(f"{what} must be integers, got {arr.dtype}")
    if arr.ndim != 3:
        raise UserError(f"{what} must have shape (N, height, width), got {arr.shape}")
    return arr
