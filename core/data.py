"""Manifests, the image dataset, and a resumable sharded sampler shared by both training stages."""
from __future__ import annotations

import hashlib
import os
import random
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pandas as pd
import torch
import torchvision.transforms.functional as TF
from torch.utils.data import Dataset, DistributedSampler

from core.errors import UserError
from core.images import center_square, check_image, load_rgb, to_input
from core.runtime import usable_cores

SPLITS = ("train", "val")
VERIFY_CHUNK = 1024  # images checked per batch of thread-pool tasks


def hash_split(key: str, val_fraction: float) -> str:
    """Deterministic split: the same path lands in the same split on every machine and run."""
    h = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2**64
    return "val" if h < val_fraction else "train"


def read_manifest(path: str | Path, val_fraction: float = 0.1, skip_bad_images: bool = False,
                  check_files: bool = True) -> tuple[pd.DataFrame, int]:
    """Load and validate a manifest.

    Returns (frame, skipped): columns ``image_path`` (absolute), ``label`` (string or <NA>), ``split``,
    ``key`` (the path as written, used for the hash split); ``skipped`` counts bad images dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"manifest not found: {path}")
    with open(path, "rb") as f:
        # a UTF-16 byte-order mark: a spreadsheet's "Unicode Text" (tab-separated); UTF-8's own mark pandas skips
        encoding = "utf-16" if f.read(2) in (b"\xff\xfe", b"\xfe\xff") else "utf-8"
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding=encoding)
        # one column whose name holds ';' or a tab: a spreadsheet's export in a locale whose lists use ';', or TSV
        sep = next((c for c in ";\t" if c in df.columns[0]), None) if len(df.columns) == 1 else None
        if sep:
            df = pd.read_csv(path, dtype=str, keep_default_na=False, sep=sep, encoding=encoding)
    except UnicodeDecodeError:
        # e.g. a spreadsheet's plain "CSV" on Windows (cp1252): guessing the code page would misname the files
        raw = path.read_bytes()
        try:
            raw.decode(encoding)
            at = ""
        except UnicodeDecodeError as exc:  # pandas' own error counts within a chunk: find the line here
            line = raw[:exc.start].count(b"\n") + 1
            at = f" (line {line}: byte 0x{raw[exc.start]:02x})"
        raise UserError(f"manifest {path} is not {encoding.upper()} text{at}; save it as UTF-8 (a spreadsheet's "
                        "\"CSV UTF-8\")") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        if isinstance(exc, pd.errors.EmptyDataError):
            raise UserError(f"manifest {path} is empty; it needs a header row with image_path and one row "
                            "per image") from None
        raise UserError(f"cannot parse manifest {path} as CSV: {str(exc).splitlines()[0]}") from None
    names = [str(c).strip().lower().replace(" ", "_") for c in df.columns]  # "Image Path", " label" ...
    if len(set(names)) == len(names):
        df.columns = names
    if "image_path" not in df.columns:
        raise UserError(f"manifest {path} has no 'image_path' column (columns: {', '.join(df.columns) or 'none'}); "
                        "add one listing the image files")
    df = df[df["image_path"].str.strip() != ""].reset_index(drop=True)
    if df.empty:
        raise UserError(f"manifest {path} lists no images")
    base = path.resolve().parent
    here = [as_written_here(base, p) for p in df["image_path"]]
    # one path written two ways ("a.png", "./a.png", absolute; two CSVs joined) is a duplicate too: it would be
    # trained on twice, and could land in both splits (the split hashes the path as written). Compared as written,
    # not through symlinks: a link to an image under another class folder is that class's image as well.
    named = [os.path.normpath(base / p) for p in here]
    dup = pd.Series(named).duplicated()
    if dup.any():
        first = df["image_path"][dup.values].iloc[0]
        again = df["image_path"][[p == named[int(dup.values.argmax())] for p in named]].tolist()
        written = f"{first}" if len(set(again)) == 1 else " and ".join(dict.fromkeys(again))
        raise UserError(f"manifest {path} lists {int(dup.sum())} duplicate image paths (first: {written}); "
                        "remove the repeated rows")
    out = pd.DataFrame({
        "key": df["image_path"],
        "image_path": resolve_paths(path, here),  # as_written_here again: a no-op on its own output
        # NFC: macOS names files (and so make-manifest's folder labels) in decomposed Unicode, people type composed
        # characters; "dögs" either way is one class
        "label": (df["label"].astype(str).str.strip().str.normalize("NFC").replace("", pd.NA)
                  if "label" in df.columns else pd.NA),
    })
    if "split" in df.columns:
        split = df["split"].str.strip().str.lower()
        bad = ~split.isin(SPLITS)
        if bad.any():
            raise UserError(f"manifest {path} has split value {df['split'][bad].iloc[0]!r}; use 'train' or 'val'")
        out["split"] = split.values
    else:
        out["split"] = [hash_split(k, val_fraction) for k in out["key"]]
    skipped = 0
    if check_files:
        reasons = verified_reasons(path, out["image_path"].tolist())
        bad = [(p, r) for p, r in zip(out["key"], reasons) if r]
        if bad and not skip_bad_images:
            first = "; ".join(f"{p} ({r})" for p, r in bad[:3])
            key, reason = bad[0]
            why = missing_because(key, base) if reason == "missing" else None
            if why:
                raise UserError(f"{len(bad)} of {len(out)} images are missing, first: {first}; {why}")
            raise UserError(f"{len(bad)} of {len(out)} images are missing or unusable, first: {first}; "
                            "fix the manifest or pass --skip-bad-images")
        if bad:
            out = out[[r is None for r in reasons]].reset_index(drop=True)
            skipped = len(bad)
            if out.empty:
                raise UserError(f"all {skipped} images in manifest {path} are missing or unusable")
    if not (out["split"] == "train").any():
        raise UserError(f"manifest {path} has no training images (every row is split 'val')")
    return out, skipped


def missing_because(key: str, base: Path) -> str | None:
    """Why a manifest's path as written finds no file, when the way it is written tells, with the fix."""
    if not Path(key).is_absolute() and Path(key).is_file():  # relative to where the user runs commands
        return (f"relative paths are read from the manifest's folder {base}, but {key} exists from the current "
                "folder: write the paths relative to the manifest, or absolute")
    if re.match(r"^[a-z][a-z0-9+.-]*://", key, re.I):
        return f"{key} is a URL, and images are read from files: download them and list their paths"
    if re.match(r"^([A-Za-z]:)?\\\\|^[A-Za-z]:[\\/]", key) and os.sep == "/":
        return (f"{key} is a Windows path: write the paths relative to the manifest's folder (with / or \\), or as "
                "they are on this machine")
    return None


