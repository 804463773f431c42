"""make-manifest: scanning a folder tree into a manifest that training reads."""
from __future__ import annotations

import io
import os
import re
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from core.data import read_manifest
from core.errors import UserError
from core.manifest import build_manifest, make_manifest_command


def run(*args) -> Result:
    return CliRunner().invoke(make_manifest_command, [str(a) for a in args])


def rgb(seed: int, size: int = 12) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Two class folders, one nested two levels, mixed formats, plus a text file and a corrupt PNG."""
    root = tmp_path / "photos"
    (root / "cats" / "indoor").mkdir(parents=True)
    (root / "dogs").mkdir()
    rgb(0).save(root / "cats" / "a.png")
    rgb(1).save(root / "cats" / "indoor" / "b.JPG", format="JPEG")
    rgb(2).convert("L").save(root / "dogs" / "gray.bmp")
    rgb(3).convert("RGBA").save(root / "dogs" / "alpha.png")
    rgb(4).save(root / "top.jpeg", format="JPEG")
    (root / "dogs" / "notes.txt").write_text("not an image")
    (root / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return root


def test_tree_to_manifest(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "meta" / "manifest.csv"  # a folder beside the images: paths go through '..'
    res = run(tree, "--out", out, "--labels-from-folders")
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().splitlines()[-1] == str(out.resolve())
    df = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(df.columns) == ["image_path", "label", "split"]
    assert df["image_path"].tolist() == sorted(df["image_path"])
    assert df["image_path"].tolist() == ["../photos/cats/a.png", "../photos/cats/indoor/b.JPG",
                                         "../photos/dogs/alpha.png", "../photos/dogs/gray.bmp", "../photos/top.jpeg"]
    assert all((out.parent / p).resolve().is_file() for p in df["image_path"])
    assert dict(zip(df["image_path"].str.rsplit("/", n=1).str[-1], df["label"])) == {
        "a.png": "cats", "b.JPG": "cats", "alpha.png": "dogs", "gray.bmp": "dogs", "top.jpeg": ""}
    assert set(df["split"]) <= {"train", "val"}
    assert "wrote 5 images" in res.stderr
    assert "skipped 1 unreadable" in res.stderr and "broken.png" in res.stderr
    assert "notes.txt" not in res.output


def test_manifest_is_deterministic_and_trains(tmp_path: Path) -> None:
    root = tmp_path / "many"
    root.mkdir()
    for i in range(100):
        rgb(i, 8).save(root / f"{i:03d}.png")
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    assert run(root, "--out", a, "--val-fraction", "0.3").exit_code == 0
    assert run(root, "--out", b, "--val-fraction", "0.3").exit_code == 0
    assert a.read_text() == b.read_text()
    df = pd.read_csv(a)
    assert "label" not in df.columns
    assert 15 <= (df["split"] == "val").sum() <= 45
    frame, skipped = read_manifest(a, val_fraction=0.3)
    assert len(frame) == 100 and skipped == 0
    # the written split is the one the trainer would derive itself from the paths
    no_split = tmp_path / "no_split.csv"
    df.drop(columns="split").to_csv(no_split, index=False)
    assert read_manifest(no_split, val_fraction=0.3)[0]["split"].tolist() == df["split"].tolist()


def test_missing_dir(tmp_path: Path) -> None:
    res = run(tmp_path / "nope", "--out", tmp_path / "m.csv")
    assert res.exit_code == 1 and "not found" in res.output
    (tmp_path / "file.png").write_bytes(b"")
    res = run(tmp_path / "file.png", "--out", tmp_path / "m.csv")
    assert res.exit_code == 1 and "not a folder" in res.output


def test_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    res = run(tmp_path / "empty", "--out", tmp_path / "m.csv")
    assert res.exit_code == 1 and "no image files" in res.output
    assert not (tmp_path / "m.csv").exists()


def test_unwritable_output_folder(tree: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user (e.g. root) who can write to a read-only folder")
        res = run(tree, "--out", locked / "m.csv")
        assert res.exit_code == 1 and "cannot write to output folder" in res.output
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_failed_write_leaves_no_partial_csv(tree: Path, tmp_path: Path, monkeypatch) -> None:
    """A write that dies half-way (disk full) keeps the previous manifest and leaves no temp file."""
    out = tmp_path / "m.csv"
    out.write_text("image_path\nold.png\n")

    def full_disk(self, fh, **kwargs):
        fh.write("image_path,split\n")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", full_disk)
    res = run(tree, "--out", out)
    assert res.exit_code == 1 and "No space left" in res.output
    assert out.read_text() == "image_path\nold.png\n"
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["m.csv"]


def test_images_are_checked_a_chunk_at_a_time(tree: Path, tmp_path: Path, monkeypatch) -> None:
    """A million-image folder must not queue a future per image: the pool gets at most VERIFY_CHUNK at once, and
    the chunked result is the same manifest, in the same order."""
    import concurrent.futures

    import core.data

    whole, skipped, _ = build_manifest(tree, tmp_path / "m.csv")
    sizes = []
    real_map = concurrent.futures.ThreadPoolExecutor.map

    def recording_map(self, fn, items, *args, **kwargs):
        sizes.append(len(items))
        return real_map(self, fn, items, *args, **kwargs)

    monkeypatch.setattr(core.data, "VERIFY_CHUNK", 2)
    monkeypatch.setattr(concurrent.futures.ThreadPoolExecutor, "map", recording_map)
    chunked, skipped_chunked, _ = build_manifest(tree, tmp_path / "m.csv")
    assert sizes and max(sizes) == 2 and sum(sizes) == len(whole) + len(skipped)
    pd.testing.assert_frame_equal(chunked, whole)
    assert skipped_chunked == skipped


@pytest.mark.parametrize("fmt,options", [("PNG", {}), ("JPEG", {}), ("JPEG", {"progressive": True}), ("WEBP", {}),
                                         ("BMP", {}), ("TIFF", {}), ("GIF", {})])
@pytest.mark.parametrize("keep", [0.5, 0.95])
def test_a_file_cut_short_is_unreadable(tmp_path: Path, fmt: str, options: dict, keep: float) -> None:
    """Whatever the format, a file cut short is caught when the images are checked (JPEG's verify() checks
    nothing: only decoding finds the missing pixels), not by a DataLoader worker mid-training."""
    from core.images import check_image

    whole = tmp_path / f"whole.{fmt.lower()}"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(whole, fmt, **options)
    cut = tmp_path / f"cut.{fmt.lower()}"
    cut.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * keep)])
    assert check_image(whole) is None
    assert check_image(cut).startswith("unreadable"), fmt
    if fmt == "JPEG":
        assert check_image(cut) == "unreadable: truncated"


@pytest.mark.parametrize("orientation,turn", [(1, 0), (3, 2), (6, -1), (8, 1)])
def test_images_load_upright_by_their_exif_orientation(tmp_path: Path, orientation: int, turn: int) -> None:
    """A phone stores a portrait photo as landscape pixels plus an EXIF orientation; every viewer shows it
    turned, and so must training see it (np.rot90 turns counter-clockwise by 90° per step)."""
    from core.images import load_rgb

    stored = np.random.default_rng(orientation).integers(0, 255, (12, 20, 3), dtype=np.uint8)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(tmp_path / "photo.png", exif=exif)
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "photo.png")), np.rot90(stored, turn))


@pytest.mark.parametrize("header,sep,bom,newline,encoding", [("image_path,label,split", ",", False, "\n", "utf-8"),
                                                            ("image_path;label;split", ";", False, "\r\n", "utf-8"),
                                                            ("image_path\tlabel\tsplit", "\t", True, "\n", "utf-8"),
                                                            ("Image Path,Label , Split", ",", True, "\r\n", "utf-8"),
                                                            ("image_path\tlabel\tsplit", "\t", True, "\r\n",
                                                             "utf-16-le"),
                                                            ("image_path,label,split", ",", True, "\n", "utf-16-be")])
def test_manifests_saved_by_a_spreadsheet_read_the_same(tmp_path: Path, header: str, sep: str, bom: bool,
                                                        newline: str, encoding: str) -> None:
    """Spreadsheets save manifests their way: ';' where the locale's lists use commas, tabs, a byte-order mark,
    CRLF line ends, UTF-16 ("Unicode Text"), headers as a person would type them. The rows read are the same."""
    for i in range(3):
        rgb(i).save(tmp_path / f"ä{i}.png")
    rows = [sep.join([f"ä{i}.png", "cat" if i else "dög", "val" if i == 2 else "train"]) for i in range(3)]
    (tmp_path / "m.csv").write_bytes((("\ufeff" if bom else "") + newline.join([header, *rows]) + newline)
                                     .encode(encoding))
    df, _ = read_manifest(tmp_path / "m.csv")
    assert [Path(p).name for p in df.image_path] == ["ä0.png", "ä1.png", "ä2.png"]
    assert df.label.tolist() == ["dög", "cat", "cat"] and df.split.tolist() == ["train", "train", "val"]


def test_a_manifest_in_a_legacy_code_page_says_how_to_save_it(tmp_path: Path) -> None:
    """A spreadsheet's plain "CSV" on Windows is cp1252: its bytes are not UTF-8, and guessing a code page would
    name other files. The error gives the line and the format to save in."""
    rgb(0).save(tmp_path / "a.png")
    (tmp_path / "m.csv").write_bytes("image_path,label\na.png,dog\nb.png,caf\u00e9\n".encode("cp1252"))
    with pytest.raises(UserError, match=r"^manifest .*m\.csv is not UTF-8 text \(line 3: byte 0xe9\); save it as "
                                        r"UTF-8 \(a spreadsheet's \"CSV UTF-8\"\)$"):
        read_manifest(tmp_path / "m.csv")


@pytest.mark.parametrize("min_side,decoded", [(None, (800, 600)), (64, (100, 75)), (100, (200, 150)),
                                              (300, (400, 300)), (700, (800, 600))])
def test_a_large_image_comes_back_at_the_size_the_crop_needs(tmp_path: Path, monkeypatch, min_side,
                                                             decoded) -> None:
    """A crop of ``min_side`` px needs no more pixels than that: a JPEG decodes at 1/8, 1/4 or 1/2 scale (while
    both sides stay at least ``min_side`` long), and every image comes back with its shorter side ``min_side``, the
    size torchvision's resize gives, so the caller's resize changes nothing. A smaller image is left as it is."""
    import torchvision.transforms.functional as TF

    from core.images import load_rgb

    stored = Image.fromarray(np.random.default_rng(0).integers(0, 255, (600, 800, 3), dtype=np.uint8))
    want = TF.resize(stored, min_side).size if min_side and min_side < 600 else (800, 600)
    resized = []  # the size each image had when it was resized: what was decoded
    resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, *a, **k: resized.append(self.size) or resize(self, *a, **k))
    stored.save(tmp_path / "photo.jpg", quality=90)
    stored.save(tmp_path / "photo.png")
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(tmp_path / "turned.jpg", quality=90, exif=exif)
    assert load_rgb(tmp_path / "photo.jpg", min_side).size == want
    assert load_rgb(tmp_path / "photo.png", min_side).size == want
    assert load_rgb(tmp_path / "turned.jpg", min_side).size == want[::-1]
    assert resized == [size for size in (decoded, (800, 600), decoded[::-1]) if min_side and min(size) > min_side]


@pytest.mark.parametrize("seed", range(4))
def test_a_large_image_is_resized_as_torchvision_resizes_it(tmp_path: Path, seed: int) -> None:
    """Random shapes and sides: the size is torchvision's to the pixel (so the later resize is a no-op), and the
    pixels of a large image, reduced by a whole factor first (Pillow's reducing_gap), stay within 45 dB of
    resizing the full image; an image up to three times the side is resized exactly as torchvision does."""
    import torchvision.transforms.functional as TF

    from core.images import load_rgb, resized_size

    rng = np.random.default_rng(seed)
    for _ in range(50):
        w, h, side = int(rng.integers(8, 5000)), int(rng.integers(8, 5000)), int(rng.integers(8, 400))
        assert resized_size((w, h), side) == TF.resize(Image.new("L", (w, h)), side).size, (w, h, side)
    w, h = (int(v) for v in rng.integers(900, 2000, 2))
    smooth = np.asarray(Image.fromarray(rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8))
                        .resize((w, h), Image.BICUBIC))  # photo-like: detail at every scale but the finest
    Image.fromarray(smooth).save(tmp_path / "photo.png")
    for side in (int(rng.integers(32, 100)), int(rng.integers(min(w, h) // 3, min(w, h)))):
        ours = np.asarray(load_rgb(tmp_path / "photo.png", side), dtype=np.float64)
        full = np.asarray(TF.resize(Image.fromarray(smooth), side, antialias=True), dtype=np.float64)
        assert ours.shape == full.shape
        psnr = 10 * np.log10(255 ** 2 / max(((ours - full) ** 2).mean(), 1e-10))
        assert psnr > (45 if side * 3 < min(w, h) else 100), (side, psnr)


def test_phone_and_web_formats_are_found_and_read(tmp_path: Path) -> None:
    """An iPhone's HEIC photos and the web's AVIF/JFIF files are images too: found by make-manifest and read like
    any other (lossy formats, chroma subsampled: within 25 dB of what was saved)."""
    from core.images import HEIF_READABLE, load_rgb

    if not HEIF_READABLE:
        pytest.skip("pillow-heif is not installed (requirements.txt installs it)")
    root = tmp_path / "phone"
    root.mkdir()
    smooth = np.asarray(rgb(5, 6).resize((48, 36), Image.BICUBIC))
    Image.fromarray(smooth).save(root / "IMG_0001.HEIC", quality=95)
    Image.fromarray(smooth).save(root / "download.jfif", format="JPEG", quality=95)
    Image.fromarray(smooth).save(root / "banner.avif", quality=95)
    res = run(root, "--out", tmp_path / "m.csv")
    assert res.exit_code == 0 and "wrote 3 images" in res.stderr and "skipped" not in res.stderr, res.output
    for name in ("IMG_0001.HEIC", "download.jfif", "banner.avif"):
        back = np.asarray(load_rgb(root / name), dtype=float)
        assert back.shape == smooth.shape and 10 * np.log10(255**2 / ((back - smooth) ** 2).mean()) > 25, name


def test_heic_without_pillow_heif_names_the_package(tmp_path: Path, monkeypatch) -> None:
    import core.images

    (tmp_path / "IMG_0002.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))  # not decodable here
    monkeypatch.setattr(core.images, "HEIF_READABLE", False)
    assert core.images.check_image(tmp_path / "IMG_0002.heic") == \
        "unreadable: HEIC/HEIF needs pillow-heif (pip install pillow-heif)"
    monkeypatch.setattr(core.images, "HEIF_READABLE", True)  # installed: a damaged file is just unreadable
    assert core.images.check_image(tmp_path / "IMG_0002.heic").startswith("unreadable: ")
    assert "pillow-heif" not in core.images.check_image(tmp_path / "IMG_0002.heic")


def test_hidden_files_and_folders_are_left_out_and_counted(tree: Path, tmp_path: Path) -> None:
    """What copying a folder leaves behind is not the user's pictures: macOS's '._' resource forks (not images
    at all) and thumbnail caches (real, smaller copies of the photos) are left out, and the count is reported."""
    (tree / "cats" / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tree / ".thumbnails").mkdir()
    rgb(9, 8).save(tree / ".thumbnails" / "a.png")
    res = run(tree, "--out", tmp_path / "m.csv", "--labels-from-folders")
    assert res.exit_code == 0, res.output
    df = pd.read_csv(tmp_path / "m.csv", dtype=str, keep_default_na=False)
    assert not df["image_path"].str.contains("/[.]").any() and set(df["label"]) == {"cats", "dogs", ""}
    assert "wrote 5 images" in res.stderr and "skipped 1 unreadable" in res.stderr  # broken.png, as before
    assert "left out 2 hidden files" in res.stderr and ".thumbnails/a.png" in res.stderr
    only_hidden = tmp_path / "only_hidden"
    (only_hidden / ".cache").mkdir(parents=True)
    rgb(1).save(only_hidden / ".cache" / "x.png")
    res = run(only_hidden, "--out", tmp_path / "n.csv")
    assert res.exit_code == 1 and "outside hidden files and folders (1 there" in res.output, res.output


def test_a_label_is_one_class_however_its_accents_are_encoded(tmp_path: Path) -> None:
    """macOS names folders in decomposed Unicode ("do" + combining diaeresis), people type "dö": the same label,
    one class, which `generate --label` finds either way."""
    import unicodedata

    from transformer.vocab import Vocab

    composed, decomposed = unicodedata.normalize("NFC", "dögs"), unicodedata.normalize("NFD", "dögs")
    assert composed != decomposed
    for i in range(3):
        rgb(i).save(tmp_path / f"a{i}.png")
    (tmp_path / "m.csv").write_text(f"image_path,label\na0.png,{decomposed}\na1.png,{composed}\na2.png,cats\n",
                                    encoding="utf-8")
    df, _ = read_manifest(tmp_path / "m.csv")
    assert df.label.tolist() == [composed, composed, "cats"]
    old_run = Vocab(16, (4, 4), ("cats", decomposed))  # a quantize run made before labels were normalised
    assert old_run.class_id(composed) == old_run.class_id(decomposed) == 1


def test_symlinked_folders_and_files_are_followed_where_they_sit(tmp_path: Path) -> None:
    """Class folders that are links into a store are walked (they used to be skipped, silently); a linked image
    is listed at the link, under its class folder, not at its target; a link back up the tree ends the walk."""
    store, root = tmp_path / "store", tmp_path / "root"
    (store / "cats").mkdir(parents=True)
    (root / "dogs").mkdir(parents=True)
    rgb(0).save(store / "cats" / "a.png")
    rgb(1).save(store / "cats" / "b.png")
    rgb(2).save(root / "dogs" / "c.png")
    (root / "cats").symlink_to(store / "cats", target_is_directory=True)
    (root / "dogs" / "a_too.png").symlink_to(store / "cats" / "a.png")
    (root / "dogs" / "loop").symlink_to(root, target_is_directory=True)
    res = run(root, "--out", tmp_path / "m.csv", "--labels-from-folders")
    assert res.exit_code == 0, res.output
    df = pd.read_csv(tmp_path / "m.csv", dtype=str, keep_default_na=False)
    assert dict(zip(df["image_path"], df["label"])) == {
        "root/cats/a.png": "cats", "root/cats/b.png": "cats", "root/dogs/a_too.png": "dogs", "root/dogs/c.png": "dogs"}
    assert len(read_manifest(tmp_path / "m.csv")[0]) == 4
    # a manifest written through a linked folder: its paths lead out of the real folder, where they are read from
    (tmp_path / "deeper" / "real_meta").mkdir(parents=True)  # not beside the link: '..' leads elsewhere from it
    (tmp_path / "meta").symlink_to(tmp_path / "deeper" / "real_meta", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    res = run(root, "--out", tmp_path / "elsewhere" / ".." / "meta" / "m.csv")
    assert res.exit_code == 0, res.output
    df, _ = read_manifest(tmp_path / "meta" / "m.csv")  # every image found (checked), the links as written
    assert sorted(Path(p).name for p in df.key) == ["a.png", "a_too.png", "b.png", "c.png"]


@pytest.mark.parametrize("mode,values,scale", [("F", (0.0, 1.0), 1.0), ("F", (0.0, 200.0), 255.0),
                                               ("F", (0.0, 4000.0), 65535.0), ("F", (-1.0, 3e5), None),
                                               ("I", (0, 250), 255.0), ("I", (0, 40000), 65535.0),
                                               ("I", (0, 900000), None), ("I;16", (0, 1000), 65535.0)])
def test_scientific_images_keep_their_values_in_8_bits(tmp_path: Path, mode: str, values: tuple, scale) -> None:
    """Float and 32-bit TIFFs (depth maps, sensor data) carry no range: a float image in [0, 1] used to come out
    black, a 32-bit one beyond 16 bits white. Their full scale is the smallest usual one that holds the values
    (None here: their largest value); negative values are black."""
    from core.images import load_rgb

    lo, hi = values
    grid = np.linspace(lo, hi, 12 * 16).reshape(12, 16)
    dtype = {"F": np.float32, "I": np.int32, "I;16": np.uint16}[mode]
    Image.fromarray(grid.astype(dtype), mode if mode != "I;16" else None).save(tmp_path / "x.tif")
    assert Image.open(tmp_path / "x.tif").mode == mode
    got = np.asarray(load_rgb(tmp_path / "x.tif"))
    expected = np.clip(grid.astype(dtype).astype(np.float64) / (scale or hi) * 255 + 0.5, 0, 255).astype(np.uint8)
    assert np.array_equal(got[..., 0], expected) and np.array_equal(got[..., 0], got[..., 2])


def test_an_image_over_pils_pixel_limit_says_so(tmp_path: Path, monkeypatch) -> None:
    """PIL refuses images of more than twice MAX_IMAGE_PIXELS (a decompression-bomb guard): the reason says the
    image is too large and what to do, not the exception's name."""
    from core.images import check_image

    rgb(0, 40).save(tmp_path / "panorama.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 1600 pixels > 2 x 500
    assert check_image(tmp_path / "panorama.png") == \
        "too large: over 1,000 pixels, more than PIL opens (a decompression-bomb guard); downscale it"


@pytest.mark.parametrize("seed", range(4))
def test_model_input_is_torchvisions_to_tensor_and_normalize(seed: int) -> None:
    """`to_input` is torchvision's ToTensor then Normalize(0.5, 0.5), bit for bit, on images of any shape."""
    from torchvision import transforms

    from core.images import to_input

    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(1, 90, 2))
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    expected = transforms.Normalize([0.5] * 3, [0.5] * 3)(transforms.ToTensor()(img))
    got = to_input(img)
    assert got.dtype == expected.dtype and got.is_contiguous() and bool((got == expected).all())


def _s15(x: float) -> bytes:
    return struct.pack(">i", round(x * 65536))


def _icc(device_class: bytes, space: bytes, pcs: bytes, tags: list[tuple[bytes, bytes]]) -> bytes:
    """A minimal ICC v2 profile: header, tag table, tags (each padded to 4 bytes)."""
    text = b"test profile"
    tags = [(b"desc", b"desc" + bytes(4) + struct.pack(">I", len(text) + 1) + text + bytes(1 + 4 + 4 + 2 + 1 + 67)),
            (b"wtpt", b"XYZ " + bytes(4) + _s15(0.9642) + _s15(1.0) + _s15(0.8249)), *tags]
    offset, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for sig, body in tags:
        body += bytes(-len(body) % 4)
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    header = (struct.pack(">I", offset + len(data)) + b"lcms" + struct.pack(">I", 0x02100000) + device_class + space
              + pcs + bytes(12) + b"acsp" + bytes(28) + _s15(0.9642) + _s15(1.0) + _s15(0.8249) + bytes(48))
    return header + struct.pack(">I", len(tags)) + table + data


def rgb_profile(red, green, blue, gamma: float = 2.2) -> bytes:
    """A display profile from three colorants (D50 XYZ) and one gamma for every channel, as Display P3 and Adobe
    RGB are made."""
    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256))
    xyz = [b"XYZ " + bytes(4) + b"".join(_s15(c) for c in v) for v in (red, green, blue)]
    return _icc(b"mntr", b"RGB ", b"XYZ ", [(b"rXYZ", xyz[0]), (b"gXYZ", xyz[1]), (b"bXYZ", xyz[2]),
                                           (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)])


