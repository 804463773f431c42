"""Image I/O: any PIL-readable file to RGB, the one preprocessing from RGB image to model input, tensors in [-1, 1]
to PIL images and grids people can see."""
from __future__ import annotations

import functools
import io
import math
from pathlib import Path
from typing import IO, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageCms, ImageOps
from torchvision.utils import make_grid

try:  # HEIC/HEIF, the format iPhones save by default: readable through PIL once pillow-heif is registered
    from pillow_heif import register_heif_opener

    register_heif_opener()
    HEIF_READABLE = True
except ImportError:  # an optional requirement: without it such files are reported, with the package to install
    HEIF_READABLE = False
HEIF_SUFFIXES = (".heic", ".heif")

MIN_SIDE = 8  # smaller images carry too little to tokenize; treated as bad input
MIN_TILE = 64  # px: grids are upscaled (nearest) so each image is at least this big...
MIN_GRID_WIDTH = 512  # ...and the grid at least this wide, readable in the MLflow UI without zooming


def load_rgb(source: str | Path | IO[bytes], min_side: int | None = None) -> Image.Image:
    """Open any PIL-readable image (a path or a binary file) as 8-bit RGB, upright: 16-bit scaled down,
    transparency composited on white, and turned by its EXIF orientation the way every viewer shows it (a phone
    stores a portrait photo as landscape pixels plus that tag).

    An embedded ICC profile is applied (`to_srgb`): the pixels come back in sRGB, the colours viewers show.

    ``min_side``: the caller shrinks the image to this shorter side anyway, so it comes back at most that size
    (resized as torchvision's ``resize`` would), and a JPEG decodes at 1/8, 1/4 or 1/2 scale, the smallest that
    keeps both sides at least that long (libjpeg's scaled decoding: a 12-MP photo for a 256-px crop reads ~7x
    faster, the crop within 46 dB of a full decode's; docs/benchmarks.md)."""
    with Image.open(source) as opened:
        img = opened
        if min_side:
            img.draft(None, (min_side, min_side))
        img.load()
        icc = img.info.get("icc_profile")
        ImageOps.exif_transpose(img, in_place=True)
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            # PIL's convert("RGB") clips these at 255 (a float image in [0, 1] comes out black): rescale instead. A
            # 16-bit file uses its whole range; 32-bit integers and floats carry none, so their full scale is the
            # smallest usual one that holds the values (1 for floats, 255, 65535), else their largest value.
            arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
            peak = float(arr.max())
            scales = ((65535.0,) if img.mode.startswith("I;16")
                      else ((1.0,) if img.mode == "F" else ()) + (255.0, 65535.0))
            top = next((t for t in scales if peak <= t), peak)
            img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        if img.mode in ("RGBA", "LA", "PA"):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, rgba)
        if img.mode not in ("RGB", "CMYK"):
            img = img.convert("RGB")
        if min_side and min(img.size) > min_side:
            # the caller's resize, done here, before the colour conversion: Pillow first reduces a large image by a
            # whole factor (reducing_gap=3: "indistinguishable from fair resampling", 51-57 dB from torchvision's
            # resize on photos; 13 ms instead of 31 on 12 MP), and the colour conversion then costs ~3 ms instead of
            # ~230; JPEGs were drafted close to the size already
            img = img.resize(resized_size(img.size, min_side), Image.BILINEAR, reducing_gap=3.0)
        transform = to_srgb(icc, img.mode) if icc else None
        if transform:
            return ImageCms.applyTransform(img, transform)
        # a new image either way: closing the file (the with block) empties the image it opened
        return img.convert("RGB") if img.mode == "CMYK" else img.copy() if img is opened else img