def resolve_paths(manifest: str | Path, written: Iterable[str]) -> list[str]:
    """A manifest's image paths as written (absolute, or relative to the manifest's folder; `as_written_here`)
    made absolute."""
    base = Path(manifest).resolve().parent
    return [str((base / as_written_here(base, p)).resolve()) for p in written]  # an absolute p stays itself


def as_written_here(base: Path, path: str) -> str:
    """A manifest's path as this machine names it: ``~`` expanded, and a relative path written with Windows'
    backslashes (``cats\\01.png``, a manifest made on Windows) with slashes, where no file has that literal name."""
    if path.startswith("~") and not (base / path).exists():
        return os.path.expanduser(path)  # no shell expanded it: "~/photos/a.jpg" typed into a spreadsheet
    if "\\" in path and os.sep == "/" and not Path(path).is_absolute() and not (base / path).exists():
        return path.replace("\\", "/")
    return path


def cache_dir(*parts: str) -> Path:
    """This toolkit's cache folder (``$TAMING_CACHE_DIR``, else ``$XDG_CACHE_HOME/taming-mlflow``, else
    ``~/.cache/taming-mlflow``), or a folder below it; created on first use."""
    root = os.environ.get("TAMING_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                          "taming-mlflow")
    folder = Path(root, *parts)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a container's read-only or missing home, a full disk
        raise UserError(f"cannot create the cache folder {folder} ({exc.strerror}); set TAMING_CACHE_DIR to a "
                        "writable folder") from None
    return folder


def manifest_fingerprint(manifest: str | Path, image_paths: list[str]) -> str:
    """What a manifest's data is: a hash of the manifest's bytes and every image's size and modification time.
    Two manifests with the same fingerprint hold the same images (a stat per file, no image is opened); a
    changed, added or removed image changes it."""
    h = hashlib.sha256(Path(manifest).read_bytes())
    for p in image_paths:
        try:
            st = os.stat(p)
            h.update(f"\0{p}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        except OSError:
            h.update(f"\0{p}\0missing".encode())
    return h.hexdigest()[:32]


def data_fingerprint(manifest: str | Path) -> str:
    """`manifest_fingerprint` of a manifest file (its rows read, no image opened): what runs are tagged with
    (``data_fingerprint``) so that a pipeline reuses a run only for the same data, wherever the manifest lives."""
    df, _ = read_manifest(manifest, check_files=False)
    return manifest_fingerprint(manifest, df["image_path"].tolist())


def check_images(paths: list) -> list[str | None]:
    """`check_image` of each path, on 8 threads, a chunk at a time: ``pool.map`` holds a future for every item it
    is given, about 1.5 KB each, which a million-image folder would turn into gigabytes. Beyond one chunk, a
    progress bar on stderr: decoding a million photos takes minutes, which must not look like a hang."""
    from tqdm import tqdm

    reasons: list[str | None] = []
    with ThreadPoolExecutor(8) as pool, tqdm(total=len(paths), desc="checking images", unit="img",
                                             disable=len(paths) <= VERIFY_CHUNK, file=sys.stderr) as bar:
        for lo in range(0, len(paths), VERIFY_CHUNK):
            reasons += pool.map(check_image, paths[lo:lo + VERIFY_CHUNK])
            bar.update(min(VERIFY_CHUNK, len(paths) - lo))
    return reasons


def verified_cache(manifest: str | Path, image_paths: list[str]) -> Path:
    """The file under `cache_dir` that holds `verified_reasons` of this manifest's content, keyed by
    `manifest_fingerprint` (a stat per image)."""
    return cache_dir("verified") / f"{manifest_fingerprint(manifest, image_paths)}.json"


def verified_reasons(manifest: str | Path, image_paths: list[str]) -> list[str | None]:
    """`check_image` of every image (None: usable), computed once per manifest content: the result is cached
    (`verified_cache`), so later stages on the same data open no image."""
    import json

    try:
        cached = verified_cache(manifest, image_paths)
    except UserError:
        return check_images(image_paths)  # no cache folder: a speed-up lost, nothing else (quantize needs one)
    if cached.is_file():
        try:
            bad = {int(k): str(v) for k, v in json.loads(cached.read_text()).items()}
            return [bad.get(i) for i in range(len(image_paths))]
        except (ValueError, AttributeError):
            pass  # a damaged cache entry: verify again
    reasons = check_images(image_paths)
    remember_verified(cached, reasons)
    return reasons


def remember_verified(cached: Path, reasons: list[str | None]) -> None:
    """Write ``reasons`` (`check_image` of each image) to ``cached`` (a `verified_cache` file): also done by
    make-manifest, whose images were just checked, so the first stage on its manifest decodes none again."""
    import json

    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({i: r for i, r in enumerate(reasons) if r}))
        os.replace(tmp, cached)
    except OSError:  # a full or read-only disk: the next stage checks the images again, nothing is lost
        tmp.unlink(missing_ok=True)


def read_manifest_on_ranks(rt, path: str | Path, val_fraction: float, skip_bad_images: bool,
                           verify: bool = True) -> tuple[pd.DataFrame, int]:
    """`read_manifest` under torchrun: rank 0 verifies the images; the other ranks read the manifest themselves
    and drop the rows rank 0 found bad (only their positions travel, as a tensor: no image list is pickled).

    The tensor's last element says whether rank 0's verification failed (bad images without --skip-bad-images):
    then every rank stops with rank 0's one-line error, instead of the others waiting in a later collective (on
    other nodes, until its timeout)."""
    if not rt.distributed:
        return read_manifest(path, val_fraction, skip_bad_images, check_files=verify)
    import torch.distributed as dist

    full, _ = read_manifest(path, val_fraction, skip_bad_images, check_files=False)
    keep, failed = torch.ones(len(full) + 1, dtype=torch.uint8), None
    if rt.is_main and verify:
        try:
            df, _ = read_manifest(path, val_fraction, skip_bad_images, check_files=True)
            keep[:-1] = torch.from_numpy(full["image_path"].isin(df["image_path"]).to_numpy().astype(np.uint8))
        except UserError as exc:
            failed, keep[-1] = exc, 0
    keep = keep.to(rt.device)  # NCCL moves GPU tensors only
    dist.broadcast(keep, src=0)
    mask = keep.cpu().numpy().astype(bool)
    if not mask[-1]:  # every rank stops with rank 0's message (a line of text: the one object pickled here)
        box = [str(failed) if failed is not None else None]
        dist.broadcast_object_list(box, src=0)
        raise failed if failed is not None else UserError(box[0])
    return full[mask[:-1]].reset_index(drop=True), int((~mask[:-1]).sum())


def resolve_workers(requested: int | None) -> int:
    """``--num-workers`` as given, or `default_num_workers` when it was not (every stage that loads images)."""
    return default_num_workers() if requested is None else requested


def default_num_workers() -> int:
    """DataLoader workers when ``--num-workers`` is not given: this process's share of the CPU cores it may use
    (`usable_cores`: a container's CPU quota counts; torchrun's ``LOCAL_WORLD_SIZE`` processes share the machine),
    less one for the training loop, at most 8."""
    return max(0, min(8, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1))


def sample_seed(seed: int, rank: int, position: int) -> int:
    """The augmentation seed of the ``position``-th sample this rank draws: different on every rank, and the same
    in a resumed run and in whichever DataLoader worker decodes it."""
    return int(np.random.SeedSequence([seed, rank, position]).generate_state(1, np.uint64)[0] >> 1)


class ImageDataset(Dataset):
    """Images resized on the shorter side and cropped to ``size``: random crop/flip for training, centre for eval.

    Training items are requested as ``(index, seed)`` (see `SeededSampler`): the crop and flip are drawn from
    that seed alone, never from a worker's RNG, so the data a step sees does not depend on the worker count
    or on where a run was resumed.
    """

    def __init__(self, paths: list[str], size: int, train: bool, flip: bool = True) -> None:
        self.paths, self.size, self.train, self.flip = list(paths), size, train, flip

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        i, seed = key if isinstance(key, tuple) else (key, None)
        try:
            img = load_rgb(self.paths[i], min_side=self.size)
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt files
            # The manifest's images were checked before the run, so this one changed since (or was not checked):
            # a line naming it, not a worker's traceback.
            raise UserError(f"cannot read image {self.paths[i]} ({type(exc).__name__}: {exc}); replace the file "
                            "or remove its row from the manifest") from None
        if self.train:
            img = TF.resize(img, self.size, antialias=True)
            rng = random.Random(seed if seed is not None else i)
            top, left = rng.randint(0, img.height - self.size), rng.randint(0, img.width - self.size)
            img = TF.crop(img, top, left, self.size, self.size)
            if self.flip and rng.random() < 0.5:
                img = TF.hflip(img)
        else:
            img = center_square(img, self.size)
        return to_input(img), i


class ResumableSampler(DistributedSampler):
    """An endless DistributedSampler: epoch after epoch, sharded by rank, starting ``start`` samples in.

    Training resumes with exactly the data order it would have had: the order depends only on
    (seed, epoch), and ``start`` = samples this rank already consumed.
    """

    def __init__(self, dataset_len: int, rank: int, world_size: int, seed: int, start: int = 0,
                 shuffle: bool = True) -> None:
        super().__init__(range(dataset_len), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.num_samples)
        while True:
            self.set_epoch(epoch)
            indices = list(super().__iter__())
            yield from indices[offset:]
            epoch, offset = epoch + 1, 0


class SeededSampler(ResumableSampler):
    """`ResumableSampler` yielding ``(index, augmentation seed)`` for `ImageDataset`."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for position, i in enumerate(super().__iter__(), self.start):
            yield i, sample_seed(self.seed, self.rank, position)
