"""Real scale: quantize streams codes into memory maps and resumes after kill -9, torchrun ranks share quantize and
generate with the same results as one process, train memory-maps codes (and flipped codes), images are verified
once per manifest content."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT, TINY_GPT, invoke, last_line
from test_distributed import free_port, torchrun

# Runs the CLI unchanged, but SIGKILLs the process right after quantize's KILL_AFTER-th progress marker: a crash
# half way, at a known point, with no test-only code path in the product.
KILL_LAUNCHER = """
import os, signal, sys
import vqvae.quantize as quantize
from cli import cli

calls = [0]
save = quantize.save_progress


def save_then_die(work, state):
    save(work, state)
    calls[0] += 1
    if calls[0] == int(os.environ["KILL_AFTER"]):
        os.kill(os.getpid(), signal.SIGKILL)


quantize.save_progress = save_then_die
cli.main(sys.argv[1:])
"""

CLI_LAUNCHER = "import sys\nfrom cli import cli\ncli.main(sys.argv[1:])\n"


def run_codes(run_id: str) -> dict[str, np.ndarray]:
    folder = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="codes"))
    return {p.name: np.load(p) for p in sorted(folder.glob("*.npy"))}


def quantize_run_with(vqvae_run: str, *args: str) -> str:
    res = invoke("quantize", "--vqvae-run-id", vqvae_run, "--num-workers", "0", *args)
    assert res.exit_code == 0, res.output
    return last_line(res.stdout)


def test_quantize_killed_half_way_resumes_to_the_codes_of_an_uninterrupted_run(vqvae_run, dataset, tmp_path):
    options = ["--batch-size", "3", "--flip"]
    reference = quantize_run_with(vqvae_run, *options)
    launcher = tmp_path / "kill.py"
    launcher.write_text(KILL_LAUNCHER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KILL_AFTER": "4", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(launcher), "quantize", "--vqvae-run-id", vqvae_run, "--num-workers",
                           "0", "--experiment", "killed-quantize", *options], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("killed-quantize").experiment_id])
    work = Path(run.data.tags["quantize_work_dir"])
    done = __import__("json").loads((work / "progress.json").read_text())["done"]
    assert 0 < done["train"] < 20 and done["val"] == 0  # stopped half way through the training images

    res = invoke("quantize", "--resume", run.info.run_id, "--num-workers", "0")
    assert res.exit_code == 0, res.output
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert not work.exists()  # uploaded, then the work folder is removed
    got, want = run_codes(run.info.run_id), run_codes(reference)
    assert sorted(got) == ["train.npy", "train_flip.npy", "val.npy"]
    for name in want:
        assert got[name].dtype == np.uint16 and np.array_equal(got[name], want[name]), name
    assert not np.array_equal(got["train.npy"], got["train_flip.npy"])  # the flipped images code differently

    res = invoke("quantize", "--resume", run.info.run_id)  # nothing left to resume: one line, no traceback
    assert res.exit_code == 1 and "has no progress on this machine" in res.stderr


def test_quantize_and_generate_under_torchrun_match_one_process(vqvae_run, quantize_run, tmp_path):
    launcher = tmp_path / "cli_launch.py"
    launcher.write_text(CLI_LAUNCHER)
    single = quantize_run_with(vqvae_run, "--batch-size", "4")
    ranked = torchrun(launcher, "quantize", "--vqvae-run-id", vqvae_run, "--num-workers", "0", "--batch-size", "4",
                      "--experiment", "ddp-quantize", cwd=tmp_path)
    client = mlflow.MlflowClient()
    assert len(client.search_runs([client.get_experiment_by_name("ddp-quantize").experiment_id])) == 1
    got, want = run_codes(ranked), run_codes(single)
    for name in want:
        assert np.array_equal(got[name], want[name]), name

    res = invoke("train", "--quantize-run-id", quantize_run, *TINY_GPT)
    assert res.exit_code == 0, res.output
    gpt = last_line(res.stdout)
    # 11 samples in batches of 3 over 2 ranks: rank 1 sits out the last round
    options = ["--transformer-run-id", gpt, "--num-samples", "11", "--batch-size", "3", "--seed", "5"]
    res = invoke("generate", *options)
    assert res.exit_code == 0, res.output
    one = last_line(res.stdout)
    two = torchrun(launcher, "generate", *options, cwd=tmp_path)
    for name in ("samples/codes.npy", "samples/logprob.npy"):
        a = np.load(mlflow.artifacts.download_artifacts(run_id=one, artifact_path=name))
        b = np.load(mlflow.artifacts.download_artifacts(run_id=two, artifact_path=name))
        assert len(a) == 11 and np.array_equal(a, b), name
    codes = np.load(mlflow.artifacts.download_artifacts(run_id=one, artifact_path="samples/codes.npy"))
    assert len({c.tobytes() for c in codes}) > 1  # batches are seeded differently


def test_train_memory_maps_codes_and_samples_flipped_grids(vqvae_run):
    from transformer.train import CodeData

    run_id = quantize_run_with(vqvae_run, "--flip", "--no-verify")
    data = CodeData.from_run(run_id)
    assert isinstance(data.codes["train"], np.memmap) and isinstance(data.flipped, np.memmap)
    assert data.codes["train"].dtype == np.uint16
    idx = np.arange(len(data.codes["train"]))
    plain = data.sequences("train", idx, rng=np.random.default_rng(0))
    mixed = data.sequences("train", idx, rng=np.random.default_rng(0), flip=True)
    flipped = torch.from_numpy(data.flipped.astype(np.int64)).flatten(1)
    from_flip = (mixed[:, 1:] == flipped).all(1) & ~(plain[:, 1:] == flipped).all(1)
    from_plain = (mixed[:, 1:] == plain[:, 1:]).all(1)
    assert bool((from_flip | from_plain).all()) and 0 < int(from_flip.sum()) < len(idx)
    assert torch.equal(mixed[:, 0], plain[:, 0])  # the class prefix is the image's either way
    assert torch.equal(data.sequences("val", np.arange(2), flip=True), data.sequences("val", np.arange(2)))
    # code ids beyond the codebook in the flipped grids (a damaged file) are a one-line error naming that file
    bad = np.array(data.flipped)
    bad[:, 0, 0] = data.vocab.codebook_size  # every row: whichever the draw takes
    from core.errors import UserError
    with pytest.raises(UserError, match=r"codes/train_flip.npy holds code id \d+, but vocab.json says"):
        dataclasses.replace(data, flipped=bad).sequences("train", idx, rng=np.random.default_rng(0), flip=True)


def test_images_are_verified_once_per_manifest_content(tmp_path, monkeypatch, tracking_dir):
    import core.data
    from conftest import make_image_set

    manifest = make_image_set(tmp_path / "d", n=6)
    opened = []
    monkeypatch.setattr(core.data, "check_image", lambda p: opened.append(p))
    core.data.read_manifest(manifest)
    assert len(opened) == 6
    core.data.read_manifest(manifest)
    assert len(opened) == 6  # cached: no image opened again
    copy = tmp_path / "d" / "copy.csv"
    copy.write_bytes(manifest.read_bytes())
    assert (core.data.manifest_fingerprint(copy, ["x"]) == core.data.manifest_fingerprint(manifest, ["x"]))
    first = pd.read_csv(manifest).image_path[0]
    image = tmp_path / "d" / first
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))  # an image changed
    core.data.read_manifest(manifest)
    assert len(opened) == 12
    core.data.read_manifest(manifest, check_files=False)  # --no-verify
    assert len(opened) == 12


def test_checking_more_images_than_a_chunk_shows_progress(monkeypatch, capsys):
    """Checking a large folder takes minutes (every JPEG is decoded): beyond one chunk a progress bar counts the
    images on stderr; a small set checks silently. The reasons come back in the order of the paths either way."""
    import core.data

    monkeypatch.setattr(core.data, "VERIFY_CHUNK", 4)
    monkeypatch.setattr(core.data, "check_image", lambda p: None if p % 3 else f"bad {p}")
    assert core.data.check_images(list(range(4))) == ["bad 0", None, None, "bad 3"]
    assert capsys.readouterr().err == ""
    assert core.data.check_images(list(range(10))) == [None if p % 3 else f"bad {p}" for p in range(10)]
    err = capsys.readouterr().err
    assert "checking images" in err and "10/10" in err


def test_a_manifest_from_make_manifest_is_not_checked_again(tmp_path, monkeypatch, tracking_dir):
    """make-manifest decodes every image; the first stage on its manifest reuses that check instead of decoding
    the folder a second time, and checks again once an image changes."""
    import core.data
    from click.testing import CliRunner
    from conftest import make_image_set

    from core.manifest import make_manifest_command

    make_image_set(tmp_path / "d", n=6)
    out = tmp_path / "elsewhere" / "m.csv"  # paths through '..', resolved the way read_manifest resolves them
    assert CliRunner().invoke(make_manifest_command, [str(tmp_path / "d" / "img"), "--out", str(out)]).exit_code == 0
    opened = []
    monkeypatch.setattr(core.data, "check_image", lambda p: opened.append(p))
    assert len(core.data.read_manifest(out)[0]) == 6 and opened == []
    image = Path(core.data.read_manifest(out, check_files=False)[0].image_path[0])
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    core.data.read_manifest(out)
    assert len(opened) == 6


def _verify_on_ranks(rank: int, port: int, manifest: str, out: str) -> None:
    """One rank of `test_a_bad_image_stops_every_rank_with_rank_0s_error`: what read_manifest_on_ranks gave it."""
    import datetime
    import json

    import torch.distributed as dist

    from core.data import read_manifest_on_ranks
    from core.errors import UserError
    from core.runtime import Runtime

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # short: without the failure flag, rank 1 would wait here for rank 0, which has given up
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30))
    rt, result = Runtime(torch.device("cpu"), "fp32", rank=rank, world_size=2), {}
    try:
        df, skipped = read_manifest_on_ranks(rt, manifest, 0.1, skip_bad_images=True)
        result["skipping"] = [sorted(df.key), skipped]
        try:
            read_manifest_on_ranks(rt, manifest, 0.1, skip_bad_images=False)
        except UserError as exc:
            result["error"] = str(exc)
        except Exception as exc:  # noqa: BLE001 - recorded for the test to show
            result["error"] = f"not a UserError: {type(exc).__name__}: {exc}"
    finally:
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()


def test_a_bad_image_stops_every_rank_with_rank_0s_error(tmp_path, monkeypatch):
    """Under torchrun only rank 0 verifies the images: when it finds bad ones (without --skip-bad-images) every
    rank must stop with its one-line error, not wait for it in a collective (on other nodes, until a timeout)."""
    import json

    import torch.multiprocessing as mp

    from conftest import make_image_set

    monkeypatch.setenv("TAMING_CACHE_DIR", str(tmp_path / "cache"))  # inherited by the spawned ranks
    manifest = make_image_set(tmp_path / "d", n=8)
    first = pd.read_csv(manifest).image_path[0]
    (manifest.parent / first).unlink()
    mp.spawn(_verify_on_ranks, args=(free_port(), str(manifest), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["skipping"] == r1["skipping"] and r1["skipping"][1] == 1 and first not in r1["skipping"][0]
    assert "1 of 8 images are missing or unusable" in r0["error"] and "--skip-bad-images" in r0["error"]
    assert r1["error"] == r0["error"]


class StandInFeatures(torch.nn.Module):
    """A small fixed network in Inception's place (its weights cannot be downloaded in tests)."""

    def __init__(self, name, features_list, **kwargs):
        from torch_fidelity.feature_extractor_base import FeatureExtractorBase

        FeatureExtractorBase.__init__(self, name, features_list)
        gen = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(torch.randn(3 * 4 * 4, 12, generator=gen), requires_grad=False)

    def forward(self, x):
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1)
        feats = {"feat": pooled @ self.proj, "logits": (pooled @ self.proj)[:, :5]}
        return tuple(feats[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "feat", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "feat", "kid": "feat", "prc": "feat"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)


def test_generation_metrics_are_logged_on_the_generate_run(quantize_run, dataset, tmp_path, monkeypatch):
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if "stand-in" not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor("stand-in", type("StandIn", (StandInFeatures, FeatureExtractorBase), {}))
    res = invoke("train", "--quantize-run-id", quantize_run, *TINY_GPT)
    assert res.exit_code == 0, res.output
    res = invoke("generate", "--transformer-run-id", last_line(res.stdout), "--num-samples", "12", "--batch-size", "5")
    assert res.exit_code == 0, res.output
    gen = last_line(res.stdout)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no Inception weights there
    res = invoke("evaluate", "--generate-run-id", gen, "--manifest", dataset)
    assert res.exit_code == 1 and "weights-inception-2015-12-05" in res.stderr and len(res.stderr.splitlines()) == 1

    npz = tmp_path / "samples.npz"
    res = invoke("evaluate", "--generate-run-id", gen, "--manifest", dataset, "--feature-extractor", "stand-in",
                 "--npz", npz, "--batch-size", "4")
    assert res.exit_code == 0, res.output
    run = mlflow.MlflowClient().get_run(gen)
    m = run.data.metrics
    assert m["gen/num_samples"] == 12 and m["gen/num_reference_images"] == 24
    assert m["gen/fid"] > 0 and m["gen/inception_score"] >= 1 and 0 <= m["gen/precision"] <= 1
    assert 0 <= m["gen/recall"] <= 1
    assert run.data.tags["gen/reference"] == dataset.parent.name and run.info.status == "FINISHED"
    arr = np.load(npz)["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (12, 16, 16, 3)


def test_repeated_downloads_do_not_grow_the_temp_folder(quantize_run, tmp_path, monkeypatch):
    import tempfile

    from core import tracking

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this test's temp folder
    monkeypatch.setattr(tracking, "_DOWNLOADS", [])
    before = tracking.download(quantize_run, "codes/train.npy")
    held = np.load(before, mmap_mode="r")  # open from the first download, as train holds it
    expected = np.array(held)
    sizes = []
    for _ in range(4):
        path = tracking.download(quantize_run, "codes/train.npy")
        tracking.download(quantize_run, "codes")  # a folder too
        sizes.append(sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file()))
    assert path == before and len(set(sizes)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [tracking.download_folder().name]
    assert np.array_equal(held, expected)  # replaced by rename: the mapped file is untouched


def test_quantize_keeps_only_paths_per_image_while_encoding(vqvae_run, dataset, monkeypatch):
    """Memory that grows with the dataset while the codes are made: only the image paths. index.csv is written and
    the manifest frame dropped (and freed memory handed back) before the first image is encoded."""
    import gc

    import vqvae.quantize as quantize

    events: list[str] = []
    encode = quantize.encode_split
    release = quantize.release_free_memory

    def watched_encode(tok, paths, arrays, *args, **kwargs):
        if not events.count("encode"):
            index = Path(arrays[0].filename).parents[1] / "index.csv"
            assert index.is_file() and len(pd.read_csv(index)) > len(paths)
            frames = [o for o in gc.get_objects() if type(o) is pd.DataFrame and "image_path" in o.columns
                      and len(o) >= len(paths)]
            assert not frames, "the manifest frame is still alive while encoding"
        events.append("encode")
        return encode(tok, paths, arrays, *args, **kwargs)

    monkeypatch.setattr(quantize, "encode_split", watched_encode)
    monkeypatch.setattr(quantize, "release_free_memory", lambda: (events.append("release"), release())[1])
    # an earlier test's failed command in this process can leave a manifest frame in an uncollected cycle (its
    # traceback): collect that first, so that the frames found above are the ones this quantize run keeps alive
    gc.collect()
    quantize_run_with(vqvae_run)
    assert events == ["release", "encode", "encode"]