def cmyk_profile(ink_lab: tuple[int, int, int]) -> bytes:
    """A printer profile (a 2-point lut8 to Lab) on white paper whose black ink prints black and whose every
    other ink prints ``ink_lab`` (L*, a*, b*)."""
    def lab(c: int, m: int, y: int, k: int) -> tuple[int, int, int]:
        L, a, b = (0, 0, 0) if k else ink_lab if c or m or y else (100, 0, 0)
        return L * 255 // 100, a + 128, b + 128

    clut = b"".join(bytes(lab(*corner)) for corner in np.ndindex(2, 2, 2, 2))
    ramp = bytes(range(256))
    lut = b"mft1" + bytes(4) + bytes([4, 3, 2, 0]) + b"".join(_s15(float(i % 4 == 0)) for i in range(9)) + \
        ramp * 4 + clut + ramp * 3
    return _icc(b"prtr", b"CMYK", b"Lab ", [(b"A2B0", lut)])


SRGB_D50 = (0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141)


@pytest.mark.parametrize("suffix", [".png", ".tif", ".webp", ".jpg"])
def test_images_are_read_in_the_colours_their_profile_gives(tmp_path: Path, suffix: str) -> None:
    """An embedded ICC profile says what the numbers mean: a wide-gamut photo (an iPhone's Display P3, a camera's
    Adobe RGB) read as sRGB numbers looks duller than in any viewer. Files are converted to sRGB; a file that
    embeds sRGB itself reads unchanged, and so does a file with a broken profile (as viewers show it)."""
    from PIL import ImageCms

    from core.images import load_rgb

    red, green, blue = SRGB_D50
    pixels = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0], [128, 64, 32]]],
                      dtype=np.uint8).repeat(8, 0).repeat(8, 1)  # 8x8 blocks: JPEG keeps flat colours
    image = Image.fromarray(pixels)
    options = {"quality": 100, "subsampling": 0} if suffix == ".jpg" else {"lossless": True}

    def read(name: str, profile: bytes | None) -> np.ndarray:
        image.save(tmp_path / f"{name}{suffix}", icc_profile=profile, **options)
        return np.asarray(load_rgb(tmp_path / f"{name}{suffix}"), dtype=np.int16)[::8, ::8]

    plain = read("plain", None)
    # primaries swapped: what the file calls red is sRGB's green and back, which no rounding can fake
    swapped = read("swapped", rgb_profile(green, red, blue))
    assert np.abs(swapped[0, :5] - plain[0, :5][:, [1, 0, 2]]).max() <= 2, swapped
    assert np.abs(swapped[0, 5] - plain[0, 5][[1, 0, 2]]).max() <= 6, swapped  # gamma 2.2 against sRGB's curve
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    assert np.array_equal(read("srgb", srgb), plain)
    assert np.array_equal(read("broken", srgb[:200]), plain)


