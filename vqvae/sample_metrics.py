"""Generation metrics of a generate run's samples against a manifest's images: FID, Inception Score and
precision/recall with torch-fidelity, logged onto the generate run (``gen/*``), and the samples exported as the
``.npz`` that OpenAI's ADM evaluator (guided-diffusion's evaluations/evaluator.py) reads: ``arr_0``, uint8 NHWC.

The samples are decoded once, batch by batch, into a uint8 NHWC memory map: it is both the ``.npz``'s array and
what the feature extractor reads, so 50,000 samples never sit in memory.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch
from torch.utils.data import Dataset

from core.artifacts import read_codes
from core.data import ImageDataset, read_manifest
from core.errors import UserError
from core.images import to_uint8
from core.tracking import data_name, download, find_upstream, get_run
from vqvae.decode import SAMPLES_ARTIFACT
from vqvae.tokenizer import load_tokenizer

INCEPTION = "inception-v3-compat"  # torch-fidelity's feature extractor of the published FID/IS numbers


class UInt8Images(Dataset):
    """(3,H,W) uint8 tensors, torch-fidelity's input: from an NHWC uint8 array, or image files centre-cropped
    to ``size`` (the samples' size: both sets are compared at one resolution)."""

    def __init__(self, array: np.ndarray | None = None, paths: list[str] | None = None, size: int = 0) -> None:
        self.array, self.files = array, ImageDataset(paths, size, train=False) if paths else None

    def __len__(self) -> int:
        return len(self.array) if self.array is not None else len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.array is not None:
            return torch.from_numpy(np.ascontiguousarray(self.array[i])).permute(2, 0, 1)
        return to_uint8(self.files[i][0][None])[0]


def decode_samples(run_id: str, out: Path, device: torch.device, batch_size: int,
                   max_samples: int | None) -> np.ndarray:
    """A generate run's samples decoded into ``out`` (a uint8 (N,H,W,3) ``.npy`` memory map), batch by batch."""
    codes = read_codes(download(run_id, SAMPLES_ARTIFACT), run_id, SAMPLES_ARTIFACT, mmap=True)[:max_samples]
    tok = load_tokenizer(find_upstream(run_id, "vqvae").info.run_id, device)
    f = tok.downsample_factor
    images = np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8,
                                       shape=(len(codes), codes.shape[1] * f, codes.shape[2] * f, 3))
    with torch.inference_mode():
        for lo in range(0, len(codes), batch_size):
            batch = torch.from_numpy(np.asarray(codes[lo:lo + batch_size], dtype=np.int64)).to(device)
            images[lo:lo + len(batch)] = to_uint8(tok.decode(batch)).permute(0, 2, 3, 1).numpy()
    images.flush()
    return images


def check_feature_extractor(name: str) -> None:
    """Inception's weights must be in torch's hub cache (nothing is downloaded offline): else a one-line error."""
    if name != INCEPTION:
        return
    from vqvae.evaluate import INCEPTION_FILE, INCEPTION_URL

    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not path.is_file():
        raise UserError(f"Inception weights not found at {path}: download {INCEPTION_URL} there (FID, IS and "
                        "precision/recall need them), or pass --feature-extractor with another torch-fidelity "
                        "extractor")


def generation_metrics(run_id: str, manifest: str, device: torch.device, batch_size: int = 64,
                       max_samples: int | None = None, feature_extractor: str = INCEPTION,
                       npz: str | None = None) -> dict[str, float]:
    """FID, IS and precision/recall of generate run ``run_id``'s samples against ``manifest``'s images (every
    row), logged onto the run with the sample count and tag ``gen/reference`` (the manifest's data name)."""
    import mlflow
    import torch_fidelity
    from mlflow.entities import Metric, RunTag

    get_run(run_id, "generate")
    check_feature_extractor(feature_extractor)
    df, _ = read_manifest(manifest, 0.0)
    with tempfile.TemporaryDirectory(prefix="gen-metrics-") as tmp:
        samples = decode_samples(run_id, Path(tmp) / "samples.npy", device, batch_size, max_samples)
        if len(samples) < 2 or len(df) < 2:
            raise UserError(f"FID needs at least 2 samples and 2 reference images, got {len(samples)} and {len(df)}")
        if npz:
            np.savez(npz, arr_0=samples)  # written from the memory map in chunks
            click.echo(f"wrote {len(samples)} samples to {npz} (arr_0: uint8 NHWC, the ADM evaluator's format)",
                       err=True)
        found = torch_fidelity.calculate_metrics(
            input1=UInt8Images(samples), input2=UInt8Images(paths=df["image_path"].tolist(), size=samples.shape[1]),
            cuda=device.type == "cuda", batch_size=batch_size, fid=True, isc=True, prc=True,
            isc_splits=min(10, len(samples)), prc_neighborhood=min(3, len(samples) - 1, len(df) - 1),
            feature_extractor=feature_extractor, verbose=False, save_cpu_ram=True)
        count = len(samples)
        del samples  # the memory map, before its folder goes
    names = {"frechet_inception_distance": "fid", "inception_score_mean": "inception_score",
             "inception_score_std": "inception_score_std", "precision": "precision", "recall": "recall"}
    metrics = {f"gen/{names[k]}": float(v) for k, v in found.items() if k in names}
    metrics.update({"gen/num_samples": count, "gen/num_reference_images": len(df)})
    now = int(time.time() * 1000)
    # by run ID through the client: re-opening the run with start_run would change its FINISHED status
    mlflow.MlflowClient().log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                                    tags=[RunTag("gen/reference", data_name(manifest)),
                                          RunTag("gen/reference_manifest", str(Path(manifest).resolve())),
                                          RunTag("gen/feature_extractor", feature_extractor)])
    click.echo(", ".join(f"{k[4:]} {v:.4g}" for k, v in metrics.items()), err=True)
    return metrics
