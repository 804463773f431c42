"""The five stages chained by run IDs only, each launched as its own process, plus issue-3 bad input."""
from __future__ import annotations

import numpy as np
import mlflow
import pytest
import torch
from PIL import Image

from conftest import TINY_VQ, image_steps, invoke, last_line, run_cli

TINY_GPT = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--batch-size", "8", "--max-steps", "2",
            "--val-every", "1", "--sample-every", "1", "--ckpt-every", "1", "--log-every", "1", "--window-size", "3"]


@pytest.fixture(scope="module")
def chain(tracking_dir, dataset, tmp_path_factory) -> dict[str, str]:
    """tokenizer → quantize → train → generate → decode, each a separate process in its own directory."""
    ids: dict[str, str] = {}
    steps = [("vqvae", ["train-vqvae", "--manifest", dataset, *TINY_VQ, "--max-steps", "3"]),
             ("quantize", ["quantize", "--vqvae-run-id", "{vqvae}", "--num-workers", "0"]),
             ("transformer", ["train", "--quantize-run-id", "{quantize}", *TINY_GPT]),
             ("generate", ["generate", "--transformer-run-id", "{transformer}", "--num-samples", "4", "--gif"]),
             ("decode", ["decode", "--run-id", "{generate}"])]
    for stage, args in steps:
        cwd = tmp_path_factory.mktemp(stage)  # stages must find everything through run IDs, not files here
        proc = run_cli(*[str(a).format(**ids) for a in args], cwd=cwd)
        assert proc.returncode == 0, f"{stage}: {proc.stderr[-3000:]}"
        ids[stage] = last_line(proc.stdout)
    return ids


def test_lineage_and_stage_tags(chain):
    client = mlflow.MlflowClient()
    upstream = {"vqvae": None, "quantize": "vqvae", "transformer": "quantize", "generate": "transformer",
                "decode": "generate"}
    for stage, run_id in chain.items():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags["stage"] == stage
        assert run.data.tags.get("upstream_run_id") == (chain[upstream[stage]] if upstream[stage] else None)


def test_artifacts_of_each_stage(chain):
    client = mlflow.MlflowClient()
    listing = lambda run, path="": {a.path for a in client.list_artifacts(chain[run], path)}  # noqa: E731
    assert {"codes", "index.csv", "vocab.json", "codebook_usage.png"} <= listing("quantize")
    assert {"codes/train.npy", "codes/val.npy"} <= listing("quantize", "codes")
    train_codes = np.load(mlflow.artifacts.download_artifacts(run_id=chain["quantize"],
                                                              artifact_path="codes/train.npy"))
    assert train_codes.dtype == np.uint16 and train_codes.shape[1:] == (8, 8)
    assert "checkpoints/latest.json" in listing("transformer", "checkpoints")
    assert any("samples" in p for p in listing("transformer", "images"))
    # step 0 (the untrained model) too: MLflow's image card opens its slider at step 0
    assert listing("transformer", "samples") == {f"samples/step_00000{i}.png" for i in range(3)}
    assert image_steps(chain["transformer"], "samples") == [0, 1, 2]
    assert "samples.png" in listing("transformer")  # the latest, at the top level, where Compare looks
    history = client.get_metric_history(chain["transformer"], "val/bits_per_token")
    assert [m.step for m in history] == [1, 2]
    assert {"samples/codes.npy", "samples/logprob.npy", "samples/generation.gif"} <= listing("generate", "samples")
    assert "grid.png" in listing("decode") and len(listing("decode", "images")) == 4
    gif = Image.open(mlflow.artifacts.download_artifacts(run_id=chain["generate"],
                                                         artifact_path="samples/generation.gif"))
    assert gif.n_frames >= 9  # one frame per generated row (8) plus the empty grid