@pytest.mark.parametrize("suffix", [".tif", ".jpg"])
def test_a_cmyk_file_is_read_through_its_profile(tmp_path: Path, suffix: str) -> None:
    """Print workflows save CMYK with the press's profile; PIL's own CMYK to RGB is a naive inversion (cyan ink
    as (0, 255, 255) whatever the profile says). Here every ink prints a red: the file reads red."""
    from PIL import ImageCms

    from core.images import load_rgb

    profile = cmyk_profile((50, 60, 40))
    image = Image.new("CMYK", (4, 1))
    image.putdata([(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255), (0, 128, 0, 0)])  # paper, cyan, black, magenta
    image = image.resize((32, 8), Image.NEAREST)
    image.save(tmp_path / f"print{suffix}", icc_profile=profile, quality=100)
    got = np.asarray(load_rgb(tmp_path / f"print{suffix}"), dtype=np.int16)[::8, ::8][0]
    want = np.asarray(ImageCms.profileToProfile(Image.open(tmp_path / f"print{suffix}"), ImageCms.ImageCmsProfile(
        io.BytesIO(profile)), ImageCms.createProfile("sRGB"), outputMode="RGB"), dtype=np.int16)[::8, ::8][0]
    assert np.array_equal(got, want)
    # white paper, black ink black, the cyan ink red as its profile says (PIL alone: (0, 255, 255))
    assert (got[0] >= 250).all() and (got[2] <= 5).all() and got[1, 0] > got[1, 1] + 80, got


