"""Bad input catalogue: every command fails with one line (`Error: ...`, exit 1) and leaves earlier runs untouched.

All cases run in-process against one tiny tokenizer -> quantize -> transformer -> generate chain.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_GPT, TINY_VQ, error_line, invoke, last_line, make_image_set


@pytest.fixture(scope="module")
def chain(vqvae_run) -> dict[str, str]:
    """Run IDs of a finished chain: vq (tokenizer), q (quantize), t (transformer), g (generate)."""
    ids = {"vq": vqvae_run}
    for key, args in (("q", ["quantize", "--vqvae-run-id", ids["vq"], "--num-workers", "0"]),
                      ("t", ["train", "--quantize-run-id", "{q}", *TINY_GPT]),
                      ("g", ["generate", "--transformer-run-id", "{t}", "--num-samples", "2"])):
        res = invoke(*[a.format(**ids) for a in args])
        assert res.exit_code == 0, res.output
        ids[key] = last_line(res.stdout)
    return ids


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Bad manifests and images, next to a good image set."""
    d = tmp_path_factory.mktemp("bad")
    good = make_image_set(d, n=12)
    header, *rows = good.read_text().splitlines()
    (d / "nocol.csv").write_text("path,label\nimg/red_000.png,red\n")
    (d / "header_only.csv").write_text("image_path,label\n")
    (d / "zero_bytes.csv").write_text("")
    (d / "duplicates.csv").write_text("\n".join([header, *rows, rows[0]]) + "\n")
    (d / "absolute.csv").write_text("\n".join([header, *rows, f"{d / 'elsewhere' / 'gone.png'},red,train"]) + "\n")
    Image.new("RGB", (1, 1)).save(d / "img" / "dot.png")
    (d / "one_pixel.csv").write_text("\n".join([header, *rows, "img/dot.png,red,train"]) + "\n")
    (d / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (d / "corrupt.csv").write_text("\n".join([header, *rows, "img/corrupt.png,red,train"]) + "\n")
    jpeg = d / "img" / "cut.jpg"  # a download cut short: its header opens, its pixels end early
    Image.open(d / "img" / "red_000.png").convert("RGB").resize((64, 64)).save(jpeg, quality=95)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size * 2 // 3])
    (d / "truncated.csv").write_text("\n".join([header, *rows, "img/cut.jpg,red,train"]) + "\n")
    np.save(d / "flat.npy", np.zeros((2, 4), dtype=np.int64))
    np.save(d / "out_of_range.npy", np.full((1, 8, 8), 99, dtype=np.int64))
    np.save(d / "floats.npy", np.zeros((1, 8, 8), dtype=np.float32))
    return d


def artifact_snapshot(run_id: str) -> dict[str, str]:
    """Every artifact file of a run with its hash, plus the run's status."""
    run = mlflow.MlflowClient().get_run(run_id)
    root = Path(unquote(urlparse(run.info.artifact_uri).path))
    files = {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(root.rglob("*")) if p.is_file()}
    return {"status": run.info.status, **files}


@pytest.fixture(autouse=True)
def chain_untouched(chain):
    """No bad input may alter an existing run: snapshot the chain before each case, compare after."""
    before = {k: artifact_snapshot(r) for k, r in chain.items()}
    yield
    assert {k: artifact_snapshot(r) for k, r in chain.items()} == before


def all_runs() -> list:
    """Runs in the store, every experiment and lifecycle stage included, newest first."""
    from mlflow.entities import ViewType

    client = mlflow.MlflowClient()
    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return client.search_runs(ids, run_view_type=ViewType.ALL, max_results=50000,
                              order_by=["attributes.start_time DESC"])


def run_count() -> int:
    return len(all_runs())


def fails(*args, expect: str, ids: dict[str, str] | None = None, creates_run: bool = False) -> str:
    """Run a command that must fail with one line containing ``expect``; returns that line. A mistake that can be
    seen before any work starts must not leave a run behind (``creates_run``: one found only while working)."""
    before = run_count()
    res = invoke(*[str(a).format(**(ids or {})) for a in args])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output  # not a leaked exception
    line = error_line(res.stderr)
    assert expect in line, line
    if not creates_run:
        assert run_count() == before, f"{args[0]}: a run was created for a mistake checkable up front: {line}"
    else:  # an error after the start: the run it made is marked FAILED, with the error as a tag
        runs = all_runs()
        assert len(runs) == before + 1 and runs[0].info.status == "FAILED", [r.info.status for r in runs[:2]]
        assert runs[0].data.tags["error"] in line
    return line


VQ_ONE_STEP = [*TINY_VQ, "--max-steps", "1"]

# (command line with {placeholders} for files and run IDs, expected fragment of the error)
CASES = {
    "missing manifest": (["train-vqvae", "--manifest", "{d}/nope.csv", *VQ_ONE_STEP], "manifest not found"),
    "no image_path column": (["train-vqvae", "--manifest", "{d}/nocol.csv", *VQ_ONE_STEP], "no 'image_path' column"),
    "manifest with a header only": (["train-vqvae", "--manifest", "{d}/header_only.csv", *VQ_ONE_STEP],
                                    "lists no images"),
    "zero-byte manifest": (["train-vqvae", "--manifest", "{d}/zero_bytes.csv", *VQ_ONE_STEP], "is empty"),
    "duplicate rows": (["train-vqvae", "--manifest", "{d}/duplicates.csv", *VQ_ONE_STEP], "1 duplicate image paths"),
    "absolute path that does not exist": (["train-vqvae", "--manifest", "{d}/absolute.csv", *VQ_ONE_STEP],
                                          "gone.png (missing)"),
    "1x1 image": (["train-vqvae", "--manifest", "{d}/one_pixel.csv", *VQ_ONE_STEP], "dot.png (too small: 1x1"),
    "unreadable image": (["train-vqvae", "--manifest", "{d}/corrupt.csv", *VQ_ONE_STEP], "corrupt.png (unreadable"),
    "truncated JPEG": (["train-vqvae", "--manifest", "{d}/truncated.csv", *VQ_ONE_STEP], "cut.jpg (unreadable: truncated"),
    "image size not divisible": (["train-vqvae", "--manifest", "{d}/manifest.csv", *VQ_ONE_STEP, "--image-size", "17"],
                                 "not divisible by the downsampling factor 2"),
    "resume an unknown run": (["train-vqvae", "--resume", "0123456789abcdef0123456789abcdef"], "not found"),
    "resume a finished run": (["train-vqvae", "--resume", "{vq}"], "already trained to step 4"),
    "resume a run of another stage": (["train-vqvae", "--resume", "{q}", "--max-steps", "9"],
                                      "is a quantize run, but a vqvae run is needed"),
    "quantize an unknown run": (["quantize", "--vqvae-run-id", "0123456789abcdef0123456789abcdef"], "not found"),
    "quantize a run of another stage": (["quantize", "--vqvae-run-id", "{t}"],
                                        "is a transformer run, but a vqvae run is needed"),
    "quantize a missing manifest": (["quantize", "--vqvae-run-id", "{vq}", "--manifest", "{d}/nope.csv"],
                                    "manifest not found"),
    "train on a run of another stage": (["train", "--quantize-run-id", "{vq}", *TINY_GPT],
                                        "is a vqvae run, but a quantize run is needed"),
    "train with n-embd not divisible by n-head": (["train", "--quantize-run-id", "{q}", *TINY_GPT, "--n-head", "3"],
                                                  "--n-embd 32 is not divisible by --n-head 3"),
    "resume a finished transformer": (["train", "--resume", "{t}"], "already trained to step 2"),
    "unknown label": (["generate", "--transformer-run-id", "{t}", "--label", "purple"], "unknown label 'purple'"),
    "top-p zero": (["generate", "--transformer-run-id", "{t}", "--top-p", "0"], "--top-p must be > 0, <= 1"),
    "top-p above one": (["generate", "--transformer-run-id", "{t}", "--top-p", "1.5"], "--top-p must be > 0, <= 1"),
    "negative top-k": (["generate", "--transformer-run-id", "{t}", "--top-k", "-1"], "--top-k must be >= 0"),
    "zero temperature": (["generate", "--transformer-run-id", "{t}", "--temperature", "0"],
                         "--temperature must be > 0"),
    "malformed latent size": (["generate", "--transformer-run-id", "{t}", "--latent-size", "big"],
                              "--latent-size must look like HxW"),
    "unreadable context image": (["generate", "--transformer-run-id", "{t}", "--context-image",
                                  "{d}/img/corrupt.png"], "cannot read --context-image"),
    "missing context image": (["generate", "--transformer-run-id", "{t}", "--context-image", "{d}/nope.png"],
                              "cannot read --context-image"),
    "generate from a run of another stage": (["generate", "--transformer-run-id", "{g}"],
                                             "is a generate run, but a transformer run is needed"),
    "decode a run without code grids": (["decode", "--run-id", "{t}"], "decode needs a generate or quantize run"),
    "decode grids of the wrong shape": (["decode", "--indices", "{d}/flat.npy", "--vqvae-run-id", "{vq}"],
                                        "must have shape (N, height, width), got (2, 4)"),
    "decode ids outside the codebook": (["decode", "--indices", "{d}/out_of_range.npy", "--vqvae-run-id", "{vq}"],
                                        "hold ids 99..99, but the tokenizer has codes 0..31"),
    "decode float grids": (["decode", "--indices", "{d}/floats.npy", "--vqvae-run-id", "{vq}"], "must be integers"),
    "decode a missing indices file": (["decode", "--indices", "{d}/nope.npy", "--vqvae-run-id", "{vq}"],
                                      "indices file not found"),
    # wrong run IDs, wrong-stage run IDs and option combinations for every stage: none may leave a run behind
    "train on an unknown run": (["train", "--quantize-run-id", "0123456789abcdef0123456789abcdef", *TINY_GPT],
                                "not found"),
    "generate from an unknown run": (["generate", "--transformer-run-id", "0123456789abcdef0123456789abcdef"],
                                     "not found"),
    "decode an unknown run": (["decode", "--run-id", "0123456789abcdef0123456789abcdef"], "not found"),
    "decode indices with a tokenizer of another stage": (["decode", "--indices", "{d}/out_of_range.npy",
                                                          "--vqvae-run-id", "{q}"], "but a vqvae run is needed"),
    "decode indices without a tokenizer": (["decode", "--indices", "{d}/out_of_range.npy"],
                                           "--indices needs --vqvae-run-id"),
    "codebook init with FSQ": (["train-vqvae", "--manifest", "{d}/manifest.csv", *VQ_ONE_STEP, "--quantizer", "fsq",
                                "--codebook-init", "kmeans"], "--codebook-init applies to --quantizer vq only"),
    "quantize with a missing image": (["quantize", "--vqvae-run-id", "{vq}", "--manifest", "{d}/absolute.csv"],
                                      "gone.png (missing)"),
    "pipeline on a missing manifest": (["pipeline", "--manifest", "{d}/nope.csv"], "manifest not found"),
    "make-manifest of a missing folder": (["make-manifest", "{d}/nope", "--out", "{d}/m.csv"],
                                          "image folder not found"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_a_one_line_error(case, chain, files):
    args, expect = CASES[case]
    fails(*args, expect=expect, ids={"d": str(files), **chain})


def test_tokenizer_checkpoint_that_does_not_match_its_config(chain, tmp_path):
    """A copy of the tokenizer run whose checkpoint claims a larger codebook than its weights hold."""
    from core.checkpoint import load_checkpoint

    state, _ = load_checkpoint(chain["vq"])
    state["config"]["codebook_size"] = 64
    (tmp_path / "ckpt").mkdir()
    torch.save(state, tmp_path / "ckpt" / "ckpt_a.pt")
    (tmp_path / "ckpt" / "latest.json").write_text(json.dumps({"file": "ckpt_a.pt", "step": state["step"]}))
    client = mlflow.MlflowClient()
    run_id = client.create_run(client.get_run(chain["vq"]).info.experiment_id, tags={"stage": "vqvae"}).info.run_id
    client.log_artifacts(run_id, str(tmp_path / "ckpt"), "checkpoints")
    client.set_terminated(run_id)
    fails("quantize", "--vqvae-run-id", run_id,
          expect=f"tokenizer checkpoint of run {run_id} does not match its config")


def test_out_of_memory_gives_batch_size_advice(chain, dataset, monkeypatch):
    from transformer.model import GPT
    from vqvae.model import VQModel

    def gpu_oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 GiB")

    def cpu_oom(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: not enough memory: "
                           "you tried to allocate 549755813888 bytes.")

    monkeypatch.setattr(VQModel, "forward", gpu_oom)
    fails("train-vqvae", "--manifest", dataset, *VQ_ONE_STEP, "--batch-size", "32",
          expect="out of memory at --batch-size 32; lower --batch-size or use --grad-accum", creates_run=True)
    monkeypatch.setattr(GPT, "forward", cpu_oom)
    fails("train", "--quantize-run-id", chain["q"], *TINY_GPT, "--batch-size", "32",
          expect="out of memory at --batch-size 32; lower --batch-size or use --grad-accum", creates_run=True)


def test_full_disk_while_logging_artifacts(chain, dataset, monkeypatch):
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    def disk_full(self, local_file, artifact_path=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), local_file)

    monkeypatch.setattr(LocalArtifactRepository, "log_artifact", disk_full)
    line = fails("train-vqvae", "--manifest", dataset, *VQ_ONE_STEP, expect="No space left on device", creates_run=True)
    # the first artifact of step 1 (its reconstructions image or its checkpoint) is the one that fails
    assert ("ckpt_a.pt" in line or "step_000001.png" in line) and "free disk space" in line
    monkeypatch.setattr(LocalArtifactRepository, "log_artifacts", disk_full)
    fails("quantize", "--vqvae-run-id", chain["vq"], "--num-workers", "0", expect="No space left on device",
          creates_run=True)


def test_read_only_output_folder(files, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root ignores the mode: fail the write the way it fails for a user

        def denied(*args, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(locked))

        monkeypatch.setattr(tempfile, "mkstemp", denied)
    fails("make-manifest", files / "img", "--out", locked / "m.csv", expect=f"cannot write to output folder {locked}")


def test_a_cache_folder_that_cannot_be_made(chain, files, tmp_path, monkeypatch):
    """A container whose home is read-only or missing (``docker run -u``): the verification cache is a speed-up,
    so make-manifest and training go on without it; quantize's work folder is not, so it stops before its run
    exists, naming the folder and TAMING_CACHE_DIR."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("TAMING_CACHE_DIR", str(blocker / "cache"))
    res = invoke("make-manifest", files / "img", "--out", tmp_path / "m.csv")
    assert res.exit_code == 0, res.output
    res = invoke("train-vqvae", "--manifest", tmp_path / "m.csv", *VQ_ONE_STEP)
    assert res.exit_code == 0, res.output
    fails("quantize", "--vqvae-run-id", chain["vq"], "--num-workers", "0",
          expect=f"cannot create the cache folder {blocker / 'cache' / 'quantize'} (Not a directory); set "
                 "TAMING_CACHE_DIR to a writable folder")


@pytest.mark.parametrize("workers", [0, 1])
def test_image_that_breaks_after_the_check(files, monkeypatch, workers):
    """An image that passed the manifest check and is unreadable when a step loads it (replaced, or on a failing
    disk): one line naming it, from the main process or from a DataLoader worker, and the run marked FAILED."""
    import core.data

    monkeypatch.setattr(core.data, "verified_reasons", lambda manifest, paths: [None] * len(paths))
    line = fails("train-vqvae", "--manifest", files / "corrupt.csv", *VQ_ONE_STEP, "--num-workers", workers,
                 expect=f"cannot read image {(files / 'img' / 'corrupt.png').resolve()} (UnidentifiedImageError",
                 creates_run=True)
    assert "Traceback" not in line and "DataLoader" not in line and line.endswith("remove its row from the manifest")


def test_paths_written_from_the_current_folder(files, tmp_path, monkeypatch):
    """A manifest in a sub-folder whose paths were written from where the user runs commands: the line says
    which folder relative paths are read from, and that the files exist from here."""
    monkeypatch.chdir(files)
    (files / "meta").mkdir(exist_ok=True)
    (files / "meta" / "m.csv").write_text("image_path\nimg/red_000.png\nimg/blue_001.png\n")
    fails("train-vqvae", "--manifest", "meta/m.csv", *VQ_ONE_STEP,
          expect=f"relative paths are read from the manifest's folder {files.resolve() / 'meta'}, but "
                 "img/red_000.png exists from the current folder")


def test_16_bit_png_trains(tmp_path):
    """16-bit images are valid input (scaled to 8 bits), not an error."""
    (tmp_path / "img").mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16)).save(tmp_path / "img" / f"{i}.png")
    assert Image.open(tmp_path / "img" / "0.png").mode.startswith("I;16")
    (tmp_path / "m.csv").write_text("image_path\n" + "".join(f"img/{i}.png\n" for i in range(8)))
    res = invoke("train-vqvae", "--manifest", tmp_path / "m.csv", *VQ_ONE_STEP)
    assert res.exit_code == 0, res.output


def test_resume_after_the_images_changed(chain, tmp_path):
    """--resume continues a run on the data it started on. Images edited, added or removed since would leave a
    resumed quantize run's codes out of step with its index, and a tokenizer tagged with data it did not train on:
    one line saying what changed and what to run instead, before anything is written."""
    import dataclasses

    from vqvae.quantize import QuantizeConfig, save_progress, work_folder

    manifest = make_image_set(tmp_path / "data", n=12)
    res = invoke("train-vqvae", "--manifest", manifest, *VQ_ONE_STEP)
    assert res.exit_code == 0, res.output
    vq = last_line(res.stdout)
    res = invoke("quantize", "--vqvae-run-id", chain["vq"], "--manifest", manifest, "--num-workers", "0")
    assert res.exit_code == 0, res.output
    q = last_line(res.stdout)
    # as if killed half way: the progress marker a quantize run keeps until it finishes
    work = work_folder(q)
    save_progress(work, {"config": dataclasses.asdict(QuantizeConfig(vqvae_run_id=chain["vq"],
                                                                     manifest=str(manifest))),
                         "done": {"train": 3, "val": 0}})
    image = next((tmp_path / "data" / "img").iterdir())
    Image.open(image).rotate(90).save(image)  # edited in place: same name, other pixels
    changed = f"the images of manifest {manifest} changed since run"
    fails("train-vqvae", "--resume", vq, "--max-steps", "2",
          expect=f"{changed} {vq} started (files added, removed or edited); --resume continues a run only on its "
                 f"own data: train again without --resume, or with --init-from {vq} to start from its weights")
    fails("quantize", "--resume", q, "--num-workers", "0", expect=f"{changed} {q} started")
    assert (work / "progress.json").is_file()  # the work folder is left as it was