def test_codes_round_trip_through_decode(chain, dataset):
    """quantize then decode reproduces the tokenizer's own reconstruction of the same images."""
    import pandas as pd

    from core.data import ImageDataset
    from core.images import to_uint8
    from vqvae.tokenizer import load_tokenizer

    tok = load_tokenizer(chain["vqvae"])
    index = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=chain["quantize"], artifact_path="index.csv"))
    assert list(index.columns) == ["split", "row", "image_path", "label", "label_id"]
    assert index.split.tolist() == sorted(index.split)  # train rows, then val rows, each numbered from 0
    for _, part in index.groupby("split"):
        assert part.row.tolist() == list(range(len(part)))
    classes = sorted(index.label.dropna().unique())
    assert (index.label_id == [classes.index(x) for x in index.label]).all()
    val = index[index.split == "val"].sort_values("row")
    x = torch.stack([ImageDataset(val.image_path.tolist(), 16, train=False)[i][0] for i in range(len(val))])
    codes = torch.from_numpy(np.load(mlflow.artifacts.download_artifacts(
        run_id=chain["quantize"], artifact_path="codes/val.npy")).astype(np.int64))
    assert torch.equal(codes, tok.encode(x).cpu())
    with torch.no_grad():
        reconstruction, _, _ = tok.model(x)
    torch.testing.assert_close(tok.decode(codes), reconstruction.clamp(-1, 1), atol=1e-5, rtol=0)
    res = invoke("decode", "--run-id", chain["quantize"])
    assert res.exit_code == 0, res.output
    png = np.asarray(Image.open(mlflow.artifacts.download_artifacts(run_id=last_line(res.stdout),
                                                                    artifact_path="images/0000.png")))
    expected = to_uint8(reconstruction[:1])[0].permute(1, 2, 0).numpy()
    assert np.abs(png.astype(int) - expected.astype(int)).max() <= 1


def test_same_seed_same_samples(chain):
    def sample(seed: str) -> np.ndarray:
        res = invoke("generate", "--transformer-run-id", chain["transformer"], "--num-samples", "3", "--seed", seed,
                     "--top-k", "5", "--top-p", "0.9", "--label", "red")
        assert res.exit_code == 0, res.output
        return np.load(mlflow.artifacts.download_artifacts(run_id=last_line(res.stdout),
                                                           artifact_path="samples/codes.npy"))
    a, b, c = sample("1"), sample("1"), sample("2")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_generate_precision(chain):
    """--precision bf16 samples with bf16 weights and cache (on CPU too) and records the setting; a bad value is a
    one-line usage error."""
    res = invoke("generate", "--transformer-run-id", chain["transformer"], "--num-samples", "2", "--seed", "3",
                 "--precision", "bf16")
    assert res.exit_code == 0, res.output
    run = mlflow.get_run(last_line(res.stdout))
    assert run.data.params["precision"] == "bf16" and "matmul_used" not in run.data.tags
    codes = np.load(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="samples/codes.npy"))
    assert codes.shape[0] == 2
    res = invoke("generate", "--transformer-run-id", chain["transformer"], "--precision", "fp8")
    assert res.exit_code != 0 and "fp8" in res.output and "Traceback" not in res.output


def test_larger_latent_grid_decodes_to_larger_image(chain):
    res = invoke("generate", "--transformer-run-id", chain["transformer"], "--num-samples", "2",
                 "--latent-size", "16x12")
    assert res.exit_code == 0, res.output
    res = invoke("decode", "--run-id", last_line(res.stdout))
    assert res.exit_code == 0, res.output
    png = Image.open(mlflow.artifacts.download_artifacts(run_id=last_line(res.stdout),
                                                         artifact_path="images/0000.png"))
    assert png.size == (24, 32)  # (W, H) = 12×16 codes × the tokenizer's factor 2