def test_a_manifest_written_on_windows(tmp_path: Path) -> None:
    """A manifest made on Windows and used on a Linux machine: relative paths with backslashes name the files they
    mean; an absolute Windows path (a drive letter, a share) cannot, and the error says so."""
    (tmp_path / "cats").mkdir()
    for i in range(2):
        rgb(i).save(tmp_path / "cats" / f"0{i}.png")
    (tmp_path / "m.csv").write_text("image_path,label\r\ncats\\00.png,cat\r\ncats\\01.png,cat\r\n")
    df, _ = read_manifest(tmp_path / "m.csv")
    assert df.image_path.tolist() == [str(tmp_path / "cats" / f"0{i}.png") for i in range(2)]
    for absolute in ("C:\\Users\\me\\cats\\00.png", "\\\\server\\share\\cats\\00.png"):
        (tmp_path / "m.csv").write_text(f"image_path\r\n{absolute}\r\ncats\\01.png\r\n")
        with pytest.raises(UserError, match=rf"{re.escape(absolute)} is a Windows path: write the paths relative"):
            read_manifest(tmp_path / "m.csv")


def test_one_file_written_two_ways_is_a_duplicate(tmp_path: Path) -> None:
    """Two CSVs joined, or a path written as "a.png" and "./a.png": the same file twice, trained on twice and
    possibly in both splits (the split hashes the path as written)."""
    rgb(0).save(tmp_path / "a.png")
    rgb(1).save(tmp_path / "b.png")
    (tmp_path / "m.csv").write_text(f"image_path\na.png\nb.png\n./a.png\n{tmp_path / 'b.png'}\n")
    with pytest.raises(UserError, match=r"lists 2 duplicate image paths \(first: a\.png and \./a\.png\)"):
        read_manifest(tmp_path / "m.csv")


def test_paths_under_home_and_urls(tmp_path: Path, monkeypatch) -> None:
    """A path typed as "~/photos/a.png" (no shell expands a CSV) names the file under the home folder; a URL (a
    dataset's CSV of links) is not downloaded, and the error says so."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "photos").mkdir(parents=True)
    rgb(0).save(tmp_path / "home" / "photos" / "a.png")
    (tmp_path / "m.csv").write_text("image_path\n~/photos/a.png\n")
    df, _ = read_manifest(tmp_path / "m.csv")
    assert df.image_path.tolist() == [str(tmp_path / "home" / "photos" / "a.png")]
    (tmp_path / "m.csv").write_text("image_path\nhttps://example.com/cat.jpg\n~/photos/a.png\n")
    with pytest.raises(UserError, match=r"https://example\.com/cat\.jpg is a URL, and images are read from files"):
        read_manifest(tmp_path / "m.csv")
