"""make-manifest: scan a folder of images into the CSV manifest that train-vqvae and quantize read."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import click
import pandas as pd

from core.data import check_images, hash_split, remember_verified, resolve_paths, verified_cache
from core.errors import UserError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".avif",
                    ".heic", ".heif", ".ppm", ".pgm", ".pbm", ".pnm", ".tga"}
SHOW_SKIPPED = 5  # names of skipped files listed in the report


def find_images(root: Path) -> tuple[list[Path], list[Path]]:
    """Files under ``root`` (recursively) with an image extension, in sorted order, and those of them left out
    because they or a folder above them are hidden (a name starting with '.'): not the user's pictures, but what
    copying leaves behind, such as macOS's ``._photo.jpg`` resource forks or a ``.thumbnails`` cache."""
    found, walked = [], set()
    # symlinked folders are followed (a dataset's class folders are often links into a store); each real folder
    # once, so that a link back up the tree ends the walk instead of looping
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in walked:
            subfolders.clear()
            continue
        walked.add(real)
        found += [Path(folder, n) for n in names if Path(n).suffix.lower() in IMAGE_EXTENSIONS]
    found = sorted(p for p in found if p.is_file())
    is_hidden = [any(part.startswith(".") for part in p.relative_to(root).parts) for p in found]
    return ([p for p, h in zip(found, is_hidden) if not h], [p for p, h in zip(found, is_hidden) if h])


def build_manifest(root: str | Path, out: str | Path, labels_from_folders: bool = False,
                   val_fraction: float = 0.1) -> tuple[pd.DataFrame, list[tuple[str, str]], list[Path]]:
    """(manifest rows, skipped (path, reason) pairs, hidden files left out); paths are relative to ``out``'s
    folder, with '/'."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"image folder not found: {root}")
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; pass the folder that holds the images")
    files, hidden = find_images(root)
    if not files:
        raise UserError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {root}"
                        + (f" outside hidden files and folders ({len(hidden)} there, first: {hidden[0]})"
                           if hidden else ""))
    reasons = check_images(files)
    base = Path(out).resolve().parent  # as read_manifest resolves the manifest's folder: '..' from it is exact
    rows, skipped = [], []
    for path, reason in zip(files, reasons):
        # abspath, not resolve: a symlinked image is listed where the user put it, under its class folder
        rel = Path(os.path.relpath(os.path.abspath(path), base)).as_posix()
        if reason:
            skipped.append((rel, reason))
            continue
        row = {"image_path": rel}
        if labels_from_folders:
            parts = path.relative_to(root).parts
            row["label"] = parts[0] if len(parts) > 1 else ""  # files directly in DIR have no class folder
        row["split"] = hash_split(rel, val_fraction)  # the key read_manifest hashes: the path as written
        rows.append(row)
    if not rows:
        raise UserError(f"none of the {len(files)} image files under {root} could be read, first: "
                        + "; ".join(f"{p} ({r})" for p, r in skipped[:SHOW_SKIPPED]))
    return pd.DataFrame(rows).sort_values("image_path", kind="stable").reset_index(drop=True), skipped, hidden


def write_atomic(df: pd.DataFrame, out: Path) -> None:
    """Write the CSV to a temp file beside ``out`` then rename, so a failure never leaves a partial manifest."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as exc:
        raise UserError(f"cannot write to output folder {out.parent}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            df.to_csv(fh, index=False)
        os.replace(tmp, out)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"cannot write manifest {out}: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@click.command("make-manifest")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="CSV file to write (image paths are stored relative to its folder).")
@click.option("--labels-from-folders", is_flag=True,
              help="Label each image with its first sub-folder name under DIRECTORY.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True,
              help="Share of images put in the 'val' split (a deterministic hash of the path).")
def make_manifest_command(directory: Path, out: Path, labels_from_folders: bool, val_fraction: float) -> None:
    """Scan DIRECTORY recursively for images and write a manifest CSV (prints its path last).

    Unreadable or too-small images are skipped and reported on stderr; hidden files and folders (a name starting
    with '.') are left out.
    """
    df, skipped, hidden = build_manifest(directory, out, labels_from_folders, val_fraction)
    write_atomic(df, out)
    paths = resolve_paths(out, df["image_path"])  # as a stage will read them
    if all(os.path.isfile(p) for p in paths):  # the files just checked (a stat each): no stage checks them again
        with contextlib.suppress(UserError):  # no cache folder: the stages check the images themselves
            remember_verified(verified_cache(out, paths), [None] * len(df))
    n_val = int((df["split"] == "val").sum())
    msg = f"wrote {len(df)} images ({len(df) - n_val} train, {n_val} val"
    if labels_from_folders:
        unlabeled = int((df["label"] == "").sum())
        msg += f", {df.loc[df['label'] != '', 'label'].nunique()} labels"
        msg += f", {unlabeled} unlabeled in the top folder" if unlabeled else ""
    click.echo(msg + f") to {out}", err=True)
    if skipped:
        first = "; ".join(f"{p} ({r})" for p, r in skipped[:SHOW_SKIPPED])
        click.echo(f"skipped {len(skipped)} unreadable image files, first: {first}", err=True)
    if hidden:
        click.echo(f"left out {len(hidden)} hidden files (a name starting with '.' in their path), first: "
                   f"{hidden[0].relative_to(directory).as_posix()}", err=True)
    click.echo(str(out.resolve()))