def test_completion_keeps_the_context_rows(chain, dataset):
    image = sorted((dataset.parent / "img").glob("*.png"))[0]
    res = invoke("generate", "--transformer-run-id", chain["transformer"], "--num-samples", "2",
                 "--context-image", image, "--context-fraction", "0.5")
    assert res.exit_code == 0, res.output
    codes = np.load(mlflow.artifacts.download_artifacts(run_id=last_line(res.stdout),
                                                        artifact_path="samples/codes.npy"))
    from core.data import ImageDataset
    from vqvae.tokenizer import load_tokenizer

    expected = load_tokenizer(chain["vqvae"]).encode(ImageDataset([str(image)], 16, False)[0][0][None])
    assert np.array_equal(codes[:, :4], np.repeat(expected[:, :4].numpy(), 2, axis=0))


def _fails(res, *fragments: str) -> None:
    assert res.exit_code == 1, res.output
    message = res.stderr.strip()
    assert message.startswith("Error: ") and len(message.splitlines()) == 1, message
    for fragment in fragments:
        assert fragment in message, message


def test_bad_input(chain, tmp_path):
    t, t0 = chain["transformer"], int(__import__("time").time() * 1000)
    _fails(invoke("quantize", "--vqvae-run-id", "ffffffffffffffffffffffffffffffff"), "not found")
    _fails(invoke("quantize", "--vqvae-run-id", chain["quantize"]), "is a quantize run", "a vqvae run is needed")
    _fails(invoke("train", "--quantize-run-id", chain["vqvae"], *TINY_GPT), "is a vqvae run",
           "a quantize run is needed")
    _fails(invoke("generate", "--transformer-run-id", t, "--label", "purple"), "unknown label 'purple'",
           "known labels: blue, red")
    _fails(invoke("generate", "--transformer-run-id", t, "--top-p", "0"), "--top-p must be > 0, <= 1")
    _fails(invoke("generate", "--transformer-run-id", t, "--top-p", "1.5"), "--top-p must be > 0, <= 1")
    _fails(invoke("generate", "--transformer-run-id", t, "--top-k", "-1"), "--top-k must be >= 0")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    _fails(invoke("generate", "--transformer-run-id", t, "--context-image", tmp_path / "broken.png"),
           "cannot read --context-image")
    np.save(tmp_path / "flat.npy", np.zeros((2, 64), dtype=np.int64))
    _fails(invoke("decode", "--indices", tmp_path / "flat.npy", "--vqvae-run-id", chain["vqvae"]),
           "shape (N, height, width)")
    np.save(tmp_path / "big.npy", np.full((1, 8, 8), 32, dtype=np.int64))
    _fails(invoke("decode", "--indices", tmp_path / "big.npy", "--vqvae-run-id", chain["vqvae"]),
           "hold ids 32..32", "codes 0..31")
    failed = mlflow.MlflowClient().search_runs(
        [mlflow.get_experiment_by_name("taming").experiment_id], "attributes.status = 'FAILED'")
    assert not [r for r in failed if r.info.start_time >= t0]  # caught before a run is created: none FAILED


def test_the_python_tokenizer_says_what_images_it_takes(chain):
    """From Python a user passes what they have: uint8 pixels, one image without its batch axis, a size the
    tokenizer cannot divide. Each is one error saying what encode takes and how to make it."""
    from core.errors import UserError
    from vqvae.tokenizer import load_tokenizer

    tok = load_tokenizer(chain["vqvae"])
    f = tok.downsample_factor
    for images, message in ((torch.zeros(2, 3, 16, 16, dtype=torch.uint8), "must be floats in \\[-1, 1\\], got "
                             "torch.uint8"),
                            (torch.zeros(3, 16, 16),
                             "must be a \\(batch, 3, height, width\\) tensor, got \\(3, 16, 16\\)"),
                            (torch.zeros(1, 16, 16, 3), "got \\(1, 16, 16, 3\\)"),
                            (np.zeros((1, 3, 16, 16)), "tensor, got ndarray"),
                            (torch.zeros(1, 3, 16, 16 + f // 2), f"multiples of its downsampling factor {f}")):
        with pytest.raises(UserError, match=message):
            tok.encode(images)
    assert tok.encode(torch.zeros(2, 3, 16, 16)).shape == (2, *tok.grid_shape)
