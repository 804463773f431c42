"""Image I/O: any PIL-readable file to RGB, tensors in [-1, 1] to PIL images and grids."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

MIN_SIDE = 8  # smaller images carry too little to tokenize; treated as bad input


def load_rgb(path: str | Path) -> Image.Image:
    """Open any PIL-readable image as 8-bit RGB: 16-bit scaled down, transparency composited on white."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            # PIL's convert("RGB") clips 16-bit values at 255; rescale to the full 8-bit range instead.
            arr = np.asarray(img, dtype=np.float64)
            top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
            img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        if img.mode in ("RGBA", "LA", "PA"):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, rgba)
        return img.convert("RGB")


def check_image(path: str | Path) -> str | None:
    """None if the file is a usable image, else a short reason."""
    p = Path(path)
    if not p.is_file():
        return "missing"
    try:
        with Image.open(p) as img:
            img.verify()
            size = img.size
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt files
        return f"unreadable: {type(exc).__name__}"
    if min(size) < MIN_SIDE:
        return f"too small: {size[0]}x{size[1]}, need at least {MIN_SIDE}x{MIN_SIDE}"
    return None


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (B,3,H,W) to uint8."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def to_pil(image: torch.Tensor) -> Image.Image:
    """One [-1, 1] image (3,H,W) to PIL."""
    return Image.fromarray(to_uint8(image[None])[0].permute(1, 2, 0).numpy())


def grid_image(images: torch.Tensor, nrow: int = 8) -> Image.Image:
    """A PIL grid of [-1, 1] images (B,3,H,W)."""
    grid = make_grid(to_uint8(images), nrow=nrow, padding=2, pad_value=255)
    return Image.fromarray(grid.permute(1, 2, 0).numpy())