def resized_size(size: tuple[int, int], short_side: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``short_side``, the longer in proportion, rounded down: the size
    torchvision's ``resize(img, short_side)`` gives, so that resizing it again there changes nothing."""
    w, h = size
    return (short_side, int(short_side * h / w)) if w <= h else (int(short_side * w / h), short_side)


@functools.lru_cache(maxsize=32)
def to_srgb(icc: bytes, mode: str) -> "ImageCms.ImageCmsTransform | None":
    """The colour transform from an image's embedded ICC profile to sRGB (what viewers show, and what a PNG
    without a profile means), or None where it changes nothing or the profile is unusable. Wide-gamut photos
    (iPhones' Display P3, cameras' Adobe RGB) would otherwise be read as sRGB numbers, duller than they look, and
    a CMYK file's colours would be PIL's naive inversion. One transform per profile (photos share a few), and
    none for the many files that embed sRGB itself."""
    try:
        transform = ImageCms.buildTransform(ImageCms.ImageCmsProfile(io.BytesIO(icc)), _SRGB, mode, "RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None  # a broken or mismatched profile (a grey one on a colour image): viewers ignore it, so do we
    if mode == "RGB":
        probe = Image.fromarray(np.stack(np.meshgrid(*[np.arange(0, 256, 17, dtype=np.uint8)] * 3), -1)
                                .reshape(64, 64, 3))
        moved = np.abs(np.asarray(ImageCms.applyTransform(probe, transform), dtype=np.int16) - np.asarray(probe))
        if moved.max() <= 1:  # sRGB under another name: skip a no-op that costs ~15 ms per megapixel
            return None
    return transform


_SRGB = ImageCms.createProfile("sRGB")


def to_input(img: Image.Image) -> torch.Tensor:
    """An RGB image as the models take it: (3, H, W) float in [-1, 1]. The bytes are reordered before they become
    floats, and scaled in place: bit for bit ``Normalize(0.5, 0.5)(ToTensor()(img))``, at a sixth of its time."""
    return TF.pil_to_tensor(img).contiguous().float().div_(127.5).sub_(1.0)


def center_square(img: Image.Image, size: int) -> Image.Image:
    """How an image of any shape is seen at ``size`` px outside training (val split, quantize, evaluate, the
    served tokenizer): shorter side resized to ``size`` (antialiased), then the centre square; nothing squashed."""
    return TF.center_crop(TF.resize(img, size, antialias=True), size)


def shorter_sides(paths: Sequence[str | Path], sample: int = 256) -> list[int]:
    """The shorter side of up to ``sample`` of ``paths``, evenly spaced, read from their headers (no pixel is
    decoded: the cost does not grow with the dataset); unreadable files are left out."""
    sides = []
    for p in list(paths)[:: max(1, len(paths) // sample)][:sample]:
        try:
            with Image.open(p) as img:
                sides.append(min(img.size))  # an EXIF turn swaps the sides, not the shorter one
        except Exception:  # noqa: BLE001 - the image check reports bad files; this is a survey
            continue
    return sides


def check_image(path: str | Path) -> str | None:
    """None if the file is a usable image, else a short reason."""
    p = Path(path)
    if not p.is_file():
        return "missing"
    try:
        with Image.open(p) as img:
            img.verify()  # PNG: every chunk's checksum, pixels included; JPEG and the other formats: nothing...
            size, verified = img.size, img.format == "PNG"
        if not verified:
            with Image.open(p) as img:
                # ...so decode them: a JPEG cut short fails only when its pixels are read. JPEGs decode at 1/8
                # scale (draft: still every byte of the stream), about half the time of a full read.
                img.draft(None, (MIN_SIDE, MIN_SIDE))
                img.load()
    except Image.DecompressionBombError:  # PIL's guard against files that expand to gigabytes
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        return f"too large: over {limit:,} pixels, more than PIL opens (a decompression-bomb guard); downscale it"
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt files
        if p.suffix.lower() in HEIF_SUFFIXES and not HEIF_READABLE:
            return "unreadable: HEIC/HEIF needs pillow-heif (pip install pillow-heif)"
        return "unreadable: truncated" if "truncated" in str(exc) else f"unreadable: {type(exc).__name__}"
    if min(size) < MIN_SIDE:
        return f"too small: {size[0]}x{size[1]}, need at least {MIN_SIDE}x{MIN_SIDE}"
    return None


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (B,3,H,W) to uint8."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def to_pil(image: torch.Tensor) -> Image.Image:
    """One [-1, 1] image (3,H,W) to PIL."""
    return Image.fromarray(to_uint8(image[None])[0].permute(1, 2, 0).numpy())


def grid_image(images: torch.Tensor, nrow: int = 8, captions: Sequence[str] | None = None,
               row_names: Sequence[str] | None = None) -> Image.Image:
    """A PIL grid of [-1, 1] images (B,3,H,W), ``nrow`` per row, upscaled (nearest: pixels stay sharp) so a tile
    is at least ``MIN_TILE`` px and the grid at least ``MIN_GRID_WIDTH`` px wide; ``captions`` are written under
    each tile (e.g. class names), ``row_names`` to the left of each row (e.g. original / reconstruction)."""
    images = to_uint8(images)
    h, w = images.shape[-2:]
    cols = min(nrow, len(images))
    scale = max(1, math.ceil(MIN_TILE / min(h, w)), math.ceil(MIN_GRID_WIDTH / (cols * w)))
    if scale > 1:
        images = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    grid = Image.fromarray(make_grid(images, nrow=nrow, padding=2, pad_value=255).permute(1, 2, 0).numpy())
    if not captions and not row_names:
        return grid
    from PIL import ImageDraw, ImageFont

    th, tw = h * scale + 2, w * scale + 2  # tile pitch in the grid
    # text in proportion to the tiles, so it stays readable in MLflow's 256-px previews of the grid
    font = ImageFont.load_default(size=max(14, th // 6))
    caption_h = font.size + 4 if captions else 0
    left = 8 + max((int(font.getlength(n)) for n in row_names), default=0) if row_names else 0
    rows = math.ceil(len(images) / nrow)
    out = Image.new("RGB", (grid.width + left, rows * (th + caption_h) + 2), "white")
    draw = ImageDraw.Draw(out)
    for r in range(rows):  # paste each row of tiles, leaving room for its captions below
        out.paste(grid.crop((0, r * th, grid.width, (r + 1) * th + 2)), (left, r * (th + caption_h)))
        if row_names and r < len(row_names):
            draw.text((4, r * (th + caption_h) + th // 2), row_names[r], fill="black", font=font, anchor="lm")
    for i, text in enumerate(captions or ()):
        r, c = divmod(i, nrow)
        draw.text((left + c * tw + tw // 2, r * (th + caption_h) + th + 1), str(text), fill="black", font=font,
                  anchor="mt")
    return out


def comparison_grid(originals: torch.Tensor, reconstructions: torch.Tensor, per_row: int = 4) -> Image.Image:
    """Originals over their reconstructions, ``per_row`` pairs per block, rows labelled. Near-square, so it stays
    legible in the MLflow UI's 256-px image previews (a single wide strip shrinks to a sliver)."""
    rows, names = [], []
    for lo in range(0, len(originals), per_row):
        rows += [originals[lo:lo + per_row], reconstructions[lo:lo + per_row]]
        names += ["original", "reconstruction"]
    return grid_image(torch.cat(rows), nrow=min(per_row, len(originals)), row_names=names)
